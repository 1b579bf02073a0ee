"""Hugging Face model folders: config.json plus one or many ``*.safetensors`` files.

Every shard's header is checked here, against the format, before the safetensors library
reads it: its length against the file, strict UTF-8 JSON with no duplicate names, and each
tensor's dtype, shape and byte range (contiguous, inside the file, exactly the bytes its shape
needs). A crafted header is a clean :class:`CheckpointError`, and nothing larger than the
header is read or allocated for it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwenlm.errors import CheckpointError
from qwenlm.fsutil import atomic_write
from qwenlm.strictjson import DuplicateKeyError, unique_keys

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # as the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors header; ``begin``/``end`` are offsets in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of safetensors file ``path``, from its header, checked against the format."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"malformed safetensors file {path}: {why}",
            hint="the file may be truncated, corrupt or crafted; download it again",
        )

    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise bad(f"a header of {n:,} bytes (at most {MAX_HEADER_BYTES:,})")
            if n > size - 8:
                raise bad(f"a header of {n:,} bytes in a file of {size:,}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=unique_keys, parse_constant=_no_constant
        )
    except UnicodeDecodeError as e:
        raise bad(f"the header is not UTF-8 (byte {e.start})") from None
    except DuplicateKeyError as e:
        raise bad(f"the header names {e.key!r} twice") from None
    except ValueError as e:
        raise bad(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    return _entries(header, size - 8 - n, bad)


def _entries(header: dict[str, Any], data: int, bad) -> dict[str, TensorEntry]:
    """Each tensor of a parsed header, and their byte ranges tiling the ``data`` bytes."""
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ must map names to strings")
            continue
        entries[name] = _entry(name, info, data, bad)
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else "leaves a gap before it"
            raise bad(f"tensor {name!r} {what} (offset {e.begin}, expected {pos})")
        pos = e.end
    if pos != data:
        raise bad(f"the tensors cover {pos:,} of the {data:,} data bytes")
    return entries


def _entry(name: str, info: object, data: int, bad) -> TensorEntry:
    if not isinstance(info, dict):
        raise bad(f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {name!r} has shape {shape!r}, not a list of sizes >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
    ):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        raise bad(f"tensor {name!r} has bytes {begin}..{end}, outside the {data:,}-byte data")
    need = math.prod(shape) * DTYPE_BYTES[dtype]  # Python integers: a huge shape cannot wrap
    if need != end - begin:
        raise bad(
            f"tensor {name!r} of shape {shape} {dtype} needs {need:,} bytes, has {end - begin:,}"
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def verify_digests(folder: Path) -> None:
    """Check the shards against the sha256 sums the index records (``metadata.sha256``, which
    qwenlm writes); folders without them are not checked."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    try:
        digests = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("sha256")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"malformed {index}: {e}") from None
    if not isinstance(digests, dict):
        return
    for name, want in digests.items():
        path = folder / str(name)
        if Path(str(name)).name != name or not path.is_file():
            raise CheckpointError(
                f"{index} lists a checksum for {name!r}, which is not a file here"
            )
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != want:
            raise CheckpointError(
                f"{path} does not match the sha256 recorded in {INDEX_FILE}",
                hint="the file changed after it was written; export or copy it again",
            )


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
        read_header(path)
        try:
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
        for name in read_header(path):
            if name in where:
                raise CheckpointError(f"tensor {name} appears in more than one shard")
            where[name] = path
    return where


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {
        name: entry.shape
        for path in shard_files(folder)
        for name, entry in read_header(path).items()
    }


def read(path: Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Tensor ``name`` of shard ``path`` (float32 if floating point), or rows start..stop of it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
    except Exception as e:
        raise CheckpointError(_malformed(path, e)) from None
    return t.float() if t.is_floating_point() else t


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file, atomically (a reader never sees half a file)."""
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(data, str(p), metadata=dict(metadata or {})))
