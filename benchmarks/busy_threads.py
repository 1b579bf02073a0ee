"""Decode beside a busy process, with the thread governor and without, in one process.

    python benchmarks/busy_threads.py                      # default model, gguf, rows 1 4 8
    python benchmarks/busy_threads.py --rounds 7 --rows 1 --tokens 256

Each round measures, quietly and then beside one busy-loop process (compare.py's), the
default (decode steps use fewer threads while other processes hold the cores: the
ThreadGovernor of qwenlm/kernels/__init__.py) and ``QWENLM_ADAPT_THREADS=0`` (always all
--threads), in alternating order. A 1-row measurement is --tokens greedy tokens after a
1-token prompt (tokens/s); an N-row one is N sequences stepping together (ms a step). Prints
the medians of --rounds rounds, what each keeps of its quiet speed, and adaptive / fixed
beside the busy process (above 1: the governor helps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qwenlm

from compare import start_busy, stop  # this folder's: the same busy loop as compare.py --busy


def step_ms(model, rows: int, steps: int) -> float:
    """Milliseconds a decode step of ``rows`` sequences takes (after a 8-token prompt each)."""
    from qwenlm.benchmark import text_tokens

    engine = model.engine
    seqs = [engine.new_sequence() for _ in range(rows)]
    for s in seqs:
        engine.prefill(s, text_tokens(model, 8))
    t0 = time.perf_counter()
    for i in range(steps):
        engine.forward([(s, [100 + i]) for s in seqs])
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quant", default="gguf")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128, help="1-row: tokens decoded (default 128)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    args = p.parse_args()

    import torch

    import qwenlm
    from qwenlm.benchmark import measure_decode

    torch.set_num_threads(args.threads)
    model = qwenlm.load(args.model, quant=args.quant)
    got: dict[tuple[int, bool, str], list[float]] = {}
    for r in range(args.rounds):
        for busy in (False, True):
            spinner = start_busy(600) if busy else None
            try:
                time.sleep(0.3)
                for adapt in ("1", "0") if r % 2 == 0 else ("0", "1"):
                    os.environ["QWENLM_ADAPT_THREADS"] = adapt
                    for rows in args.rows:
                        if rows == 1:
                            v = measure_decode(model, context=0, tokens=args.tokens)
                            value = v["decode_tok_s"]
                        else:
                            value = step_ms(model, rows, max(8, args.tokens // rows))
                        got.setdefault((rows, busy, adapt), []).append(value)
            finally:
                if spinner is not None:
                    stop(spinner)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"{args.model} ({args.quant}), {args.threads} threads, medians of {args.rounds}")
    print(
        "| rows | unit | adaptive quiet / busy | kept | fixed quiet / busy | kept "
        "| busy: adaptive vs fixed |"
    )
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        med = {k[1:]: statistics.median(v) for k, v in got.items() if k[0] == rows}
        speed = {k: v if rows == 1 else 1 / v for k, v in med.items()}  # higher is faster
        unit = "tok/s" if rows == 1 else "ms/step"
        print(
            f"| {rows} | {unit} | {med[(False, '1')]:.1f} / {med[(True, '1')]:.1f} | "
            f"{speed[(True, '1')] / speed[(False, '1')]:.0%} | "
            f"{med[(False, '0')]:.1f} / {med[(True, '0')]:.1f} | "
            f"{speed[(True, '0')] / speed[(False, '0')]:.0%} | "
            f"{speed[(True, '1')] / speed[(True, '0')]:.2f}x |"
        )


if __name__ == "__main__":
    main()
