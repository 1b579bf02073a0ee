"""The Python API: ``qwenlm.load`` and the model object it returns."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenlm import registry
from qwenlm.chat.template import ChatTemplate
from qwenlm.config import ModelConfig
from qwenlm.errors import GenerationError
from qwenlm.generation.cache import PromptCache
from qwenlm.generation.generate import GenerationChunk, GenerationConfig, stream_generate
from qwenlm.models import build_model
from qwenlm.tokenizer import Tokenizer
from qwenlm.weights import open_checkpoint

History = list[tuple[str, str]] | list[dict[str, Any]]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bfloat16 is a storage format on CPUs without AMX/AVX512-BF16 (5x slower matmuls).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise GenerationError(f"unknown dtype {dtype!r}", hint="use float32 or bfloat16") from None


def load(
    model: str | os.PathLike[str] = registry.DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    pull: bool = False,
) -> Qwen:
    """Load a model by registry name, GGUF path or Hugging Face folder.

    ``pull=True`` fetches a registry model that is not in the cache yet.
    """
    path = registry.resolve(model, cache_dir=cache_dir, pull=pull)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with open_checkpoint(path) as ckpt:
        net = build_model(ckpt.config, ckpt.tensors(dt), dtype=dt, device=dev)
    given_path = Path(os.fspath(model)).expanduser().exists()
    return Qwen(
        net,
        ckpt.tokenizer,
        ChatTemplate(ckpt.chat_template, ckpt.tokenizer),
        generation_defaults=ckpt.generation_defaults,
        name=(ckpt.name or path.name) if given_path else str(model),
        path=path,
    )


class Qwen:
    """A loaded model with its tokenizer and chat template.

    ``chat`` / ``chat_stream`` follow the Qwen model cards; ``generate`` / ``stream`` complete raw
    text; ``stream_chat`` is the chunk-level stream that surfaces (CLI, server) build on.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        *,
        generation_defaults: Mapping[str, Any] | None = None,
        name: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.generation_defaults = dict(generation_defaults or {})
        self.name = name
        self.path = path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """The model's defaults with ``overrides`` applied (``None`` values are ignored)."""
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = set(overrides) - fields
        if unknown:
            raise GenerationError(
                f"unknown generation option(s): {', '.join(sorted(unknown))}",
                hint=f"options are {', '.join(sorted(fields))}",
            )
        values = {k: v for k, v in self.generation_defaults.items() if k in fields}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationConfig(**values)

    # -- raw ids ---------------------------------------------------------------------------
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits (T, vocab), float32, for every position of the token ids ``ids``."""
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if x.shape[1] == 0:
            raise GenerationError("logits() needs at least one token id")
        if int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size:
            raise GenerationError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        with torch.inference_mode():
            return self.model(x)[0].float()

    # -- completion of raw text ------------------------------------------------------------
    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return (
            self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        )

    def stream(
        self, prompt: str | Sequence[int], *, cache: PromptCache | None = None, **options: Any
    ) -> Iterator[GenerationChunk]:
        """Chunks completing ``prompt`` (text is encoded as plain text; give ids for control tokens)."""
        return stream_generate(
            self.model,
            self.tokenizer,
            self._ids(prompt),
            self.generation_config(**options),
            cache=cache,
        )

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str:
        """The completion of ``prompt`` as one string (collects :meth:`stream`)."""
        return "".join(chunk.text for chunk in self.stream(prompt, **options))

    # -- chat -------------------------------------------------------------------------------
    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Prompt ids for a conversation, rendered with the model's own chat template."""
        return self.template.encode(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        cache: PromptCache | None = None,
        **options: Any,
    ) -> Iterator[GenerationChunk]:
        """Chunks of the assistant's reply to ``messages`` (OpenAI-style role/content dicts)."""
        ids = self.encode_chat(messages, tools=tools)
        return stream_generate(
            self.model, self.tokenizer, ids, self.generation_config(**options), cache=cache
        )

    def chat_stream(
        self, query: str, history: History | None = None, system: str | None = None, **options: Any
    ) -> Iterator[str]:
        """Text deltas of the reply to ``query`` after ``history`` (pairs or message dicts)."""
        messages = _messages(query, history, system)
        for chunk in self.stream_chat(messages, **options):
            if chunk.text:
                yield chunk.text

    def chat(
        self, query: str, history: History | None = None, system: str | None = None, **options: Any
    ) -> tuple[str, History]:
        """``response, history = model.chat(query, history)``, as in the Qwen model cards.

        ``history`` is a list of (query, response) pairs, or of role/content dicts; the
        returned history has the same form with this turn appended.
        """
        response = "".join(self.chat_stream(query, history, system, **options))
        history = list(history or [])
        if history and isinstance(history[0], Mapping):
            history += [
                {"role": "user", "content": query},
                {"role": "assistant", "content": response},
            ]
        else:
            history.append((query, response))
        return response, history


def _messages(query: str, history: History | None, system: str | None) -> list[dict[str, Any]]:
    if not isinstance(query, str):
        raise GenerationError(f"query must be a string, got {type(query).__name__}")
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in history or []:
        if isinstance(turn, Mapping):
            messages.append(dict(turn))
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            messages += [
                {"role": "user", "content": turn[0]},
                {"role": "assistant", "content": turn[1]},
            ]
        else:
            raise GenerationError(
                "history entries must be (query, response) pairs or role/content dicts"
            )
    messages.append({"role": "user", "content": query})
    return messages
