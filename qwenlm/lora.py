"""LoRA as a transform: swap a built model's linear layers for low-rank adapted ones, and back.

``LoRALinear`` keeps the frozen base layer (an ``nn.Linear`` or an ``NF4Linear`` for Q-LoRA)
and adds ``scaling * B(A(dropout(x)))`` with A: (r, in) and B: (out, r), B starting at zero so
an adapted model starts out equal to its base. Attribute names follow PEFT (``base_layer``,
``lora_A``, ``lora_B``), and :func:`save_adapter` writes PEFT's files (``adapter_config.json`` +
``adapter_model.safetensors`` with ``base_model.model.``-prefixed keys), so PEFT loads our
adapters and we load PEFT's.

Adapters can be switched off without removing them (:func:`lora_disabled`): DPO uses the base
model with adapters off as its reference model, so no second copy of the weights is needed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qwenlm.errors import QwenlmError
from qwenlm.fsutil import atomic_write, write_json
from qwenlm.models import swap_module

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Every linear layer of a Qwen2 decoder block (the QLoRA paper adapts all of them).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(QwenlmError):
    """A LoRA adapter that cannot be applied, saved or loaded."""


class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` over a frozen base layer."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise AdapterError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        # rsLoRA scales by alpha / sqrt(r) so that large ranks still learn (Kalajdzievski 2023).
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base_layer.requires_grad_(False)
        device = _device_of(base_layer)
        # LoRA weights stay float32 whatever the base dtype: they are small and train better so.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        # PEFT's default initialisation: A like nn.Linear (Kaiming uniform), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    @classmethod
    def from_base(
        cls,
        base: nn.Module,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wrap a linear layer (``nn.Linear`` or ``NF4Linear``); its weights are frozen."""
        return cls(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        a = self.lora_A.weight
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: what the adapter adds to the base weight, (out, in) float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this layer with the adapter on (NF4 bases dequantized)."""
        base = self.base_layer
        w = base.dequantize() if hasattr(base, "dequantize") else base.weight.detach().float()
        dtype = getattr(base, "compute_dtype", None) or base.weight.dtype
        out = nn.Linear(
            self.in_features,
            self.out_features,
            bias=base.bias is not None,
            device=w.device,
            dtype=dtype,
        )
        with torch.no_grad():
            out.weight.copy_((w.float() + self.delta_weight().to(w.device)).to(dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias.detach())
        out.requires_grad_(False)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, enabled={self.enabled}"


def _device_of(module: nn.Module) -> torch.device:
    return next(itertools.chain(module.parameters(), module.buffers())).device


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    # PEFT's rule: a string is a regex matched against the whole module name; a list matches
    # names that equal an entry or end with "." + entry.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "NF4Linear"


def apply_lora(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Freeze ``model`` and swap the targeted linear layers for ``LoRALinear``; in place.

    Returns the names of the adapted modules. Only the LoRA weights are left trainable.
    """
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and _matches(name, target_modules)
    ]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise AdapterError(
            f"LoRA target_modules {target_modules!r} match no linear layer of the model",
            hint=f"the model's linear layers are named {', '.join(linears)}",
        )
    for name in names:
        base = model.get_submodule(name)
        adapted = LoRALinear.from_base(
            base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora
        )
        swap_module(model, name, adapted)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the ``LoRALinear`` wrappers; in place."""
    for name, module in list(lora_layers(model)):
        swap_module(model, name, module.fuse())
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its base (DPO's reference model)."""
    layers = [m for _, m in lora_layers(model)]
    previous = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, was in zip(layers, previous, strict=True):
            m.enabled = was


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under the model's own parameter names (``...q_proj.lora_A.weight``)."""
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


# -- PEFT files -------------------------------------------------------------------------------
def adapter_config(
    model: nn.Module, *, base_model: str | None = None, target_modules: Any = None
) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the adapters in ``model`` (one shared r/alpha/dropout)."""
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    first = layers[0][1]
    for name, m in layers:
        if (m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora):
            raise AdapterError(f"LoRA layer {name} differs in r/alpha from {layers[0][0]}")
    if target_modules is None:
        target_modules = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": target_modules
        if isinstance(target_modules, str)
        else list(target_modules),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_adapter(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's key names).

    ``tensors`` are LoRA weights under the model's parameter names (:func:`lora_state_dict`).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in tensors.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AdapterError(f"{name} is not a LoRA weight")
        out[PEFT_PREFIX + name] = t.detach().to("cpu", torch.float32).contiguous()
    atomic_write(
        folder / ADAPTER_WEIGHTS, lambda p: save_file(out, str(p), metadata={"format": "pt"})
    )
    write_json(folder / ADAPTER_CONFIG, dict(config))
    return folder


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{folder} is not a LoRA adapter: it has no {ADAPTER_CONFIG}",
            hint="pass the folder written by `qwenlm train` with method lora or qlora (or by PEFT)",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [
        key
        for key, off in (
            ("use_dora", False),
            ("modules_to_save", None),
            ("layers_to_transform", None),
            ("rank_pattern", {}),
            ("alpha_pattern", {}),
            ("fan_in_fan_out", False),
        )
        if config.get(key) not in (off, None, {}, [])
    ]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(
            f"{path} uses PEFT features qwenlm does not support: {', '.join(unsupported)}"
        )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path} has no {key!r}")
    return config


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``adapter_config.json``, the LoRA weights under the model's parameter names) of the
    PEFT-format adapter in ``folder``; never a pickle file."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = folder / "adapter_model.bin"
        raise AdapterError(
            f"{folder} has no {ADAPTER_WEIGHTS}"
            + (
                " (adapter_model.bin is a pickle file, which qwenlm never loads)"
                if pickled.exists()
                else ""
            ),
            hint="save the adapter with safetensors (PEFT's default)",
        )
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                name = key.removeprefix(PEFT_PREFIX)
                # PEFT also accepts keys that carry the adapter name ("lora_A.default.weight").
                name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
                tensors[name] = f.get_tensor(key)
    except Exception as e:  # the Rust reader raises its own error types
        raise AdapterError(f"malformed adapter file {weights}: {e}") from None
    return config, tensors


def _scaling(config: Mapping[str, Any]) -> tuple[int, float, bool]:
    """(r, alpha, rsLoRA) of an adapter config."""
    return int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))


def load_adapter(model: nn.Module, folder: str | os.PathLike[str]) -> list[str]:
    """Apply the PEFT-format LoRA adapter in ``folder`` to ``model``; returns adapted names.

    Every weight in the file must land on a layer of the model with the right shape, and every
    adapted layer must get both of its weights.
    """
    config, tensors = read_adapter(folder)
    r, alpha, rslora = _scaling(config)
    names = apply_lora(
        model,
        target_modules=config["target_modules"],
        r=r,
        alpha=alpha,
        dropout=0.0,
        use_rslora=rslora,
    )
    params = lora_state_dict(model)
    for name, t in tensors.items():
        if name not in params:
            raise AdapterError(
                f"adapter weight {PEFT_PREFIX}{name} matches no LoRA layer of the model",
                hint="was the adapter trained on a different base model?",
            )
        if t.shape != params[name].shape:
            raise AdapterError(
                f"adapter weight {PEFT_PREFIX}{name} has shape {list(t.shape)}, the model needs "
                f"{list(params[name].shape)}",
                hint="was the adapter trained on a different base model?",
            )
        with torch.no_grad():
            params[name].copy_(t)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise AdapterError(
            f"{Path(folder) / ADAPTER_WEIGHTS} lacks {len(missing)} LoRA weight(s), "
            f"e.g. {missing[0]}",
            hint="the adapter file is incomplete or its target_modules differ",
        )
    return names


# -- adapters chosen per request (the server's --lora) ------------------------------------------
# A fused projection computes several of the checkpoint's projections; an adapter's weights for
# each land on its slice of the fused output.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Adapter:
    """A LoRA adapter loaded beside the base weights, for the requests that name it.

    ``weights`` maps a wrapped layer's name to ``(A, B)``: A (R, in) stacks the adapter's A
    matrices of the projections the layer computes, B (out, R) places their B matrices on the
    layer's output slices, block-diagonally, scaled. Never changed once loaded: sequences hold
    the object, so unloading it by name leaves running requests alone.
    """

    def __init__(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.name = name
        self.weights = weights

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, {len(self.weights)} layers)"


class AdapterLinear(nn.Module):
    """A linear layer whose rows may each carry an adapter: ``base(x)``, plus for the rows of
    each adapter ``B (A x)``. Rows without one get exactly ``base(x)``: the base path is not
    touched. Which rows carry which adapter is the router's, set per forward by the engine."""

    def __init__(self, base_layer: nn.Module, name: str, router: AdapterRouter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.name = name
        self._router = [router]  # a plain reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        groups = self._router[0].groups
        if not groups:
            return y
        x2 = x.reshape(-1, self.in_features)  # (rows, in): the engine's flattened batch
        y2 = y.reshape(-1, self.out_features)
        for adapter, rows in groups:
            w = adapter.weights.get(self.name)
            if w is not None:
                a, b = w
                delta = (x2[rows].to(a.dtype) @ a.T) @ b.T
                y2.index_add_(0, rows, delta.to(y2.dtype))
        return y2.view(y.shape)


class AdapterRouter:
    """Per-request LoRA over a model's decoder layers: the wrapped layers, the loader, and the
    rows of the current forward that carry each adapter (``groups``, set by the engine)."""

    def __init__(self) -> None:
        self.groups: list[tuple[Adapter, torch.Tensor]] = []
        # checkpoint projection name -> (wrapped layer's name, output offset, output size)
        self.parts: dict[str, tuple[str, int, int]] = {}
        self.layers: dict[str, AdapterLinear] = {}

    @classmethod
    def wrap(cls, blocks: Sequence[nn.Module], prefix: str = "model.layers") -> AdapterRouter:
        """Wrap every linear layer of the decoder layers ``blocks`` (plain ones, named
        ``{prefix}.{i}``) in an :class:`AdapterLinear`; in place."""
        router = cls()
        for i, block in enumerate(blocks):
            if any(".experts." in n or n.endswith("experts") for n, _ in block.named_modules()):
                raise AdapterError(
                    "per-request adapters need a dense model; this one has mixture-of-experts "
                    "layers",
                    hint="merge the adapter instead (--adapter)",
                )
            linears = [
                (n, m)
                for n, m in block.named_modules()
                if hasattr(m, "in_features")
                and hasattr(m, "out_features")
                and not list(m.children())
            ]
            for name, module in linears:
                key = f"{prefix}.{i}.{name}"
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name)
                wrapped = AdapterLinear(module, key, router)
                setattr(parent, attr, wrapped)
                router.layers[key] = wrapped
                head = key.rsplit(".", 1)[0]
                if attr == "qkv_proj":
                    q = parent.n_heads * parent.head_dim
                    kv = parent.n_kv_heads * parent.head_dim
                    sizes = (q, kv, kv)
                elif attr == "gate_up_proj":
                    sizes = (module.out_features // 2,) * 2
                else:
                    router.parts[key] = (key, 0, module.out_features)
                    continue
                offset = 0
                for part, size in zip(FUSED[attr], sizes, strict=True):
                    router.parts[f"{head}.{part}"] = (key, offset, size)
                    offset += size
        return router

    def load(self, name: str, folder: str | os.PathLike[str]) -> Adapter:
        """Read the PEFT adapter in ``folder`` for the wrapped layers; checks every weight."""
        config, tensors = read_adapter(folder)
        r, alpha, rslora = _scaling(config)
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            base, _, which = key.rpartition(".lora_")
            if base not in self.parts or which not in ("A.weight", "B.weight"):
                raise AdapterError(
                    f"adapter weight {PEFT_PREFIX}{key} matches no linear layer of the decoder",
                    hint="per-request adapters cover the attention and MLP projections",
                )
            found.setdefault(base, {})[which[0]] = t
        per_layer: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
        for base, ab in sorted(found.items()):
            layer, offset, size = self.parts[base]
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None:
                raise AdapterError(
                    f"{Path(folder) / ADAPTER_WEIGHTS} has only one of {base}'s A and B"
                )
            module = self.layers[layer]
            if (
                a.dim() != 2
                or b.dim() != 2
                or a.shape[1] != module.in_features
                or b.shape != (size, a.shape[0])
            ):
                raise AdapterError(
                    f"adapter weights for {base} have shapes {list(a.shape)} and {list(b.shape)}; "
                    f"the model needs (r, {module.in_features}) and ({size}, r)",
                    hint="was the adapter trained on a different base model?",
                )
            per_layer.setdefault(layer, []).append((offset, size, a.float(), b.float() * scaling))
        weights = {}
        for layer, pieces in per_layer.items():
            module = self.layers[layer]
            device = _device_of(module.base_layer)
            rank = sum(a.shape[0] for _, _, a, _ in pieces)
            a_all = torch.cat([a for _, _, a, _ in pieces])  # (R, in)
            b_all = torch.zeros(module.out_features, rank)  # (out, R), block-diagonal
            r0 = 0
            for offset, size, a, b in pieces:
                b_all[offset : offset + size, r0 : r0 + a.shape[0]] = b
                r0 += a.shape[0]
            weights[layer] = (a_all.to(device), b_all.to(device))
        if not weights:
            raise AdapterError(f"{Path(folder) / ADAPTER_WEIGHTS} holds no LoRA weights")
        return Adapter(name, weights)
