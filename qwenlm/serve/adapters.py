"""LoRA adapters served beside the base model: chosen per request by ``model``.

``--lora NAME=PATH`` (repeatable) loads PEFT adapters at start; with ``--enable-lora`` (or any
``--lora``) they can also be loaded and unloaded at run time through vLLM's routes,
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and ``POST
/v1/unload_lora_adapter {"lora_name"}``, behind the API key like every route. A path must be a
folder holding ``adapter_config.json`` and ``adapter_model.safetensors`` (pickle files are
never read). Requests naming different adapters, and the base model, run in the same batch
(:class:`qwenlm.lora.AdapterRouter`); unloading an adapter lets running requests finish.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from qwenlm.errors import QwenlmError
from qwenlm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, AdapterRouter
from qwenlm.serve import protocol as P
from qwenlm.serve.http import read_json
from qwenlm.serve.protocol import APIError

if TYPE_CHECKING:
    from qwenlm.api import Qwen
    from qwenlm.serve.app import Service

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class Adapters:
    """The adapters a server offers, by name (``--lora``, ``--enable-lora``, ``--max-loras``)."""

    def __init__(
        self,
        model: Qwen,
        base_names: list[str],
        preload: Mapping[str, str],
        *,
        enabled: bool,
        limit: int,
    ) -> None:
        self.base_names = base_names
        self.limit = limit
        self.loaded: dict[str, Adapter] = {}
        self.router: AdapterRouter | None = None
        if enabled or preload:
            self.router = model.enable_adapters()
        for name, path in preload.items():
            self.loaded[name] = self.read(name, path)

    def get(self, name: str) -> Adapter | None:
        return self.loaded.get(name)

    def read(self, name: str, path: str) -> Adapter:
        """The adapter in ``path`` for ``name``, checked; :class:`QwenlmError` if it cannot be."""
        if not _NAME.fullmatch(name) or name in self.base_names:
            raise QwenlmError(
                f"adapter name {name!r} must be letters, digits and ._:/- and differ from the "
                "base model's names"
            )
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise QwenlmError(f"{path} is not a folder (a LoRA adapter is a folder)")
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (folder / file).is_file():
                raise QwenlmError(
                    f"{path} has no {file}",
                    hint="a PEFT adapter folder holds adapter_config.json and "
                    "adapter_model.safetensors (pickle files are never loaded)",
                )
        assert self.router is not None
        return self.router.load(name, folder)


async def load_lora_adapter(request: Request) -> Any:
    """vLLM's ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    adapters = _enabled(svc)
    name = _field(body, "lora_name")
    path = _field(body, "lora_path")
    if name in adapters.loaded:
        raise P.invalid(f"The LoRA adapter '{name}' has already been loaded.", param="lora_name")
    if len(adapters.loaded) >= adapters.limit:
        raise P.invalid(
            f"This server holds at most {adapters.limit} adapters (--max-loras); unload one first.",
            param="lora_name",
        )
    try:
        adapter = await anyio.to_thread.run_sync(adapters.read, name, path)
    except QwenlmError as e:
        raise P.invalid(f"Cannot load the adapter: {e}", param="lora_path") from None
    if name in adapters.loaded:  # loaded by a concurrent request meanwhile
        raise P.invalid(f"The LoRA adapter '{name}' has already been loaded.", param="lora_name")
    adapters.loaded[name] = adapter
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: Request) -> Any:
    """vLLM's ``POST /v1/unload_lora_adapter {"lora_name"}``; running requests finish with it."""
    svc: Service = request.app.state.service
    body = await read_json(request, svc.config.max_body_bytes)
    adapters = _enabled(svc)
    name = _field(body, "lora_name")
    if adapters.loaded.pop(name, None) is None:
        raise APIError(
            404, f"The LoRA adapter '{name}' is not loaded.", param="lora_name", code="not_found"
        )
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _enabled(svc: Service) -> Adapters:
    if svc.adapters.router is None:
        raise P.invalid(
            "Loading adapters at run time is off on this server; start it with --enable-lora "
            "(or --lora NAME=PATH)."
        )
    return svc.adapters


def _field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise P.invalid(f"Missing required parameter: '{name}' (a string).", param=name)
    return value
