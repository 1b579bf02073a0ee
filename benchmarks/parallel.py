"""Tensor parallelism: decode time per token with the model split over 1, 2, ... processes.

    python benchmarks/parallel.py                       # TP=1 and TP=2, the default 0.5B
    python benchmarks/parallel.py --sizes 1 2 4 --tokens 64 --device cuda --quant none

Each size runs ``torchrun --nproc-per-node N`` on this script; rank 0 prefills one chat prompt
and decodes ``--tokens`` greedy tokens through the engine (the other ranks mirror its forward
passes), ``--rounds`` times, and reports the best milliseconds per token and the prefill time.
The script checks that every size produced the same tokens. On a CPU the ranks share the
machine's cores: each rank gets ``--threads`` threads (default: the cores divided by the
ranks), so no speed-up is expected there; the point is the cost of the all-reduces. Writes
parallel.md and parallel.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that checks whether a number is prime, with a docstring."


def rank_main(args: argparse.Namespace) -> None:
    """One rank of a torchrun launch: load split, decode, rank 0 prints one JSON line."""
    import torch

    import qwenlm
    from qwenlm.generation.generate import GREEDY, generate_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = qwenlm.load(
        args.model, device=args.device, quant=args.quant, dtype=args.dtype, tensor_parallel=world
    )
    if model.rank:
        model.follow()
        return
    ids = model.encode_chat([{"role": "user", "content": PROMPT}])
    best, prefill, tokens = float("inf"), float("inf"), []
    for _ in range(args.rounds):
        steps = generate_step(model.engine, ids, GREEDY)
        t0 = time.perf_counter()
        tokens = [next(steps)]  # the prompt's prefill
        t1 = time.perf_counter()
        tokens += [next(steps) for _ in range(args.tokens - 1)]  # one decode step each
        t2 = time.perf_counter()
        steps.close()
        prefill = min(prefill, t1 - t0)
        best = min(best, (t2 - t1) / max(1, args.tokens - 1))
    model.close()
    print(
        json.dumps(
            {
                "world": world,
                "threads": torch.get_num_threads(),
                "ms_per_token": round(best * 1000, 2),
                "prefill_s": round(prefill, 3),
                "prompt_tokens": len(ids),
                "tokens": tokens,
                "device": str(model.device),
                "weights": model.weight_format,
            }
        ),
        flush=True,
    )


def launch(args: argparse.Namespace, world: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(world), __file__, "--rank-main", "--model", args.model]
    cmd += ["--device", args.device, "--quant", args.quant, "--dtype", args.dtype]
    cmd += ["--tokens", str(args.tokens), "--rounds", str(args.rounds)]
    import qwenlm

    # the ranks import the same qwenlm as this process (a checkout, not only an installed one)
    root = str(Path(qwenlm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // world))
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        sys.exit(f"TP={world} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quant", default="none", help="none (float PyTorch layers) or f32/int8/int4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, help="threads per rank (default: cores / ranks)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    from qwenlm.benchmark import machine_info

    results = [launch(args, n) for n in args.sizes]
    same = all(r["tokens"] == results[0]["tokens"] for r in results)
    lines = [
        f"# Tensor parallelism: {args.model}, {results[0]['weights']}, {results[0]['device']}",
        "",
        f"{json.dumps(machine_info())}",
        "",
        f"Greedy decode of {args.tokens} tokens after a {results[0]['prompt_tokens']}-token "
        f"prompt, best of {args.rounds}; identical tokens at every size: {same}.",
        "",
        "| ranks | threads per rank | ms / token | prefill s |",
        "|---|---|---|---|",
        *(
            f"| {r['world']} | {r['threads']} | {r['ms_per_token']} | {r['prefill_s']} |"
            for r in results
        ),
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel.md").write_text("\n".join(lines) + "\n")
    (out / "parallel.json").write_text(json.dumps(results, indent=1))
    if not same:
        sys.exit("the sizes produced different tokens")


if __name__ == "__main__":
    main()
