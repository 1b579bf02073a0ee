"""Measuring qwenlm: decode and prefill speed, time to first token, memory, perplexity.

Every measurement of one weight format runs in a fresh process (``python -m qwenlm.benchmark``)
so that peak memory is that format's alone; the parent collects JSON lines. Results carry the
machine, versions, thread count and load average, because these machines are shared and a
number without its conditions means little.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_TEXT = Path(__file__).resolve().parent.parent / "data" / "text" / "kjv-genesis.txt"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import qwenlm

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "qwenlm": qwenlm.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_bandwidth(gb: float = 1.0) -> float:
    """Memory read bandwidth in GB/s: the median time to sum a buffer far larger than caches."""
    x = torch.ones(int(gb * 2**30 / 4))
    x.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times) / 1e9


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights a one-token decode step reads: every matrix once, one embedding row."""
    total = 0
    # remove_duplicate=False: a tied model's embedding and head share one table, which must
    # count once as the head (every row read) and once as the embedding (one row).
    tensors = list(model.model.named_parameters(remove_duplicate=False))
    tensors += list(model.model.named_buffers(remove_duplicate=False))
    for name, buf in tensors:
        if "embed_tokens" in name:
            total += buf.nbytes // buf.shape[0] if buf.dim() else buf.nbytes
        else:
            total += buf.nbytes
    return total


def text_tokens(model: Any, n: int, text_path: Path = REPO_TEXT) -> list[int]:
    """The first ``n`` tokens of the benchmark text (repeated if it is shorter)."""
    ids = model.tokenizer.encode(text_path.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_decode(model: Any, *, context: int, tokens: int) -> dict[str, float]:
    """Greedy decode of ``tokens`` tokens after a ``context``-token prompt (1 token if 0)."""
    engine = model.engine
    seq = engine.new_sequence()
    prompt = text_tokens(model, max(context, 1))
    logits = engine.prefill(seq, prompt)
    t0 = time.perf_counter()
    for _ in range(tokens):
        (logits,) = engine.forward([(seq, [int(logits.argmax())])])
    dt = time.perf_counter() - t0
    return {"decode_tok_s": tokens / dt, "ms_per_token": 1000 * dt / tokens}


def measure_prefill(model: Any, *, tokens: int) -> dict[str, float]:
    """Prefill a ``tokens``-token prompt; time to first token includes choosing it."""
    engine = model.engine
    prompt = text_tokens(model, tokens)
    seq = engine.new_sequence()
    t0 = time.perf_counter()
    logits = engine.prefill(seq, prompt)
    int(logits.argmax())
    dt = time.perf_counter() - t0
    return {"prefill_tok_s": tokens / dt, "ttft_s": dt}


def perplexity(
    model: Any, *, tokens: int = 20480, window: int = 1024, text_path: Path = REPO_TEXT
) -> float:
    """Perplexity over the first ``tokens`` tokens of the text, in independent windows."""
    ids = text_tokens(model, tokens, text_path)
    nll, count = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        chunk = ids[a : a + window]
        if len(chunk) < 2:
            break
        logits = model.logits(chunk)
        lp = torch.log_softmax(logits[:-1], dim=-1)
        target = torch.tensor(chunk[1:])
        nll -= float(lp.gather(1, target[:, None]).sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One weight format, measured in this process: what ``python -m qwenlm.benchmark`` runs."""
    import qwenlm

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    model = qwenlm.load(spec["model"], quant=spec["quant"], group_size=spec.get("group_size", 32))
    out: dict[str, Any] = {"quant": model.weight_format, "load_s": time.perf_counter() - t0}
    out["rss_after_load_mb"] = peak_rss_mb()
    out["weight_bytes_per_token"] = weight_bytes_per_token(model)
    runs = int(spec.get("runs", 3))
    for ctx in spec.get("decode_contexts", [0]):
        results = [
            measure_decode(model, context=ctx, tokens=spec.get("decode_tokens", 128))
            for _ in range(runs)
        ]
        out[f"decode_tok_s@{ctx}"] = statistics.median(r["decode_tok_s"] for r in results)
        out[f"decode_runs@{ctx}"] = [round(r["decode_tok_s"], 2) for r in results]
    for n in spec.get("prefill_tokens", [512]):
        results = [measure_prefill(model, tokens=n) for _ in range(runs)]
        out[f"prefill_tok_s@{n}"] = statistics.median(r["prefill_tok_s"] for r in results)
        out[f"ttft_s@{n}"] = statistics.median(r["ttft_s"] for r in results)
    if spec.get("ppl_tokens"):
        out["perplexity"] = perplexity(model, tokens=int(spec["ppl_tokens"]))
    out["peak_rss_mb"] = peak_rss_mb()
    out["machine"] = machine_info()
    return out


def _worker_process(args: list[str], timeout: float, what: str) -> dict[str, Any]:
    """``python -m qwenlm.benchmark ARGS`` in a fresh interpreter (so its memory peak is its
    own); the JSON object on its last line of output."""
    proc = subprocess.run(
        [sys.executable, "-m", "qwenlm.benchmark", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} worker failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_subprocess(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """:func:`run_worker` in a fresh interpreter, so its memory peak is its own."""
    return _worker_process([json.dumps(spec)], timeout, "benchmark")


def profile_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One cell of the model cards' table: generate N tokens from one token, or encode N."""
    import qwenlm

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = qwenlm.load(spec["model"], quant=spec["quant"], kv_cache=spec.get("kv_cache", "float"))
    n = int(spec["tokens"])
    out: dict[str, Any] = {"quant": model.weight_format, "task": spec["task"], "tokens": n}
    if spec["task"] == "generate":
        r = measure_decode(model, context=0, tokens=n)
        out["tok_s"] = r["decode_tok_s"]
    else:
        r = measure_prefill(model, tokens=n)
        out["tok_s"] = r["prefill_tok_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    out["machine"] = machine_info()
    return out


def run_profile_cell(spec: dict[str, Any], timeout: float = 7200) -> dict[str, Any]:
    """:func:`profile_worker` in a fresh interpreter."""
    return _worker_process(["--profile", json.dumps(spec)], timeout, "profile")


if __name__ == "__main__":
    if sys.argv[1] == "--profile":
        print(json.dumps(profile_worker(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(run_worker(json.loads(sys.argv[1]))))
