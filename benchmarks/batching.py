"""What one engine step with more rows costs, against a step with one row.

    python benchmarks/batching.py                         # default model, int8, rows 1 4 8 16
    python benchmarks/batching.py --quant int4 --rows 1 2 4 8 16 --repeats 9

Two kinds of step through qwenlm's Engine.forward, each the median of --repeats steps:
``batch``, a decode step of N sequences (one new token each, each after its own --context-token
prompt), the step continuous batching runs for N clients; and ``verify``, one sequence taking N
tokens at once with the logits of every row, the step that checks N speculative guesses.
Printed as milliseconds and as ratios to the 1-row step; issue 15 asks for at most 1.5x at 4
rows and 2.2x at 8. Writes batching.json and batching.md to --out.

``--peers llama.cpp ik_llama.cpp`` also times the verification step in mainline llama.cpp
(llama-cpp-python) and ik_llama.cpp (its wheel, run-time repacking as compare.py runs it) on
the same GGUF file, threads and prompt, each in a process of its own after qwenlm's: N tokens
evaluated at once with every row's logits, after the same --context-token prompt (re-fed,
untimed, before each step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qwenlm

# The done-when of issue 15: rows -> the most a step of that many rows may cost in 1-row steps.
TARGETS = {4: 1.5, 8: 2.2}


# The peers' engine classes in compare.py (this folder's), by name.
PEERS = {"llama.cpp": "_LlamaCppEngine", "ik_llama.cpp": "_IkLlamaEngine"}


def table(rows: list[dict], peers: dict[str, dict[int, float]] | None = None) -> str:
    peers = peers or {}
    head = "| rows | batched decode ms | x 1 row | verification ms | x 1 row |"
    head += "".join(f" {name} verification ms | x 1 row |" for name in peers)
    lines = [head + " target |", "|---" * (5 + 2 * len(peers) + 1) + "|"]
    for r in rows:
        target = TARGETS.get(r["rows"])
        line = (
            f"| {r['rows']} | {r['batch_s'] * 1e3:.1f} | {r['batch_ratio']:.2f}x | "
            f"{r['verify_s'] * 1e3:.1f} | {r['verify_ratio']:.2f}x |"
        )
        for got in peers.values():
            t, t1 = got.get(r["rows"]), got.get(1)
            line += f" {t * 1e3:.1f} | {t / t1:.2f}x |" if t and t1 else " - | - |"
        lines.append(line + (f" <= {target}x" if target else "") + " |")
    return "\n".join(lines)


def peer_worker(name: str, spec_file: str) -> None:
    """In a process of its own: a peer's verification steps, printed as JSON seconds by rows."""
    import compare  # this folder's

    spec = json.loads(Path(spec_file).read_text())
    rows, prompt, draft = spec["rows"], spec["prompt"], spec["draft"]
    engine = getattr(compare, PEERS[name])(spec, len(prompt) + max(rows) + 8, all_logits=True)
    times: dict[int, list[float]] = {n: [] for n in rows}
    for i in range(spec["repeats"] + 1):  # one warm-up round, then the kept ones
        for n in rows:
            engine.reset()
            engine.eval(prompt)
            t0 = time.perf_counter()
            engine.eval_all(draft[:n])
            if i:
                times[n].append(time.perf_counter() - t0)
    print(json.dumps({n: statistics.median(t) for n, t in times.items()}))


def run_peer(name: str, spec: dict) -> dict[int, float] | str:
    """A peer's medians by rows, or why it could not run (one line)."""
    from compare import worker_env

    env = worker_env(name, spec["threads"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        cmd = [sys.executable, __file__, "--peer-worker", name, f.name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer-worker"]:
        peer_worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or path")
    p.add_argument("--quant", default="int8", help="qwenlm weight format (default int8)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence (128)")
    p.add_argument("--repeats", type=int, default=5, help="steps per measurement (5)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--peers",
        nargs="+",
        choices=sorted(PEERS),
        default=[],
        help="also time these engines' verification steps on the same GGUF file",
    )
    args = p.parse_args(argv)
    if args.rows[0] != 1:
        args.rows = [1, *args.rows]  # the ratios are to a 1-row step

    import torch

    import qwenlm
    from qwenlm.benchmark import isa_text, machine_info, measure_batching

    torch.set_num_threads(args.threads)
    gguf = None
    if args.peers:
        from qwenlm import registry

        gguf = registry.resolve(args.model, pull=True)
        if gguf.suffix != ".gguf":
            p.error(f"--peers runs a GGUF file in every engine; {args.model} is {gguf}")
    model = qwenlm.load(args.model, quant=args.quant)
    rows = measure_batching(model, args.rows, context=args.context, repeats=args.repeats)
    peers: dict[str, dict[int, float]] = {}
    if gguf is not None:
        from qwenlm.benchmark import has_vnni, text_tokens

        ids = text_tokens(model, args.context + max(args.rows) * 2)
        spec = {
            "gguf": str(gguf),
            "threads": args.threads,
            "vnni": has_vnni(),
            "rows": args.rows,
            "repeats": args.repeats,
            "prompt": ids[: args.context],
            "draft": ids[args.context : args.context + max(args.rows)],
        }
        for name in args.peers:
            got = run_peer(name, spec)
            if isinstance(got, str):
                print(f"{name}: left out ({got})", file=sys.stderr)
            else:
                peers[name] = got
    info = machine_info()
    head = (
        f"Machine: {info['cpu']} ({isa_text(info)}), {args.threads} threads; "
        f"{model.weight_format} weights; {args.context}-token prompts; medians of "
        f"{args.repeats} steps; load average {', '.join(f'{x:.2f}' for x in info['load_average'])}."
    )
    text = head + "\n\n" + table(rows, peers)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.md").write_text(text + "\n")
    (args.out / "batching.json").write_text(
        json.dumps({"machine": info, "args": argv, "rows": rows, "peers": peers}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
