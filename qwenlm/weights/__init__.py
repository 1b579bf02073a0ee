"""Checkpoints of every supported format, opened into one shape: config, tokenizer, template and
tensors.

Every source is mapped onto the Hugging Face Qwen2 tensor names, so models load with no
per-format code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenlm.chat.template import ChatTemplate
from qwenlm.config import ModelConfig
from qwenlm.errors import ChatTemplateError, CheckpointError, ModelNotFoundError
from qwenlm.tokenizer import Tokenizer
from qwenlm.weights import gguf as gguf_format
from qwenlm.weights import qwen1
from qwenlm.weights import safetensors as st_format

# generation_config.json keys that qwenlm's GenerationConfig understands.
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


@dataclass
class Checkpoint:
    """An opened checkpoint. Call :meth:`tensors` once to stream its weights, then :meth:`close`."""

    path: Path
    format: str  # "gguf" or "hf"
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    quantization: dict[str, Any] | None = None  # config.json's quantization_config
    qwen1: bool = False  # Qwen1 tensor names, mapped onto Qwen2's by weights/qwen1.py
    _gguf: gguf_format.GGUFFile | None = None
    _pieces: dict[str, gguf_format.Piece] | None = None  # where each HF tensor lies in _gguf
    _shards: dict[str, Path] | None = None
    _raw_shapes: dict[str, tuple[int, ...]] | None = None  # Qwen1 names, for read()

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, one at a time, under Hugging Face names."""
        if self._gguf is not None:
            return gguf_format.iter_tensors(self._gguf, dtype)
        if self.qwen1:
            return qwen1.map_tensors(st_format.iter_tensors(self.path, dtype))
        return st_format.iter_tensors(self.path, dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape by Hugging Face name, without reading any data."""
        if self._gguf is not None:
            return {hf: piece.shape for hf, piece in self._gguf_pieces().items()}
        if self.qwen1:
            return qwen1.map_shapes(st_format.shapes(self.path))
        return st_format.shapes(self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor as float32 (integer tensors as stored), optionally only rows start..stop."""
        if self._gguf is not None:
            pieces = self._gguf_pieces()
            if name not in pieces:
                raise CheckpointError(f"tensor {name} is not in {self.path}")
            return gguf_format.read(self._gguf, pieces[name], torch.float32, rows)
        if self._shards is None:
            self._shards = st_format.locate(self.path)
        if self.qwen1:
            if self._raw_shapes is None:
                self._raw_shapes = st_format.shapes(self.path)
            return qwen1.read_mapped(self._read_hf, self._raw_shapes, name, rows)
        return self._read_hf(name, rows)

    def _gguf_pieces(self) -> dict[str, gguf_format.Piece]:
        assert self._gguf is not None
        if self._pieces is None:
            self._pieces = gguf_format.tensor_map(self._gguf)
        return self._pieces

    def stored_types(self) -> set[int]:
        """The ggml types of a GGUF file's tensors (empty for other formats)."""
        if self._gguf is None:
            return set()
        return {info.ggml_type for info in self._gguf.tensors.values()}

    def read_raw(self, name: str, rows: tuple[int, int] | None = None) -> tuple[int, torch.Tensor]:
        """A GGUF matrix as stored: its ggml type and rows start..stop of its bytes."""
        if self._gguf is None:
            raise CheckpointError(f"{self.path} is not a GGUF file: it has no stored block formats")
        piece = self._gguf_pieces().get(name)
        if piece is None:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        n = piece.shape[0]
        a, b = rows if rows is not None else (0, n)
        if not 0 <= a <= b <= n or piece.rows != n:
            raise CheckpointError(f"tensor {name}: rows {rows} cannot be read as stored")
        info = self._gguf.tensors[piece.name]
        return info.ggml_type, self._gguf.raw_rows(piece.name, (piece.start + a, piece.start + b))

    def _read_hf(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        assert self._shards is not None
        if name not in self._shards:
            raise CheckpointError(f"tensor {name} is not in {self.path}")
        return st_format.read(self._shards[name], name, rows)

    def close(self) -> None:
        if self._gguf is not None:
            self._gguf.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checked(ckpt: Checkpoint, declared: dict[str, Any]) -> Checkpoint:
    """Refuse, at load, what would otherwise fail or misbehave on a request later.

    ``declared``: the token ids the checkpoint itself names (eos, bos), by where they are set.
    """
    vocab = ckpt.config.vocab_size
    declared = {
        **declared,
        "the tokenizer's eos token": ckpt.tokenizer.eos_token_id,
        "generation_config.json eos_token_id": ckpt.generation_defaults.get("stop_token_ids"),
    }
    for what, values in declared.items():
        for i in values if isinstance(values, (list, tuple)) else [values]:
            if i is not None and not (type(i) is int and 0 <= i < vocab):
                raise CheckpointError(
                    f"{ckpt.path}: {what} {i!r} is outside the vocabulary (0..{vocab - 1})",
                    hint="the checkpoint's config and its vocabulary disagree",
                )
    if ckpt.chat_template is not None:
        try:
            ChatTemplate(ckpt.chat_template, ckpt.tokenizer)  # parses it and test-renders it
        except ChatTemplateError as e:
            raise CheckpointError(
                f"{ckpt.path}: the chat template in this checkpoint is unusable: {e.message}",
                hint="pass a trusted template instead (chat_template.jinja in a model folder)",
            ) from None
    return ckpt


def _declared_ids(config_json: dict[str, Any]) -> dict[str, Any]:
    return {f"config.json {k}": config_json.get(k) for k in ("eos_token_id", "bos_token_id")}


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a GGUF file or a Hugging Face model folder."""
    path = Path(path)
    if path.is_dir():
        return _open_hf_folder(path)
    if path.is_file():
        return _open_gguf(path)
    raise ModelNotFoundError(f"no such file or folder: {path}")


def _open_gguf(path: Path) -> Checkpoint:
    gf = gguf_format.GGUFFile(path)
    try:
        meta = gf.metadata
        emb = gf.tensors.get("token_embd.weight")
        if emb is None:
            raise CheckpointError(f"GGUF file {path} has no token_embd.weight tensor")
        config = ModelConfig.from_gguf(meta, vocab_size=emb.shape[0])
        # GGUF has no tie flag: a tied output head is stored by leaving output.weight out.
        config = dataclasses.replace(config, tie_word_embeddings="output.weight" not in gf.tensors)
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"GGUF vocabulary has {tokenizer.vocab_size} tokens but the embedding only "
                f"{config.vocab_size} rows"
            )
        template = meta.get("tokenizer.chat_template")
        # Qwen1 files get Qwen1's chat format and stops, as its folders do.
        qwen1_file = gf.architecture == "qwen"
        ckpt = Checkpoint(
            path=path,
            format="gguf",
            config=config,
            tokenizer=tokenizer,
            chat_template=template if isinstance(template, str) else None,
            generation_defaults=_qwen1_defaults(tokenizer, {}) if qwen1_file else {},
            name=meta.get("general.name"),
            qwen1=qwen1_file,
            _gguf=gf,
        )
        ids = {k: meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "bos_token_id")}
        return _checked(ckpt, ids)
    except BaseException:
        gf.close()
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _open_hf_folder(folder: Path) -> Checkpoint:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _open_gguf(ggufs[0])
        raise ModelNotFoundError(
            f"{folder} holds no config.json" + (f" and {len(ggufs)} GGUF files" if ggufs else ""),
            hint="pass a Hugging Face model folder or the path of one .gguf file",
        )
    raw = _read_json(folder / "config.json")
    if isinstance(raw, dict) and qwen1.is_qwen1(raw):
        return _open_qwen1_folder(folder, raw)
    config = ModelConfig.from_json_file(folder / "config.json")
    st_format.verify_digests(folder)
    tokenizer = Tokenizer.from_hf_folder(folder, vocab_size=config.vocab_size)
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        tc = _read_json(folder / "tokenizer_config.json").get("chat_template")
        if isinstance(tc, list):  # named templates: take the default one
            tc = next((t.get("template") for t in tc if t.get("name") == "default"), None)
        template = tc if isinstance(tc, str) else None
    defaults: dict[str, Any] = {}
    if (folder / "generation_config.json").is_file():
        gen = _read_json(folder / "generation_config.json")
        defaults = {k: gen[k] for k in _GENERATION_KEYS if k in gen}
        eos = gen.get("eos_token_id")
        if eos is not None:
            defaults["stop_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
    quantization = _read_json(folder / "config.json").get("quantization_config")
    ckpt = Checkpoint(
        path=folder,
        format="hf",
        config=config,
        tokenizer=tokenizer,
        chat_template=template,
        generation_defaults=defaults,
        name=folder.name,
        quantization=quantization if isinstance(quantization, dict) else None,
    )
    return _checked(ckpt, _declared_ids(raw))


def _open_qwen1_folder(folder: Path, raw: dict[str, Any]) -> Checkpoint:
    config = qwen1.qwen1_config(raw)
    if not (folder / "qwen.tiktoken").is_file():
        raise CheckpointError(f"Qwen1 folder {folder} has no qwen.tiktoken vocabulary")
    tokenizer = Tokenizer.from_tiktoken_file(folder / "qwen.tiktoken", vocab_size=config.vocab_size)
    gen = {}
    if (folder / "generation_config.json").is_file():
        gen = _read_json(folder / "generation_config.json")
    ckpt = Checkpoint(
        path=folder,
        format="hf",
        config=config,
        tokenizer=tokenizer,
        chat_template=None,
        generation_defaults=_qwen1_defaults(tokenizer, gen),
        name=folder.name,
        qwen1=True,
    )
    return _checked(ckpt, _declared_ids(raw))


def _qwen1_defaults(tokenizer: Tokenizer, gen: dict[str, Any]) -> dict[str, Any]:
    """Qwen1's generation defaults, updated from a generation_config.json's values ``gen``."""
    defaults = dict(qwen1.GENERATION_DEFAULTS)
    defaults.update({k: gen[k] for k in _GENERATION_KEYS if k in gen})
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    if isinstance(gen.get("max_window_size"), int):
        defaults["max_window_size"] = gen["max_window_size"]
    # Qwen1's chat() stops at the end or start of a turn, and at end of text.
    stops = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
    defaults["stop_token_ids"] = tuple(
        tokenizer.special_tokens[t] for t in stops if t in tokenizer.special_tokens
    )
    return defaults
