"""Two versions of the native kernels side by side in one process: a kernel change, measured.

    python benchmarks/kernel_ab.py                          # HEAD's cpu_kernels.c against yours
    python benchmarks/kernel_ab.py --old main~3 --formats Q5_0 Q8_0 --counts 1 2 3 4 8
    python benchmarks/kernel_ab.py --old /tmp/variant.c --rows 12288 --cols 8192

Both sources are compiled with the flags of one instruction-set level (--isa, default the best
this CPU runs) and loaded together; each format's matrix (random blocks, packed by this
checkout's `qwenlm.quant.gguf.pack`) runs through one library, then the other, for every row
count, --rounds times, and the minimum of each is kept: on a shared machine the host's slow
minutes fall on both alike. The default matrix (2048 x 4096) stays in the last-level cache,
so the times are the kernels' arithmetic; a large one (--rows 12288 --cols 8192) measures
them against memory. Prints each time and old / new (above 1: the new code is faster), and
whether the outputs are bit-identical (NaN equal to NaN: random scales include them). A
change of the packed layout makes them differ, and the old library then reads the new layout:
its time is still its work, its output meaningless.

A developer's tool: it builds the libraries the way qwenlm.kernels does, from its private
tables of flags and signatures.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from gguf import GGML_QUANT_SIZES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qwenlm

from gguf_kernels import best_time  # this folder's: the same timing as the per-format table

import qwenlm.kernels as kernels
import qwenlm.quant.linear as linear
from qwenlm.quant.gguf import KINDS, GGUFLinear, pack

ROOT = Path(__file__).resolve().parent.parent


def source_of(ref: str) -> str:
    """A file's text, or cpu_kernels.c at a git revision."""
    if Path(ref).is_file():
        return Path(ref).read_text()
    cmd = ["git", "show", f"{ref}:qwenlm/kernels/cpu_kernels.c"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"--old {ref!r} is neither a file nor a git revision: {done.stderr}")
    return done.stdout


def build(source: str, level: str, folder: Path, name: str) -> ctypes.CDLL:
    c_file, lib_file = folder / f"{name}.c", folder / f"{name}.so"
    c_file.write_text(source)
    cmd = ["cc", *kernels.FLAGS, *kernels._ISA[level][0], str(c_file), "-o", str(lib_file), "-lm"]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(lib_file))
    for fn_name, argtypes in kernels._SIGNATURES.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = argtypes, None
    for fn_name, restype in kernels._RESTYPES.items():
        fn = getattr(lib, fn_name)
        fn.argtypes, fn.restype = kernels._ARGTYPES[fn_name], restype
    return lib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="HEAD", help="a git revision or a .c file (default HEAD)")
    p.add_argument("--new", default=str(ROOT / "qwenlm/kernels/cpu_kernels.c"))
    p.add_argument("--formats", nargs="+", default=["Q5_0", "Q8_0", "Q4_K", "Q6_K"])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="input rows")
    p.add_argument("--rows", type=int, default=2048, help="output rows of each matrix")
    p.add_argument("--cols", type=int, default=4096, help="input length (a multiple of 256)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", help="instruction-set level (default: the best this CPU runs)")
    args = p.parse_args(argv)
    levels = kernels.runnable_isas()
    level = args.isa or next((x for x in kernels._PREFERRED if x in levels), None)
    if level not in levels:
        raise SystemExit(f"--isa: this CPU runs {', '.join(levels) or 'no native level'}")
    names = {k.name: k for k in KINDS}
    if unknown := [f for f in args.formats if f not in names]:
        raise SystemExit(f"--formats {unknown}: choose from {', '.join(names)}")
    if args.cols % 256:
        raise SystemExit("--cols must be a multiple of 256 (the K-quants' super-block)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {
            "old": build(source_of(args.old), level, Path(tmp), "old"),
            "new": build(Path(args.new).read_text(), level, Path(tmp), "new"),
        }
        print(f"kernels {level}, {args.threads} threads; old {args.old}, new {args.new}")
        g = torch.Generator().manual_seed(0)
        for name in args.formats:
            qtype = names[name]
            per, size = GGML_QUANT_SIZES[qtype]
            raw = torch.randint(
                0, 256, (args.rows, args.cols // per * size), dtype=torch.uint8, generator=g
            )
            layer = GGUFLinear([(qtype, args.rows, pack(qtype, raw))], args.cols, None)
            xs = {m: torch.randn(m, args.cols, generator=g) for m in args.counts}
            best = {(v, m): float("inf") for v in libs for m in args.counts}
            outs = {}
            for _ in range(args.rounds):
                for v, lib in libs.items():
                    linear.cpu_kernels = lambda isa=None, lib=lib: lib
                    for m in args.counts:
                        best[v, m] = min(best[v, m], best_time(lambda f=layer, x=xs[m]: f(x), 3))
                        outs[v, m] = layer(xs[m])
            same = all(
                torch.allclose(outs["old", m], outs["new", m], rtol=0, atol=0, equal_nan=True)
                for m in args.counts
            )
            print(f"{name} {args.rows}x{args.cols}: {'bit-identical' if same else 'DIFFERENT'}")
            for m in args.counts:
                old, new = best["old", m] * 1e3, best["new", m] * 1e3
                print(f"  {m:2d} rows: old {old:8.3f} ms  new {new:8.3f} ms  {old / new:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
