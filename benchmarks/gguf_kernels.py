"""Microbenchmark of the GGUF block-format kernels: rows per pass and bytes per second.

For each format, one matrix larger than the last-level cache (random blocks) is multiplied by
1, 4, 8 and 16 input rows; the script prints the cost of each row count relative to one row
(the multi-row kernels' point: one read of the weights serves every row), the weight bytes read
per second for one row, and the machine's read bandwidth (a float32 sum over 1 GB) for scale.
Times are the minimum of several repeats, so a shared machine's noise inflates them less.

    python benchmarks/gguf_kernels.py [--threads 2] [--isa avx2] [--formats Q5_0 Q8_0]
                                     [--counts 2 3 4 5 6 7 8 16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from gguf import GGML_QUANT_SIZES

from qwenlm.kernels import cpu_kernels
from qwenlm.quant.gguf import KINDS, GGUFLinear, pack


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(repeats: int) -> float:
    x = torch.ones(1 << 28)  # 1 GiB of float32
    return x.numel() * 4 / best_time(x.sum, repeats) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", help="force an instruction-set level (QWENLM_ISA)")
    p.add_argument("--rows", type=int, default=12288, help="output rows of each matrix")
    p.add_argument("--cols", type=int, default=8192, help="input length of each matrix")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--formats", nargs="+", metavar="NAME", help="only these formats (Q4_0 ...)")
    p.add_argument("--counts", type=int, nargs="+", default=[4, 8, 16], help="row counts beside 1")
    args = p.parse_args(argv)
    if args.isa:
        os.environ["QWENLM_ISA"] = args.isa
    torch.set_num_threads(args.threads)
    lib = cpu_kernels()
    if lib is None:
        raise SystemExit("the native kernels are not available here")
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else "unknown CPU"
    print(f"{cpu}, kernels {lib.qlm_isa().decode()}, {args.threads} threads")
    print(f"read bandwidth: {read_bandwidth(args.repeats):.1f} GB/s (float32 sum over 1 GiB)")
    counts = [1, *(c for c in args.counts if c != 1)]
    heads = "".join(f"  {f'{c}/1':>4}" for c in counts[1:])
    print(f"format  matrix        MB   1-row ms  GB/s{heads}")
    g = torch.Generator().manual_seed(0)
    kinds = [k for k in KINDS if not args.formats or k.name in args.formats]
    if args.formats and len(kinds) != len(set(args.formats)):
        raise SystemExit(f"--formats: choose from {', '.join(k.name for k in KINDS)}")
    for qtype in kinds:
        per, size = GGML_QUANT_SIZES[qtype]
        N, K = args.rows, args.cols - args.cols % 256
        raw = torch.randint(0, 256, (N, K // per * size), dtype=torch.uint8, generator=g)
        layer = GGUFLinear([(qtype, N, pack(qtype, raw))], K, None)
        del raw
        times = {}
        for M in counts:
            x = torch.randn(M, K, generator=g)
            times[M] = best_time(lambda x=x, layer=layer: layer(x), args.repeats)
        mb = layer.qweight.numel() / 1e6
        ratios = "  ".join(f"{times[M] / times[1]:4.2f}" for M in counts[1:])
        print(
            f"{qtype.name:6}  {N}x{K}  {mb:6.1f}  {times[1] * 1e3:8.2f}  "
            f"{mb / 1e3 / times[1]:5.1f}  {ratios}"
        )


if __name__ == "__main__":
    main()
