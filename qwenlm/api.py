"""The Python API: ``qwenlm.load`` and the model object it returns."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qwenlm import registry
from qwenlm.chat.qwen1 import Qwen1ChatTemplate
from qwenlm.chat.template import ChatTemplate
from qwenlm.config import ModelConfig
from qwenlm.errors import GenerationError
from qwenlm.generation.embed import Embedder
from qwenlm.generation.engine import KV_CACHE_CHOICES, Engine, SequenceState
from qwenlm.generation.fastpath import KernelLayer, accelerate
from qwenlm.generation.generate import (
    GenerationChunk,
    GenerationConfig,
    GenerationResult,
    Speculation,
    SpeculationStats,
    batch_generate,
    stream_generate,
)
from qwenlm.models import build_model, cuda_graph_safe
from qwenlm.quant import (
    MODES,
    QuantizationError,
    load_quantized,
    load_saved,
    quantize,
    release_freed_memory,
    runs_as_stored,
    to_device,
)
from qwenlm.tokenizer import Tokenizer
from qwenlm.weights import open_checkpoint

if TYPE_CHECKING:
    from qwenlm.lora import AdapterRouter

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


QUANT_CHOICES = ("auto", "none", *MODES)


def resolve_quant(quant: str, device: torch.device) -> str:
    """``auto`` is int8 on CPU (the native kernels' fastest mode at float32 quality; :func:`load`
    then picks gguf for a block-quantized GGUF file, see ``quant.runs_as_stored``) and
    ``none`` (plain PyTorch layers in ``dtype``) elsewhere. On other devices ``int8``,
    ``int4`` and ``f32`` keep their codes in device memory and dequantize each matrix per
    forward pass with PyTorch ops (less memory, not more speed)."""
    if quant not in QUANT_CHOICES:
        raise QuantizationError(
            f"unknown quantization {quant!r}", hint=f"use one of {', '.join(QUANT_CHOICES)}"
        )
    if quant == "auto":
        return "int8" if device.type == "cpu" else "none"
    if quant == "gguf" and device.type != "cpu":
        raise QuantizationError(
            "--quant gguf runs on the CPU only", hint="use int8, int4 or none on GPUs"
        )
    return quant


def resolve_kv_cache(kv_cache: str, mode: str, device: torch.device) -> str:
    """``auto`` is ``f16`` for a GGUF file's own formats on the CPU, as llama.cpp and Ollama
    keep it (half the memory, and the bytes a long decode step reads from the cache: 1.16x
    decode after 2,048 tokens, +0.04% perplexity, see docs/inference.md), else ``float``:
    the reference modes stay comparable with transformers."""
    if kv_cache not in KV_CACHE_CHOICES:
        raise GenerationError(
            f"unknown KV cache format {kv_cache!r}",
            hint=f"use one of {', '.join(KV_CACHE_CHOICES)}",
        )
    if kv_cache == "auto":
        return "f16" if mode == "gguf" and device.type == "cpu" else "float"
    return kv_cache


def load(
    model: str | os.PathLike[str] = registry.DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    quant: str = "auto",
    group_size: int = 32,
    kv_cache: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    pull: bool = False,
    adapter: str | os.PathLike[str] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    tensor_parallel: int = 1,
) -> Qwen:
    """Load a model by registry name, GGUF path or Hugging Face folder.

    ``quant`` picks the weight format: ``none`` (PyTorch layers in ``dtype``, the reference
    path), ``f32``, ``int8`` or ``int4`` (native CPU kernels; see :mod:`qwenlm.quant`), ``gguf``
    (a GGUF file's own block formats, as stored, on the native kernels), or ``auto``.
    ``pull=True`` fetches a registry model that is not in the cache yet. ``adapter``
    is a LoRA adapter folder (PEFT format, e.g. from ``qwenlm train``), folded into the weights
    before quantization. ``kv_cache="f16"`` keeps the attention cache in float16 (half the
    memory, and half the bytes a decode step reads at long contexts), ``"int8"`` in int8 (a
    quarter), ``"float"`` in float32; ``"auto"`` is f16 in ``gguf`` mode, else float (see
    :func:`resolve_kv_cache`). ``config_overrides`` replaces config values by their Hugging
    Face keys, e.g. long-context settings: ``{"rope_scaling": {"type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}}``, ``{"dual_chunk_attention_config": {...}}``,
    ``{"use_dynamic_ntk": True, "use_logn_attn": True, "seq_length": 8192}``.

    ``tensor_parallel=N`` splits the model over the N processes that torchrun started (see
    :mod:`qwenlm.parallel`; every process calls ``load`` alike). Rank 0 uses the model as
    usual and calls :meth:`Qwen.close` at the end; every other rank calls :meth:`Qwen.follow`,
    which runs rank 0's forward passes until then. Each rank reads the whole float checkpoint
    into CPU memory and keeps its slice; ``quant`` then quantizes each rank's slice.
    """
    path = registry.resolve(model, cache_dir=cache_dir, pull=pull)
    dist = _join_tensor_parallel(tensor_parallel, device)
    dev = dist.device if dist is not None else resolve_device(device)
    mode = resolve_quant(quant, dev)
    resolve_kv_cache(kv_cache, mode, dev)  # a bad name fails before the weights load
    dt = resolve_dtype(dtype, dev) if mode == "none" else torch.float32
    with open_checkpoint(path) as ckpt:
        if config_overrides:
            ckpt.config = ModelConfig.from_hf({**ckpt.config.to_hf(), **config_overrides})
        if dist is not None and (ckpt.quantization is not None or mode == "gguf"):
            raise QuantizationError(
                "tensor parallelism splits float weights, not a quantized checkpoint or "
                "--quant gguf's stored blocks",
                hint="load the float model; --quant int8 / int4 quantize each rank's part",
            )
        if (
            quant == "auto"
            and mode == "int8"
            and adapter is None
            and dist is None
            and ckpt.quantization is None
            and runs_as_stored(ckpt)
        ):
            mode = "gguf"  # a quantized GGUF file runs fastest in its own formats
        if ckpt.quantization is not None:
            # Saved by `qwenlm quantize`: its own format wins over `quant`.
            if adapter is not None:
                raise QuantizationError(
                    "an adapter cannot be applied to a quantized checkpoint",
                    hint="merge it into the float model first",
                )
            net = load_saved(ckpt)
            mode = net.quantization["mode"]
        elif mode != "none" and adapter is None and dist is None:
            # Straight from the file into quantized layers, a slice of rows at a time.
            net = load_quantized(ckpt, mode, group_size=group_size)
        else:
            # Tensor parallel: the whole model on the CPU first, each rank keeps its slice.
            place = "cpu" if dist is not None else dev
            net = build_model(ckpt.config, ckpt.tensors(dt), dtype=dt, device=place)
    if getattr(net, "quantization", None) is not None and dev.type != "cpu":
        net = to_device(net, dev)  # quantized layers are built on the CPU
    if adapter is not None:
        from qwenlm.lora import load_adapter, merge_lora

        # Folded in before anything else transforms the model, so every engine path sees it.
        load_adapter(net, adapter)
        merge_lora(net).eval()
    if dist is not None:
        from qwenlm.parallel import tensor_parallel as split

        net = split(net).to(dev)
    if mode != "none" and getattr(net, "quantization", None) is None:
        quantize(net, mode, group_size=group_size)
    if mode != "none":
        net.fuse_projections()
        accelerate(net)
    release_freed_memory()
    kv_cache = resolve_kv_cache(kv_cache, mode, dev)
    engine = None
    if dist is not None:
        from qwenlm.generation.mirror import parallel_engine

        engine = parallel_engine(net, kv_cache=kv_cache)
    given_path = Path(os.fspath(model)).expanduser().exists()
    template = ChatTemplate(ckpt.chat_template, ckpt.tokenizer)
    if ckpt.qwen1:
        window = ckpt.generation_defaults.get("max_window_size", 6144)
        template = Qwen1ChatTemplate(ckpt.tokenizer, max_window_size=window)
    return Qwen(
        net,
        ckpt.tokenizer,
        template,
        generation_defaults=ckpt.generation_defaults,
        name=(ckpt.name or path.name) if given_path else str(model),
        path=path,
        kv_cache=kv_cache,
        engine=engine,
    )


def _join_tensor_parallel(size: int, device: str | torch.device) -> Any:
    """The process group for ``tensor_parallel=size`` (None for 1), joined from torchrun's
    environment; its size must be the world's."""
    if size == 1:
        return None
    from qwenlm.parallel import DistributedError, setup

    if size < 1:
        raise DistributedError(f"tensor_parallel must be at least 1, got {size}")
    d = setup(device=str(device))
    if d.world != size:
        raise DistributedError(
            f"tensor parallelism over {size} ranks needs {size} processes, but this is one of "
            f"{d.world}",
            hint=f"start it with torchrun --nproc-per-node {size} -m qwenlm ...",
        )
    return d


class Qwen:
    """A loaded model with its tokenizer and chat template.

    Strings out: ``chat`` / ``chat_stream`` (text deltas) follow the Qwen model cards;
    ``generate`` completes raw text. Chunks out (:class:`GenerationChunk`: text, token ids,
    finish reason, counts, logprobs): ``chat_chunks`` and ``generate_chunks``, the streams the
    CLI and other surfaces build on. ``batch`` completes many prompts together.
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
        kv_cache: str = "float",
        engine: Engine | None = None,
    ) -> None:
        self.model = model
        self.engine = engine or Engine(
            model, kv_cache=kv_cache, cuda_graphs=cuda_graph_safe(model.config)
        )
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
        return self.engine.device

    @property
    def weight_format(self) -> str:
        """``int8``, ``int4 (group 32)``, ``f32`` for kernel models, else the parameter dtype."""
        q = getattr(self.model, "quantization", None)
        if q:
            return q["mode"] + (f" (group {q['group_size']})" if q["mode"] == "int4" else "")
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def rank(self) -> int:
        """This process's rank in a tensor-parallel group (0 when the model is not split)."""
        shard = getattr(self.model, "shard", None)
        return shard.rank if shard is not None else 0

    def follow(self) -> None:
        """Ranks other than 0 of a tensor-parallel model: run rank 0's forward passes until
        rank 0 calls :meth:`close`."""
        follow = getattr(self.engine, "follow", None)
        if follow is None:
            raise GenerationError("follow() is for ranks other than 0 of a tensor-parallel model")
        follow()

    def close(self) -> None:
        """Rank 0 of a tensor-parallel model: release the other ranks (no-op otherwise)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

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

    def enable_adapters(self) -> AdapterRouter:
        """Let requests choose LoRA adapters (``Request(adapter=...)``, the server's
        ``--lora``): wraps the decoder's linear layers once; returns the router whose
        :meth:`~qwenlm.lora.AdapterRouter.load` reads PEFT adapters for them. Rows without an
        adapter compute exactly as before."""
        if self.engine.adapters is None:
            from qwenlm.lora import AdapterRouter

            layers = self.model.model.layers
            blocks = [b.layer if isinstance(b, KernelLayer) else b for b in layers]
            self.engine.adapters = AdapterRouter.wrap(blocks)
        return self.engine.adapters

    def new_sequence(self) -> SequenceState:
        """A sequence state to pass as ``sequence=``: follow-up prompts that start with what it
        holds (the next turn of a conversation) prefill only the rest."""
        return self.engine.new_sequence()

    # -- raw ids ---------------------------------------------------------------------------
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Next-token logits (T, vocab), float32, for every position of the token ids ``ids``,
        computed the way generation prefills them (the same numbers on every surface)."""
        prompt = torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()
        if not prompt:
            raise GenerationError("logits() needs at least one token id")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise GenerationError(f"token ids must be in 0..{self.config.vocab_size - 1}")
        return self.engine.prefill(self.engine.new_sequence(), prompt, all_logits=True)

    # -- embeddings ------------------------------------------------------------------------
    def embedder(self, inputs: Sequence[str | Sequence[int]]) -> Embedder:
        """An :class:`~qwenlm.generation.embed.Embedder` for ``inputs`` (texts, encoded as plain
        text, or token ids), to step one forward pass at a time (the server does)."""
        return Embedder(self.engine, [self._ids(x) for x in inputs])

    def embed(self, inputs: str | Sequence[str | Sequence[int]]) -> torch.Tensor:
        """Unit-length embeddings, (len(inputs), hidden) float32 (one row for a single string):
        the mean of the final hidden states over each input's tokens, inputs run together."""
        items = [inputs] if isinstance(inputs, str) else list(inputs)
        embedder = self.embedder(items)
        while not embedder.step():
            pass
        return embedder.result()

    # -- completion of raw text ------------------------------------------------------------
    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return (
            self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        )

    def speculation(
        self,
        draft: Qwen | None = None,
        *,
        prompt_lookup: bool = False,
        num_draft: int | None = None,
        stats: SpeculationStats | None = None,
    ) -> Speculation | None:
        """Speculative decoding settings for ``speculate=``: a draft model or prompt lookup.
        ``num_draft`` caps the guesses a pass (default 5 with a draft model, 7 for lookup)."""
        if draft is None and not prompt_lookup:
            return None
        if draft is not None and draft.tokenizer.vocab_size != self.tokenizer.vocab_size:
            raise GenerationError(
                "the draft model uses a different tokenizer", hint="pick a draft of the same family"
            )
        return Speculation(
            draft=draft.engine if draft is not None else None, num_draft=num_draft, stats=stats
        )

    def generate_chunks(
        self,
        prompt: str | Sequence[int],
        *,
        sequence: SequenceState | None = None,
        speculate: Speculation | None = None,
        **options: Any,
    ) -> Iterator[GenerationChunk]:
        """Chunks completing ``prompt`` (text is encoded as plain text; give ids for control
        tokens)."""
        return stream_generate(
            self.engine,
            self.tokenizer,
            self._ids(prompt),
            self.generation_config(**options),
            sequence=_sequence(sequence, options),
            speculation=speculate,
        )

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str:
        """The completion of ``prompt`` as one string (collects :meth:`generate_chunks`)."""
        return "".join(chunk.text for chunk in self.generate_chunks(prompt, **options))

    def batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        speculate: Speculation | None = None,
        **options: Any,
    ) -> list[GenerationResult]:
        """Complete every prompt, decoding them together (weights are read once per step for
        all); each result equals what :meth:`generate_chunks` gives for that prompt alone."""
        return batch_generate(
            self.engine,
            self.tokenizer,
            [self._ids(p) for p in prompts],
            self.generation_config(**options),
            speculation=speculate,
        )

    # -- chat -------------------------------------------------------------------------------
    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Prompt ids for a conversation, rendered with the model's own chat template.

        ``template_kwargs`` reach the template as variables, e.g. ``enable_thinking=False``
        for Qwen3's."""
        return self.template.encode(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def chat_chunks(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        sequence: SequenceState | None = None,
        speculate: Speculation | None = None,
        **options: Any,
    ) -> Iterator[GenerationChunk]:
        """Chunks of the assistant's reply to ``messages`` (OpenAI-style role/content dicts)."""
        ids = self.encode_chat(messages, tools=tools)
        return stream_generate(
            self.engine,
            self.tokenizer,
            ids,
            self.generation_config(**options),
            sequence=_sequence(sequence, options),
            speculation=speculate,
        )

    def chat_stream(
        self, query: str, history: History | None = None, system: str | None = None, **options: Any
    ) -> Iterator[str]:
        """Text deltas of the reply to ``query`` after ``history`` (pairs or message dicts)."""
        messages = _messages(query, history, system)
        for chunk in self.chat_chunks(messages, **options):
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

    # -- deprecated names --------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[GenerationChunk]:
        """Deprecated: use :meth:`generate_chunks`."""
        _deprecated("stream", "generate_chunks")
        return self.generate_chunks(prompt, **options)

    def stream_chat(
        self, messages: Sequence[Mapping[str, Any]], **options: Any
    ) -> Iterator[GenerationChunk]:
        """Deprecated: use :meth:`chat_chunks` (chunks; :meth:`chat_stream` yields strings)."""
        _deprecated("stream_chat", "chat_chunks")
        return self.chat_chunks(messages, **options)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"Qwen.{old} is deprecated; use Qwen.{new}", DeprecationWarning, stacklevel=3)


def _sequence(sequence: SequenceState | None, options: dict[str, Any]) -> SequenceState | None:
    """``sequence=``, or its old name ``cache=`` (deprecated), taken out of ``options``."""
    if "cache" in options:
        warnings.warn("cache= is deprecated; use sequence=", DeprecationWarning, stacklevel=3)
        old = options.pop("cache")
        sequence = sequence if sequence is not None else old
    return sequence


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
