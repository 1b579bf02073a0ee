"""Training recipes: YAML files read into frozen dataclasses, every field overridable.

``load_recipe("recipes/identity-lora.yaml", overrides=["--optim.lr", "1e-4"])`` reads the file,
applies ``--section.key value`` overrides (values parsed as YAML), and checks every key and type,
so a typo fails before any model is loaded. Relative paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlm.errors import QwenlmError
from qwenlm.lora import ALL_LINEAR

TASKS = ("pretrain", "sft", "dpo")
METHODS = ("full", "lora", "qlora")


class RecipeError(QwenlmError):
    """A recipe file or override that is malformed or inconsistent."""


@dataclass(frozen=True)
class ScratchConfig:
    """A model built from nothing (``model: null``, task ``pretrain``)."""

    config: Mapping[str, Any] = field(default_factory=dict)  # config.json keys of the new model
    tokenizer: str = (
        "bytes"  # "bytes" (256 byte tokens + ChatML specials) or a model to take it from
    )
    vocab_limit: int | None = None  # keep that tokenizer's first N ordinary tokens (a smaller BPE)
    init_std: float = 0.02


@dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    format: str = "auto"  # auto (from content), qwen, openai, preference, text
    eval_fraction: float = 0.0  # held out of train when no eval files are given
    max_rejected: float = 0.0  # fraction of bad records skipped (each reported) instead of fatal
    max_seq_len: int = 1024
    packing: bool = False  # several examples per row, attention kept within each example
    cache_dir: str | None = None  # tokenized text corpora (default: the qwenlm cache)


@dataclass(frozen=True)
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False


@dataclass(frozen=True)
class QLoRAConfig:
    block_size: int = 64
    double_quant: bool = True


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO; 0 is the original loss


@dataclass(frozen=True)
class OptimConfig:
    # The Qwen reports' AdamW settings.
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 turns clipping off


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr`` at the last step."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class LoopConfig:
    steps: int | None = None  # optimizer steps; or give epochs
    epochs: float | None = None
    micro_batch_size: int = 4  # rows per forward pass on each process
    grad_accum: int = 1  # micro-batches per optimizer step on each process
    seed: int = 0
    activation_checkpointing: bool = False
    precision: str = "auto"  # auto (bfloat16 autocast on CUDA with bf16), float32, bf16-autocast
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations; 0: only at the end
    max_batches: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end and on SIGINT/SIGTERM
    keep: int = 2


@dataclass(frozen=True)
class LogConfig:
    every: int = 1
    progress: bool = True
    plot: bool = True


@dataclass(frozen=True)
class DistributedConfig:
    strategy: str = "ddp"  # ddp or fsdp (FSDP2, fully_shard per decoder layer)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass(frozen=True)
class Recipe:
    out: str
    task: str = "sft"
    method: str = "full"
    model: str | None = None  # registry name, .gguf or HF folder; null: from scratch
    dtype: str = "float32"  # dtype of the base weights
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str, hint: str | None = None) -> None:
            if not ok:
                raise RecipeError(f"recipe: {message}", hint=hint)

        need(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        need(
            self.method in METHODS,
            f"method must be one of {', '.join(METHODS)}, got {self.method!r}",
        )
        need(
            self.model is not None or self.task == "pretrain",
            f"task {self.task} needs a base model",
            hint="set model: to a registry name, .gguf file or Hugging Face folder",
        )
        need(
            self.model is not None or self.method == "full",
            f"method {self.method} adapts a base model, but model is null",
        )
        need(
            self.task != "dpo" or self.method in ("lora", "qlora"),
            "DPO's reference model is the base with the adapters switched off, so it needs "
            "method lora or qlora",
            hint="set method: lora",
        )
        need(self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16")
        need(bool(self.data.train), "data.train lists no files")
        need(
            self.data.format in ("auto", "qwen", "openai", "preference", "text"),
            f"data.format {self.data.format!r} is not auto, qwen, openai, preference or text",
        )
        need(0.0 <= self.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
        need(0.0 <= self.data.max_rejected < 1.0, "data.max_rejected must be in [0, 1)")
        need(self.data.max_seq_len >= 2, "data.max_seq_len must be at least 2")
        loop = self.train
        need(
            (loop.steps is None) != (loop.epochs is None),
            "give exactly one of train.steps and train.epochs",
        )
        need(loop.steps is None or loop.steps > 0, "train.steps must be positive")
        need(loop.epochs is None or loop.epochs > 0, "train.epochs must be positive")
        need(loop.micro_batch_size > 0, "train.micro_batch_size must be positive")
        need(loop.grad_accum > 0, "train.grad_accum must be positive")
        need(
            loop.precision in ("auto", "float32", "bf16-autocast"),
            f"train.precision must be auto, float32 or bf16-autocast, got {loop.precision!r}",
        )
        need(self.optim.lr > 0, "optim.lr must be positive")
        need(self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 is off)")
        need(0.0 <= self.schedule.min_lr_ratio <= 1.0, "schedule.min_lr_ratio must be in [0, 1]")
        need(self.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        need(self.lora.r > 0, "lora.r must be positive")
        need(0.0 <= self.lora.dropout < 1.0, "lora.dropout must be in [0, 1)")
        need(self.checkpoint.keep >= 1, "checkpoint.keep must be at least 1")
        need(self.checkpoint.every >= 0 and self.eval.every >= 0, "every must be >= 0")
        need(self.log.every >= 1, "log.every must be at least 1")
        need(
            self.distributed.strategy in ("ddp", "fsdp"),
            f"distributed.strategy must be ddp or fsdp, got {self.distributed.strategy!r}",
        )
        need(
            self.distributed.backend in ("auto", "gloo", "nccl"),
            f"distributed.backend must be auto, gloo or nccl, got {self.distributed.backend!r}",
        )
        need(self.dpo.beta > 0, "dpo.beta must be positive")
        need(
            self.qlora.block_size > 0 and self.qlora.block_size % 2 == 0,
            "qlora.block_size must be even",
        )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    # YAML-friendly: tuples as lists, mappings as dicts.
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# -- building from plain data ------------------------------------------------------------------
_UNFIT = object()  # what the coercions below return for a value that does not fit the type


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise RecipeError(f"recipe: {where} must be a mapping of keys, got {value!r}")
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp in (bool, int, float, str):
        out = _coerce_scalar(tp, value)
    elif origin is tuple:
        out = _coerce_tuple(args, value, where)
    elif origin in (Mapping, dict, typing.Mapping):
        out = dict(value) if isinstance(value, Mapping) else _UNFIT
    else:  # pragma: no cover - a field type this function was not taught
        raise TypeError(f"unsupported recipe field type {tp!r}")
    if out is _UNFIT:
        raise RecipeError(f"recipe: {where} must be {_type_name(tp)}, got {value!r}")
    return out


def _coerce_scalar(tp: type, value: Any) -> Any:
    """``value`` as a bool, int, float or str, also where YAML typed it otherwise."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    return _UNFIT


def _coerce_tuple(args: tuple[Any, ...], value: Any, where: str) -> Any:
    """``value`` (a list, or one string) as a tuple of ``args`` (``(T, ...)``: any length)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) == len(args):
            return tuple(
                _coerce(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
    return _UNFIT


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list"
    if typing.get_origin(tp) in (Mapping, dict):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp)
    )


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise RecipeError(
                f"recipe: unknown key {path!r}",
                hint=f"keys{' of ' + where if where else ''}: {', '.join(names)}",
            )
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise RecipeError(f"recipe: {where or 'top level'}: {e}") from None


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    if not isinstance(data, Mapping):
        raise RecipeError("recipe: the file must hold a mapping of keys")
    if "out" not in data:
        raise RecipeError("recipe: no 'out' folder given", hint="add out: runs/NAME, or --out PATH")
    return _build(Recipe, data, "")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--a.b value`` / ``--a.b=value`` pairs to nested ``data`` (values parsed as YAML)."""
    import yaml

    data = _plain(data)
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise RecipeError(
                f"expected an override --section.key VALUE, got {arg!r}",
                hint="for example: --optim.lr 1e-4 --train.steps 100",
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise RecipeError(f"override --{key} has no value")
            value = items[i + 1]
            i += 1
        i += 1
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = data
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override --{key}: {part} is not a section")
            node = child
        node[parts[-1]] = parsed
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise RecipeError(
            "reading recipes needs PyYAML", hint="pip install 'qwenlm[train]'"
        ) from None
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from None
    return data if data is not None else {}


def load_recipe(path: str | Path | None = None, *, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (or start from defaults when ``path`` is None) and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must hold a mapping of keys")
    return recipe_from_dict(apply_overrides(data, overrides))


def dump_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
