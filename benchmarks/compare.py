"""qwenlm against llama.cpp and transformers, side by side, on the same GGUF file and prompts.

    python benchmarks/compare.py                       # default model, 3 rounds
    python benchmarks/compare.py --rounds 5 --engines qwenlm:int8 qwenlm:int4 llama.cpp

Each engine runs in its own fresh process per round (so peak memory is its own), and rounds
interleave the engines (A B C, A B C, ...) so that a busy spell on a shared machine falls on
all of them; the table reports medians over rounds and the ratios between engines. Measured:
decode tokens/s (128 greedy tokens after a 1-token and a 2048-token context), prefill tokens/s
(512- and 2048-token prompts), time to first token, peak resident memory, and the fraction of
the memory-bandwidth limit that decode reaches (weight bytes read per token / time per token /
measured bandwidth). Writes a markdown table, JSON and a PNG chart to --out.

llama.cpp comes from llama-cpp-python (``bash benchmarks/setup.sh``, ~15 minutes of
compiling); transformers loads the GGUF dequantized to float32. Engines that are not installed
are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "data" / "text" / "kjv-genesis.txt"


# -- workers: one engine, one round, in this process --------------------------------------


def _tokens(n: int) -> list[int]:
    from qwenlm.tokenizer import Tokenizer
    from qwenlm.weights.gguf import GGUFFile

    with GGUFFile(os.environ["QWENLM_BENCH_GGUF"]) as gf:
        tok = Tokenizer.from_gguf_metadata(gf.metadata)
    ids = tok.encode(TEXT.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_qwenlm(spec: dict) -> dict:
    import torch

    import qwenlm
    from qwenlm.benchmark import measure_decode, measure_prefill, weight_bytes_per_token

    torch.set_num_threads(spec["threads"])
    model = qwenlm.load(spec["gguf"], quant=spec["variant"], group_size=32)
    out = {"bytes_per_token": weight_bytes_per_token(model)}
    for ctx in spec["contexts"]:
        out[f"decode@{ctx}"] = measure_decode(model, context=ctx, tokens=spec["decode_tokens"])[
            "decode_tok_s"
        ]
    for n in spec["prefill"]:
        r = measure_prefill(model, tokens=n)
        out[f"prefill@{n}"], out[f"ttft@{n}"] = r["prefill_tok_s"], r["ttft_s"]
    out["peak_rss_mb"] = _rss_mb()
    return out


def worker_llama(spec: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(spec["contexts"] + spec["prefill"]) + spec["decode_tokens"] + 8
    llm = Llama(
        model_path=spec["gguf"],
        n_ctx=n_ctx,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        # llama-cpp-python keeps last-token logits in an (n_batch, vocab) array indexed by
        # position, so n_batch must cover the whole context (llama.cpp still computes in
        # micro-batches of n_ubatch = 512).
        n_batch=n_ctx,
        verbose=False,
    )
    from qwenlm.weights.gguf import GGUFFile

    with GGUFFile(spec["gguf"]) as gf:
        weights = sum(t.nbytes for n, t in gf.tensors.items() if n != "token_embd.weight")
    out = {"bytes_per_token": weights}
    for ctx in spec["contexts"]:
        llm.reset()
        llm.eval(_tokens(max(ctx, 1)))
        t0 = time.perf_counter()
        for _ in range(spec["decode_tokens"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        out[f"decode@{ctx}"] = spec["decode_tokens"] / (time.perf_counter() - t0)
    for n in spec["prefill"]:
        llm.reset()
        prompt = _tokens(n)
        t0 = time.perf_counter()
        llm.eval(prompt)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        dt = time.perf_counter() - t0
        out[f"prefill@{n}"], out[f"ttft@{n}"] = n / dt, dt
    out["peak_rss_mb"] = _rss_mb()
    return out


def worker_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(spec["threads"])
    path = Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    out = {
        "bytes_per_token": sum(
            p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n
        )
    }
    with torch.inference_mode():
        for ctx in spec["contexts"]:
            cache = DynamicCache()
            logits = model(
                torch.tensor([_tokens(max(ctx, 1))]), past_key_values=cache, use_cache=True
            ).logits
            t0 = time.perf_counter()
            for _ in range(spec["decode_tokens"]):
                token = logits[0, -1].argmax().view(1, 1)
                logits = model(token, past_key_values=cache, use_cache=True).logits
            out[f"decode@{ctx}"] = spec["decode_tokens"] / (time.perf_counter() - t0)
        for n in spec["prefill"]:
            t0 = time.perf_counter()
            logits = model(torch.tensor([_tokens(n)]), logits_to_keep=1).logits
            int(logits[0, -1].argmax())
            dt = time.perf_counter() - t0
            out[f"prefill@{n}"], out[f"ttft@{n}"] = n / dt, dt
    out["peak_rss_mb"] = _rss_mb()
    return out


def worker_bandwidth(spec: dict) -> dict:
    import torch

    from qwenlm.benchmark import measure_bandwidth

    torch.set_num_threads(spec["threads"])
    return {"bandwidth_gb_s": measure_bandwidth()}


WORKERS = {
    "qwenlm": worker_qwenlm,
    "llama.cpp": worker_llama,
    "transformers": worker_transformers,
    "bandwidth": worker_bandwidth,
}


# -- the driver ------------------------------------------------------------------------------


def run_worker(engine: str, spec: dict, timeout: float) -> dict | str:
    env = {**os.environ, "QWENLM_BENCH_GGUF": spec["gguf"], "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", engine, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        return (
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit {proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available(engine: str) -> str | None:
    module = {"llama.cpp": "llama_cpp", "transformers": "transformers"}.get(engine)
    if module is None:
        return None
    import importlib.util

    return (
        None
        if importlib.util.find_spec(module)
        else f"{module} is not installed (bash benchmarks/setup.sh)"
    )


def machine() -> dict:
    from qwenlm.benchmark import machine_info

    info = machine_info()
    for pkg in ("llama_cpp", "transformers"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception:
            info[pkg] = None
    return info


def table(rows: dict[str, dict], keys: list[str], bandwidth: float | None) -> str:
    head = ["engine", *keys, "peak RSS MB", "GB/token", "bandwidth used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        used = ""
        if bandwidth and "decode@0" in r:
            used = f"{r['bytes_per_token'] * r['decode@0'] / 1e9 / bandwidth:.0%}"
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in keys]
        lines.append(
            "| "
            + " | ".join(
                [name, *cells, f"{r['peak_rss_mb']:.0f}", f"{r['bytes_per_token'] / 1e9:.3f}", used]
            )
            + " |"
        )
    return "\n".join(lines)


def chart(rows: dict[str, dict], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed_keys = [k for k in keys if k.startswith(("decode", "prefill"))]
    fig, axes = plt.subplots(1, len(speed_keys), figsize=(4 * len(speed_keys), 3.6))
    for ax, k in zip(axes, speed_keys, strict=True):
        names = [n for n in rows if k in rows[n]]
        ax.bar(range(len(names)), [rows[n][k] for n in names], color="#4a7bd0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(k.replace("@", " @ ") + " (tokens/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or GGUF path"
    )
    p.add_argument(
        "--engines",
        nargs="+",
        default=["qwenlm:int8", "qwenlm:int4", "llama.cpp", "transformers"],
        help="engines; qwenlm:MODE for each qwenlm weight format (int8, int4, f32, none)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[0, 2048])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    p.add_argument(
        "--out", default="benchmarks/results", help="folder for table.md, results.json, chart.png"
    )
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args()

    from qwenlm import registry

    gguf = str(registry.resolve(args.model, pull=True))
    base = {
        "gguf": gguf,
        "threads": args.threads,
        "decode_tokens": args.decode_tokens,
        "contexts": args.contexts,
        "prefill": args.prefill,
    }
    engines = []
    for e in args.engines:
        name, _, variant = e.partition(":")
        skip = available(name)
        if skip:
            print(f"skipping {e}: {skip}", file=sys.stderr)
            continue
        engines.append((e, name, variant))
    runs: dict[str, list[dict]] = {e: [] for e, _, _ in engines}
    bandwidth = run_worker("bandwidth", base, args.timeout)
    for r in range(args.rounds):
        for label, name, variant in engines:
            print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
            res = run_worker(name, {**base, "variant": variant}, args.timeout)
            if isinstance(res, str):
                print(f"  {label} failed: {res}", file=sys.stderr)
                continue
            runs[label].append(res)
    medians = {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for label, rs in runs.items()
        if rs
    }
    keys = (
        [f"decode@{c}" for c in args.contexts]
        + [f"prefill@{n}" for n in args.prefill]
        + [f"ttft@{n}" for n in args.prefill]
    )
    bw = bandwidth.get("bandwidth_gb_s") if isinstance(bandwidth, dict) else None
    info = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {args.threads} threads; torch "
        f"{info['torch']}, "
        f"llama-cpp-python {info['llama_cpp']}, transformers {info['transformers']}; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in info['load_average'])}; "
        f"measured read bandwidth {bw:.1f} GB/s; medians of {args.rounds} interleaved rounds."
        if bw
        else "",
        "",
        table(medians, keys, bw),
        "",
    ]
    ours = {k: v for k, v in medians.items() if k.startswith("qwenlm")}
    for peer in ("llama.cpp", "transformers"):
        if peer in medians and ours:
            best = max(ours, key=lambda k: ours[k]["decode@0"])
            ratios = ", ".join(
                f"{k} {ours[best][k] / medians[peer][k]:.2f}x"
                for k in keys
                if k.startswith(("decode", "prefill"))
            )
            lines.append(f"- {best} vs {peer}: {ratios}")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"machine": info, "bandwidth_gb_s": bw, "runs": runs, "medians": medians}, indent=2
        )
    )
    try:
        chart(medians, keys, out / "chart.png")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
        sys.exit(0)
    sys.exit(main())
