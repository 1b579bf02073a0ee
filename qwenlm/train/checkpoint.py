"""Checkpoints that survive being killed at any moment.

A checkpoint is a folder ``step-NNNNNNNN`` of safetensors files (model, optimizer, RNG states)
and JSON (trainer state). Every file is written atomically (temporary file, fsync, rename);
the folder is assembled under a hidden ``.step-NNNNNNNN.partial`` name, sealed by a
``manifest.json`` holding each file's size and sha256, and committed by one rename. Loading takes
the newest folder whose manifest verifies and reports the ones it skipped, so a checkpoint
interrupted or corrupted on disk costs at most the steps since the one before it. Nothing is
pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from qwenlm.errors import QwenlmError
from qwenlm.fsutil import fsync_dir, sha256_file, write_json
from qwenlm.weights.safetensors import read_header

MANIFEST = "manifest.json"
_NAME = re.compile(r"step-(\d{8})")


class CheckpointCorrupt(QwenlmError):
    """A checkpoint folder whose files do not match its manifest."""


class CheckpointWriteError(QwenlmError):
    """A checkpoint could not be written (a full disk, say); the earlier ones are intact."""


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    read_header(path)  # a crafted or damaged header is refused before the library reads it
    try:
        return load_file(str(path))
    except Exception as e:  # the Rust reader raises its own error types
        raise CheckpointCorrupt(f"cannot read {path}: {e}") from None


# -- optimizer state <-> safetensors + JSON -------------------------------------------------------
def flatten_optimizer_state(
    osd: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict (``{"state": {fqn: {...}}, "param_groups": [...]}``) as
    tensors plus JSON-able values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{key}"] = value
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in osd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        fqn, _, key = name.rpartition("::")
        state.setdefault(fqn, {})[key] = t
    for fqn, entry in meta.get("scalars", {}).items():
        state.setdefault(fqn, {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- the folder of checkpoints --------------------------------------------------------------------
class Checkpoints:
    """The ``checkpoints/`` folder of a run: write (on the main process), verify, find, prune."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps of committed checkpoint folders, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.fullmatch(p.name))]
        return sorted(found, reverse=True)

    def begin(self, step: int) -> Path:
        """An empty hidden folder to write checkpoint ``step`` into."""
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".step-{step:08d}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        return partial

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Checkpoint ``step``: ``write(folder)`` fills a hidden folder, then :meth:`commit`.

        If anything fails (a full disk), the half-written folder is removed and
        :class:`CheckpointWriteError` says so; the checkpoints before are untouched.
        """
        partial = self.begin(step)
        try:
            write(partial)
            return self.commit(partial, step)
        except Exception as e:
            shutil.rmtree(partial, ignore_errors=True)
            before = [s for s in self.steps() if s != step]
            kept = f"checkpoint {self.path(before[0])} is intact" if before else "no checkpoint"
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise CheckpointWriteError(
                f"could not save checkpoint step {step} in {self.root}: {why}; {kept}",
                hint="free disk space, then continue with --resume",
            ) from None

    def commit(self, partial: Path, step: int) -> Path:
        """Seal ``partial`` with a manifest and rename it into place; prune old checkpoints."""
        files = {}
        for p in sorted(partial.iterdir()):
            if p.is_file() and p.name != MANIFEST:
                files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        write_json(partial / MANIFEST, {"step": step, "files": files})
        fsync_dir(partial)
        final = self.path(step)
        if final.exists():  # the same step saved again (an interrupt right after a save)
            old = self.root / f".step-{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(partial, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, final)
        fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        # Renamed out of sight first (one atomic step), then deleted: a kill in the middle of
        # a deletion leaves a hidden folder (clean_partials), never a step-N folder that
        # lost its manifest or some files.
        for step in self.steps()[self.keep :]:
            gone = self.root / f".step-{step:08d}.old"
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(self.path(step), gone)
            shutil.rmtree(gone, ignore_errors=True)

    def clean_partials(self) -> None:
        """Remove what a killed run left half-written."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".step-"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    def verify(self, path: Path) -> str | None:
        """None if every file matches the manifest, else what is wrong."""
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            files = manifest["files"]
        except FileNotFoundError:
            return "no manifest (the save did not finish)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable manifest: {e}"
        for name, info in files.items():
            p = path / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != info.get("size"):
                return f"{name} has {p.stat().st_size} bytes, the manifest says {info.get('size')}"
            if sha256_file(p) != info.get("sha256"):
                return f"{name} does not match its checksum"
        return None

    def latest(self, warn: Callable[[str], None] | None = None) -> Path | None:
        """The newest checkpoint that verifies; ``warn`` hears about each one skipped."""
        for step in self.steps():
            path = self.path(step)
            problem = self.verify(path)
            if problem is None:
                return path
            if warn:
                warn(f"checkpoint {path} is unusable ({problem}); trying the one before it")
        return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"cannot read {path}: {e}") from None
