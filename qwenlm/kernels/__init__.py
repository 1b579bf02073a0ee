"""Native CPU kernels, compiled on first use with the machine's C compiler and loaded by ctypes.

A plain C library (no PyTorch headers) builds in a few seconds, so users need nothing beyond
a compiler; each build is cached per source hash and instruction-set level. The source is
compiled once per level (:data:`ISA_LEVELS`), and the best level the CPU runs is chosen at run
time; ``QWENLM_ISA=scalar|avx2|avxvnni|avx512|avx512vnni`` forces one (tests run every level
the machine can). Where the library cannot be built (no compiler, not x86-64),
:func:`cpu_kernels` returns None and callers use PyTorch ops. ``QWENLM_KERNELS=0`` forces the
PyTorch fallbacks.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import torch

from qwenlm.errors import QwenlmError

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-pthread", "-shared", "-fPIC", "-std=c11"]

_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
_AVX512 = [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
# Compiler flags of each level, and the /proc/cpuinfo flags a CPU needs to run it.
_ISA = {
    "scalar": (["-march=x86-64"], set()),
    "avx2": (_AVX2, {"avx2", "fma", "f16c", "bmi2"}),
    "avxvnni": ([*_AVX2, "-mavxvnni"], {"avx2", "fma", "f16c", "bmi2", "avx_vnni"}),
    "avx512": (
        _AVX512,
        {"avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    ),
    "avx512vnni": (
        [*_AVX512, "-mavx512vnni"],
        {
            "avx2",
            "fma",
            "f16c",
            "bmi2",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512_vnni",
        },
    ),
}
ISA_LEVELS = tuple(_ISA)
_PREFERRED = ("avx512vnni", "avx512", "avxvnni", "avx2", "scalar")


class KernelError(QwenlmError):
    """A forced instruction-set level that is unknown or that this CPU cannot run."""


_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_int = ctypes.c_int
_f = ctypes.c_float
_SIGNATURES = {
    "qlm_linear": [_p, _p, _p, _i64, _p, _p, _int],
    "qlm_dequant_i8": [_p, _int, _p, _p, _i64, _i64, _int],
    "qlm_dequant_i4": [_p, _p, _p, _p, _i64, _i64, _i64, _int],
    "qlm_layer_forward": [_p, _p, _i64, _p, _p, _p, _i64, _int, _p, _p, _int],
    "qlm_stack_forward": [
        *(_p, _i64, _p, _i64, _p, _p, _p, _p, _i64, _int, _p, _p, _int),
        *(_p, _f, _p, _p, _i64, _p, _p),
    ],
}
_RESTYPES = {
    "qlm_isa": ctypes.c_char_p,
    "qlm_kind_name": ctypes.c_char_p,
    "qlm_layout": _i64,
    "qlm_act_floats": _i64,
    "qlm_embed_rows": _int,
    "qlm_run_delay_ns": _i64,
}
_ARGTYPES = {
    "qlm_isa": [],
    "qlm_kind_name": [_int],
    "qlm_layout": [ctypes.c_char_p],
    "qlm_act_floats": [_i64, _i64],
    "qlm_embed_rows": [_p, _p, _i64, _p],
    "qlm_run_delay_ns": [],
}


class Kind(enum.IntEnum):
    """How a linear part's weights are stored: cpu_kernels.c's QLM_* codes (one definition
    each side; a test checks them against the C names)."""

    F32 = 0
    I8 = 1
    I8_TILED = 2
    I4 = 3
    Q4_0 = 4
    Q4_1 = 5
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q4_K = 9
    Q5_K = 10
    Q6_K = 11


# ctypes mirrors of the C descriptors (a test checks sizes and offsets against the C ones).
class LinearDesc(ctypes.Structure):
    """qlm_linear_t: one stored matrix; ``next`` chains the parts of a fused projection."""


LinearDesc._fields_ = [
    ("kind", _i64),
    ("w", _p),
    ("scale", _p),
    ("mins", _p),
    ("bias", _p),
    ("N", _i64),
    ("K", _i64),
    ("G", _i64),
    ("next", ctypes.POINTER(LinearDesc)),
]


class LayerDesc(ctypes.Structure):
    """qlm_layer_t: a decoder layer's projections, norms and attention shape."""

    _fields_ = [
        ("qkv", LinearDesc),
        ("o", LinearDesc),
        ("gate_up", LinearDesc),
        ("down", LinearDesc),
        ("ln1", _p),
        ("ln2", _p),
        ("H", _i64),
        ("Hkv", _i64),
        ("D", _i64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class SegmentDesc(ctypes.Structure):
    """qlm_segment_t: one sequence's rows of a batch and its KV cache."""

    _fields_ = [
        ("start", _i64),
        ("T", _i64),
        ("cap", _i64),
        ("past", _i64),
        ("K", _p),
        ("V", _p),
        ("Ks", _p),
        ("Vs", _p),
    ]


def _build_dir() -> Path:
    from qwenlm.registry import cache_dir

    return cache_dir() / "kernels"


def _compile(out: Path, flags: list[str]) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename, so concurrent first uses never load half a file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *flags, str(SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@cache
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def runnable_isas() -> tuple[str, ...]:
    """The instruction-set levels this CPU can run, lowest first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ()
    flags = _cpu_flags()
    return tuple(level for level, (_, need) in _ISA.items() if need <= flags)


@cache
def _load(level: str) -> ctypes.CDLL | None:
    flags = _ISA[level][0]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + flags).encode()).hexdigest()[:16]
    lib_path = _build_dir() / f"qwenlm_cpu_{level}_{key}.so"
    try:
        if not lib_path.exists():
            _compile(lib_path, flags)
        lib = ctypes.CDLL(str(lib_path))
    except (OSError, RuntimeError) as e:
        print(f"qwenlm: native CPU kernels ({level}) unavailable ({e})", file=sys.stderr)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    for name, restype in _RESTYPES.items():
        fn = getattr(lib, name)
        fn.argtypes = _ARGTYPES[name]
        fn.restype = restype
    return lib


@cache
def _resolve(enabled: str, forced: str | None) -> ctypes.CDLL | None:
    if enabled == "0":
        return None
    levels = runnable_isas()
    if forced:
        if forced not in _ISA:
            raise KernelError(
                f"unknown QWENLM_ISA {forced!r}", hint=f"use one of {', '.join(ISA_LEVELS)}"
            )
        if forced not in levels:
            raise KernelError(
                f"this CPU cannot run the {forced} kernels (QWENLM_ISA)",
                hint=f"it runs: {', '.join(levels) or 'none'}",
            )
        return _load(forced)
    for level in _PREFERRED:
        if level in levels and (lib := _load(level)) is not None:
            return lib
    return None


def cpu_kernels(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library for ``isa`` (default: ``QWENLM_ISA``, else the best level
    this CPU runs), or None where it cannot be built or is switched off."""
    return _resolve(os.environ.get("QWENLM_KERNELS", "1"), isa or os.environ.get("QWENLM_ISA"))


def num_threads() -> int:
    """Threads the kernels use: torch's setting (``--threads``, ``torch.set_num_threads``)."""
    return torch.get_num_threads()


class ThreadGovernor:
    """How many of its threads a decode step uses: all of them on a quiet machine, fewer
    while other processes hold the cores.

    A decode step is ~200 short phases, each waiting for its slowest thread; a thread that
    loses its core to another process holds its phase up for a scheduler slice. Beside one
    busy-loop process on the 2-core EPYC, two threads decoded at 29 tokens/s and one at 35
    (quiet: 56 and 35), and 8-row steps took 104 ms on two threads, 82-92 on one. So every
    ``window_s`` seconds the governor reads how long its threads waited for a CPU
    (``read_delay``: summed nanoseconds, Linux's schedstat): above ``busy`` seconds a second,
    it drops to as many threads as the cores others leave free (at least one); every
    ``probe_s`` seconds it tries all threads again for one window, and keeps them if the
    wait is gone. Waiting costs nothing to measure with fewer threads, hence the probes.
    Prefill (long compute-bound phases that threads take over from one another) keeps all
    threads: it keeps more of its speed that way.
    """

    window_s = 0.25
    probe_s = 2.0
    busy = 0.25
    # A longer pause between two steps is not decoding (a prefill, an idle server): the wait
    # of PyTorch's and the kernels' own threads then says nothing of other processes, so
    # the window restarts instead of judging it.
    gap_s = 0.1

    def __init__(
        self,
        read_delay: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
    ) -> None:
        self.read_delay, self.clock = read_delay, clock
        self.cores = cores or len(os.sched_getaffinity(0))
        self.most = 0  # the thread count asked for (window state is reset when it changes)
        self.n = 0  # threads in use
        self.t0 = self.d0 = 0.0
        self.probe_at = 0.0
        self.last = 0.0  # the previous call
        self.off = False

    def threads(self, most: int) -> int:
        """Threads for the next step, ``most`` at the most."""
        if most <= 1 or self.off:
            return most
        now = self.clock()
        gap, self.last = now - self.last, now
        if most != self.most:
            d = self.read_delay()
            if d < 0:
                self.off = True  # the kernel keeps no schedstat: always all threads
                return most
            self.most, self.n, self.t0, self.d0 = most, most, now, d
            return most
        if gap > self.gap_s:
            self.t0, self.d0 = now, self.read_delay()
            return self.n
        if now - self.t0 >= self.window_s:
            d = self.read_delay()
            waited = (d - self.d0) / 1e9 / (now - self.t0)  # CPU-seconds waited a second
            if self.n == most:  # all threads (or a probe): are others holding the cores?
                if waited > self.busy:
                    self.n = self._fewer(waited)
                    self.probe_at = now + self.probe_s
            elif now >= self.probe_at:
                self.n = most
            self.t0, self.d0 = now, d
        return self.n

    def _fewer(self, waited: float) -> int:
        # n threads that each got cores / (n + k) of a CPU waited 1 - cores / (n + k) a second
        # each: k, the processes beside them, is what the cores then leave free.
        n = self.most
        share = 1 - min(waited / n, 0.95)
        others = self.cores / share - n
        return max(1, min(n - 1, round(self.cores - others)))


_GOVERNORS = threading.local()


def decode_threads(most: int) -> int:
    """Threads for a decode step on the native kernels: ``most`` (:func:`num_threads`), fewer
    while other processes hold the cores (:class:`ThreadGovernor`; ``QWENLM_ADAPT_THREADS=0``
    always uses all). One governor per calling thread: the wait it reads includes the
    caller's own."""
    if most <= 1 or os.environ.get("QWENLM_ADAPT_THREADS", "1") == "0":
        return most
    gov = getattr(_GOVERNORS, "gov", None)
    if gov is None:
        lib = cpu_kernels()
        if lib is None:
            return most
        gov = _GOVERNORS.gov = ThreadGovernor(lib.qlm_run_delay_ns)
    return gov.threads(most)


_HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64


def move_to_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Move CPU tensors' data into one block of memory that Linux backs with 2 MB pages
    (transparent huge pages, given to regions that ask for them with ``madvise``).

    Decoding streams every weight once per token; from 4 KB pages each page is a TLB miss,
    which under a hypervisor's nested page tables stalls the stream (single-thread reads of a
    64 MB matrix ran ~2.3x faster from 2 MB pages on the 2-core EPYC VM these kernels are
    measured on). Each tensor object keeps its identity (``Tensor.set_``), so every module
    sharing it sees the move. Returns the bytes moved: 0 where the OS offers no such pages.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    storages: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        if t.device.type == "cpu" and not t.is_sparse:
            group = storages.setdefault(t.untyped_storage().data_ptr(), [])
            if all(u is not t for u in group):
                group.append(t)
    offsets, total = {}, 0
    for ptr, group in storages.items():
        offsets[ptr] = total
        total += -(-group[0].untyped_storage().nbytes() // 64) * 64
    if not total:
        return 0
    # Private anonymous memory (shared memory follows another THP setting), 2 MB aligned.
    mm = mmap.mmap(-1, total + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive
    start = -base.data_ptr() % _HUGE_PAGE
    mm.madvise(mmap.MADV_HUGEPAGE, start, total)
    arena = base.untyped_storage()
    with torch.no_grad():
        for ptr, group in storages.items():
            old = group[0].untyped_storage()
            at = start + offsets[ptr]
            base[at : at + old.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(old))
            for t in group:
                size = t.element_size()
                t.set_(arena, (at + t.storage_offset() * size) // size, t.shape, t.stride())
    return total
