"""Hugging Face model folders: config.json plus one or many ``*.safetensors`` files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from qwenlm.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, from the index file when there is one."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"malformed {index}: {e}") from None
        files = []
        for name in names:
            # The index comes from the folder, so it must not point outside of it.
            if not isinstance(name, str) or Path(name).name != name:
                raise CheckpointError(f"{index} names an invalid shard file {name!r}")
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{index} lists {name}, which is missing from {folder}",
                    hint="download the model folder again",
                )
            files.append(folder / name)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = "convert it to safetensors" if pickles else None
        what = (
            f"only pickle files ({', '.join(sorted(pickles))}), which qwenlm never loads"
            if pickles
            else "no *.safetensors files"
        )
        raise CheckpointError(f"model folder {folder} has {what}", hint=hint)
    return files


def iter_tensors(
    folder: Path, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, one tensor at a time, cast to ``dtype``."""
    seen: set[str] = set()
    for path in shard_files(folder):
        try:
            # safetensors validates the header (offsets inside the file, no overlaps) itself.
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in seen:
                        raise CheckpointError(f"tensor {name} appears in more than one shard")
                    seen.add(name)
                    t = f.get_tensor(name)
                    yield name, t.to(dtype) if t.is_floating_point() else t
        except CheckpointError:
            raise
        except Exception as e:  # the Rust reader raises its own error types
            raise CheckpointError(
                _malformed(path, e),
                hint="the file may be truncated or corrupt; download it again",
            ) from None


def _malformed(path: Path, e: Exception) -> str:
    """The error for a file the safetensors reader refused, with the first line of its reason."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"malformed safetensors file {path}: {reason}"


def locate(folder: Path) -> dict[str, Path]:
    """Which shard file holds each tensor."""
    where: dict[str, Path] = {}
    for path in shard_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    where[name] = path
        except Exception as e:
            raise CheckpointError(_malformed(path, e)) from None
    return where


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, path in locate(folder).items():
        with safe_open(str(path), framework="pt") as f:
            out[name] = tuple(f.get_slice(name).get_shape())
    return out


def read(path: Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Tensor ``name`` of shard ``path`` (float32 if floating point), or rows start..stop of it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
    except Exception as e:
        raise CheckpointError(_malformed(path, e)) from None
    return t.float() if t.is_floating_point() else t
