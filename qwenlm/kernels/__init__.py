"""Native CPU kernels, compiled on first use with the machine's C compiler and loaded by ctypes.

A plain C library (no PyTorch headers) builds in about a second, so users need nothing beyond
a compiler; the build is cached per source hash and compiler flags. Where it cannot be built
(no compiler, an unsupported CPU), :func:`cpu_kernels` returns None and callers use PyTorch ops.
Set ``QWENLM_KERNELS=0`` to force the PyTorch fallbacks.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm"]

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_f = ctypes.c_float
_SIGNATURES = {
    "qlm_linear_f32": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
    "qlm_linear_i8": [_p, _p, _int, _p, _p, _p, _i64, _i64, _i64, _p, _p, _int],
    "qlm_dequant_i8": [_p, _int, _p, _p, _i64, _i64, _int],
    "qlm_linear_i4": [_p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _p, _p, _int],
    "qlm_dequant_i4": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
    "qlm_add_rmsnorm": [_p, _p, _p, _p, _i64, _i64, _f],
    "qlm_rope": [_p, _i64, _i64, _i64, _i64, _p, _p],
    "qlm_attend_rows": [_p, _i64, _i64, _i64, _i64, _p, _p, _i64, _i64, _f, _p, _p, _int],
    "qlm_silu_mul": [_p, _p, _i64, _i64],
    "qlm_layer_forward": [_p, _p, _i64, _p, _p, _p, _i64, _int, _p, _p, _int],
    "qlm_attend_rows_q8": [
        _p,
        _i64,
        _i64,
        _i64,
        _i64,
        _p,
        _p,
        _p,
        _p,
        _i64,
        _i64,
        _f,
        _p,
        _p,
        _int,
    ],
}


def _build_dir() -> Path:
    from qwenlm.registry import cache_dir

    return cache_dir() / "kernels"


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename, so concurrent first uses never load half a file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@cache
def cpu_kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or is switched off."""
    if os.environ.get("QWENLM_KERNELS", "1") == "0" or platform.machine() not in (
        "x86_64",
        "AMD64",
    ):
        return None
    # -march=native code is CPU-specific: the cache key includes the CPU's feature flags.
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_flags().encode()
    ).hexdigest()[:16]
    lib_path = _build_dir() / f"qwenlm_cpu_{key}.so"
    try:
        if not lib_path.exists():
            _compile(lib_path)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError) as e:
        print(f"qwenlm: native CPU kernels unavailable ({e}); using PyTorch ops", file=sys.stderr)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    return lib


def num_threads() -> int:
    return torch.get_num_threads()
