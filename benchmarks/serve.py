"""Serving benchmark: throughput and latency of `qwenlm serve` (and llama.cpp's server) under load.

Starts the server (or uses --url), then for each concurrency C runs C clients that each send
--requests streaming chat requests one after another, and measures per request the time to first
token (TTFT), the time per output token after it (TPOT) and the total time; per run, requests/s
and aggregate output tokens/s. Every request is greedy with a fixed prompt, so runs compare.
``--rounds N`` repeats the levels interleaved and reports each level's median round (by output
tokens/s): on a shared host one pass of 1 then 8 clients can put them in different spells.
Each level also reports the gaps between a stream's consecutive tokens (99th percentile and
largest): a prompt prefilled while others stream holds them back. ``--context-words N`` puts N
words of data/text/kjv-genesis.txt (another passage each request, so no prefix is shared)
before each prompt, which makes those arrivals long; ``--stagger S`` starts client k k*S seconds
late, so prompts arrive while other streams run.

    python benchmarks/serve.py                              # qwenlm at concurrency 1 2 4 8
    python benchmarks/serve.py --llama-cpp                  # and llama-cpp-python's server
    python benchmarks/serve.py --url http://127.0.0.1:8000 --api-key KEY
    python benchmarks/serve.py --concurrency 1 8 --max-tokens 128 --rounds 3   # issue 15's check
    python benchmarks/serve.py --concurrency 8 --context-words 400 --stagger 3   # long arrivals

llama.cpp's server is llama-cpp-python's (`python -m llama_cpp.server`, bash benchmarks/setup.sh
installs it) on the same GGUF file, with as many threads as qwenlm uses.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_TEXT = Path(__file__).resolve().parent.parent / "data" / "text" / "kjv-genesis.txt"

PROMPTS = [
    "Write a Python function that merges two sorted lists, and explain it.",
    "Explain how a hash table works, with an example in Python.",
    "Write a short story about a robot who learns to paint.",
    "Describe the differences between TCP and UDP in detail.",
    "Write a JavaScript function that debounces another function, and explain it.",
    "Explain recursion to a beginner with three examples.",
    "Write a SQL query that finds the second highest salary, and explain it.",
    "Describe how garbage collection works in Python.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, headers: dict[str, str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log}")
        try:
            if httpx.get(url + "/v1/models", headers=headers, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}")


def one_request(
    client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    gaps: list[float] = []  # seconds between consecutive content chunks
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    first = first or end
    return {
        "ttft": first - t0,
        "total": end - t0,
        "tokens": tokens,
        "tpot": (end - first) / (tokens - 1) if tokens > 1 else 0.0,
        "gaps": gaps,
    }


def run_level(
    url: str,
    model: str,
    headers: dict,
    concurrency: int,
    per_client: int,
    max_tokens: int,
    extra: dict,
    context_words: int = 0,
    stagger: float = 0.0,
) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    words = REPO_TEXT.read_text().split() if context_words else []

    def client_loop(k: int) -> None:
        time.sleep(k * stagger)
        with httpx.Client(headers=headers, timeout=1800) as c:
            for j in range(per_client):
                i = k * per_client + j
                prompt = PROMPTS[i % len(PROMPTS)]
                if context_words:  # another passage each request: no shared prefix
                    at = (i * 997 * context_words) % max(1, len(words) - context_words)
                    prompt = " ".join(words[at : at + context_words]) + "\n\n" + prompt
                r = one_request(c, url, model, prompt, max_tokens, extra)
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"]) or [0.0]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(r["ttft"] for r in results),
        "ttft_max_s": max(r["ttft"] for r in results),
        "tpot_median_ms": 1000 * statistics.median(r["tpot"] for r in results),
        "gap_p99_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "gap_max_ms": 1000 * gaps[-1],
    }


def bench(name: str, url: str, model: str, headers: dict, args: argparse.Namespace, extra: dict):
    print(f"\n== {name} ({url})", flush=True)
    one_request(httpx.Client(headers=headers, timeout=1800), url, model, PROMPTS[0], 8, extra)
    runs: dict[int, list[dict]] = {c: [] for c in args.concurrency}
    # Rounds interleave the levels (1, 8, 1, 8, ...): a slow spell of a shared host then falls
    # on every level alike, and each level's median round is kept.
    for r in range(args.rounds):
        for c in args.concurrency:
            row = run_level(
                url, model, headers, c, args.requests, args.max_tokens, extra,
                args.context_words, args.stagger,
            )  # fmt: skip
            row["server"], row["round"] = name, r + 1
            runs[c].append(row)
            tag = f"round {r + 1}/{args.rounds} " if args.rounds > 1 else ""
            print(
                f"  {tag}c={c:<2} {row['requests']:>3} req  {row['tokens_per_s']:7.2f} tok/s  "
                f"{row['requests_per_s']:6.3f} req/s  TTFT median {row['ttft_median_s']:6.2f} s "
                f"(max {row['ttft_max_s']:6.2f})  TPOT median {row['tpot_median_ms']:7.1f} ms  "
                f"gap p99 {row['gap_p99_ms']:6.0f} ms (max {row['gap_max_ms']:6.0f})",
                flush=True,
            )
    rows = []
    for c in args.concurrency:
        ordered = sorted(runs[c], key=lambda row: row["tokens_per_s"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["rounds"] = [row["tokens_per_s"] for row in runs[c]]
        rows.append(median)
    return rows


def scaling(rows: list[dict]) -> list[str]:
    """Per server, its output tokens/s at the most clients as a multiple of one client's (the
    share of one weight read that concurrent sequences get; issue 15 asks for 3.5x at 8)."""
    lines = []
    for server in dict.fromkeys(r["server"] for r in rows):
        by_level = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["server"] == server}
        top = max(by_level)
        if 1 in by_level and top > 1:
            lines.append(
                f"{server}: {top} clients deliver {by_level[top] / by_level[1]:.2f}x "
                "one client's output tokens/s"
            )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or path")
    p.add_argument("--url", help="benchmark a running qwenlm server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("QWENLM_API_KEY"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (default 48)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the levels this many times, interleaved, and keep each level's median round",
    )
    p.add_argument(
        "--context-words",
        type=int,
        default=0,
        help="put this many words of data/text/kjv-genesis.txt before each prompt (default 0)",
    )
    p.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="client k starts k times this many seconds late (default 0: all at once)",
    )
    p.add_argument("--llama-cpp", action="store_true", help="also run llama-cpp-python's server")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from qwenlm import registry

    path = registry.resolve(args.model)
    name = args.model if not Path(args.model).exists() else path.name
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows: list[dict] = []
    procs = []
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "qwenlm", "serve", args.model, "--port", str(port)]
            cmd += ["--served-model-name", name, "--no-access-log"]
            procs.append(start(cmd, url, headers, Path(tempfile.gettempdir()) / "serve-qwenlm.log"))
        # ignore_eos: every reply runs to max_tokens, so all servers produce the same work.
        rows += bench("qwenlm", url, name, headers, args, {"ignore_eos": True})
        if args.llama_cpp:
            for proc in procs:
                proc.terminate()
                proc.wait(60)
            procs = []
            port = free_port()
            lurl = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path)]
            cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"]
            cmd += ["--n_threads", str(args.threads), "--model_alias", name]
            # By default a new request would cut off the one streaming; let them queue instead.
            cmd += ["--interrupt_requests", "False"]
            log = Path(tempfile.gettempdir()) / "serve-llama-cpp.log"
            procs.append(start(cmd, lurl, {}, log))
            # llama-cpp-python has no ignore_eos; a logit bias on the end tokens does the same.
            bias = {"logit_bias": {"151645": -100, "151643": -100}}
            rows += bench("llama.cpp (llama-cpp-python)", lurl, name, {}, args, bias)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    args.out.write_text(
        json.dumps({"model": name, "max_tokens": args.max_tokens, "rows": rows}, indent=1)
    )
    print(f"\nwrote {args.out}")
    print(
        "\n| server | clients | requests/s | output tok/s | TTFT median | TPOT median "
        "| token gap p99 | token gap max |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['server']} | {r['concurrency']} | {r['requests_per_s']:.3f} | "
            f"{r['tokens_per_s']:.1f} | {r['ttft_median_s']:.2f} s | {r['tpot_median_ms']:.0f} ms "
            f"| {r['gap_p99_ms']:.0f} ms | {r['gap_max_ms']:.0f} ms |"
        )
    print()
    for line in scaling(rows):
        print(line)


if __name__ == "__main__":
    main()
