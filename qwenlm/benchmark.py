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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenlm.generation.sampling import greedy_token

REPO_TEXT = Path(__file__).resolve().parent.parent / "data" / "text" / "kjv-genesis.txt"


# The vector extensions that decide which kernels a CPU can run (names as in /proc/cpuinfo).
ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
)


def _cpuinfo(key: str) -> str | None:
    """The first value of ``key`` in /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == key:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX-512 VNNI or AVX-VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def machine_info() -> dict[str, Any]:
    import qwenlm
    from qwenlm.kernels import cpu_kernels

    flags = cpu_flags()
    lib = cpu_kernels()
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "kernels": lib.qlm_isa().decode() if lib is not None else None,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "qwenlm": qwenlm.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def isa_text(info: dict[str, Any]) -> str:
    """``avx2 fma f16c; no avx512, no vnni; qwenlm kernels avx2``: what a table says about
    the CPU of :func:`machine_info` and the kernel family qwenlm runs on it."""
    isa = info["isa"]
    missing = []
    if not any(f.startswith("avx512") for f in isa):
        missing.append("avx512")
    if not {"avx512_vnni", "avx_vnni"} & set(isa):
        missing.append("vnni")
    text = " ".join(isa) + ("; no " + ", no ".join(missing) if missing else "")
    return text + f"; qwenlm kernels {info.get('kernels') or 'none'}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (unchanged when None), then restore them."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_bandwidth(gb: float = 1.0, *, threads: int | None = None, repeats: int = 7) -> float:
    """Memory read bandwidth in GB/s: the best of ``repeats`` passes summing a float32 buffer
    of ``gb`` GiB (far larger than any L3), on ``threads`` threads. The best pass, as STREAM
    reports, is the one least disturbed by other work on a shared machine."""
    x = torch.ones(int(gb * 2**30 / 4))
    best = math.inf
    with torch_threads(threads):
        x.sum()
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def prefill_shapes(config: Any, rows: int = 512) -> list[tuple[int, int, int]]:
    """(M, K, N) of a decoder layer's matrix products for a ``rows``-token prefill chunk."""
    h, qkv = config.hidden_size, (config.num_attention_heads + 2 * config.num_key_value_heads)
    d = config.head_dim
    return [
        (rows, h, qkv * d),
        (rows, config.num_attention_heads * d, h),
        (rows, h, 2 * config.intermediate_size),
        (rows, config.intermediate_size, h),
    ]


def measure_matmul(
    shapes: list[tuple[int, int, int]], *, threads: int | None = None, repeats: int = 5
) -> float:
    """float32 matrix-multiply rate in GFLOP/s over ``shapes`` (M, K, N): the best of
    ``repeats`` passes through all of them, on ``threads`` threads."""
    pairs = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = math.inf
    with torch_threads(threads):
        for a, b in pairs:
            a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            for a, b in pairs:
                a @ b
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def prefill_flops_per_token(config: Any, tokens: int) -> float | None:
    """FLOPs per token of prefilling a ``tokens``-token prompt from an empty cache: 2 per
    weight of every decoder matrix, causal attention (4 x heads x head_dim per layer per key,
    (tokens + 1) / 2 keys on average), and the output head once for the last token. None for
    mixture-of-experts models, whose active weights depend on the routing."""
    if config.is_moe:
        return None
    h, d, ff = config.hidden_size, config.head_dim, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * ff
    attention = 4 * heads * d * (tokens + 1) / 2
    head = 2 * h * config.vocab_size / tokens
    return config.num_hidden_layers * (2 * per_layer + attention) + head


def kv_bytes_per_position(config: Any, element_bytes: float) -> float:
    """Bytes of keys and values one cached position holds (read once per decode step)."""
    c = config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * element_bytes


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


def gguf_bytes_per_token(path: str | os.PathLike[str]) -> int:
    """Bytes a one-token decode step reads from a GGUF file's tensors as stored: every tensor
    once, the embedding one row; a tied model (no ``output.weight``) reads the embedding as its
    output head too."""
    from qwenlm.weights.gguf import GGUFFile

    with GGUFFile(str(path)) as gf:
        tensors = dict(gf.tensors)
    total = sum(t.nbytes for name, t in tensors.items() if name != "token_embd.weight")
    embd = tensors.get("token_embd.weight")
    if embd is not None:
        total += embd.nbytes // embd.shape[0]
        if "output.weight" not in tensors:
            total += embd.nbytes
    return total


def text_tokens(model: Any, n: int, text_path: Path = REPO_TEXT) -> list[int]:
    """The first ``n`` tokens of the benchmark text (repeated if it is shorter)."""
    ids = model.tokenizer.encode(text_path.read_text(encoding="utf-8"))
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure_decode(model: Any, *, context: int, tokens: int) -> dict[str, float]:
    """Greedy decode of ``tokens`` tokens after a ``context``-token prompt (1 token if 0);
    ``prefill_s`` is the time the prompt took."""
    engine = model.engine
    seq = engine.new_sequence()
    prompt = text_tokens(model, max(context, 1))
    t0 = time.perf_counter()
    logits = engine.prefill(seq, prompt)
    t1 = time.perf_counter()
    for _ in range(tokens):  # the greedy pick generation uses (torch.argmax: +0.4 ms a token)
        (logits,) = engine.forward([(seq, [greedy_token(logits)])])
    dt = time.perf_counter() - t1
    return {"decode_tok_s": tokens / dt, "ms_per_token": 1000 * dt / tokens, "prefill_s": t1 - t0}


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


def perplexity_windows(ids: list[int], window: int = 1024) -> list[list[int]]:
    """The independent windows perplexity is computed over (each scores all but its first
    token); every engine that reports a perplexity uses these same windows."""
    return [ids[a : a + window] for a in range(0, len(ids) - 1, window) if len(ids[a:]) >= 2]


def window_nll(logits: torch.Tensor, window: list[int]) -> float:
    """Summed negative log-likelihood of ``window[1:]`` given ``logits`` (T, vocab), row t
    predicting token t + 1."""
    lp = torch.log_softmax(logits[: len(window) - 1].float(), dim=-1)
    return -float(lp.gather(1, torch.tensor(window[1:])[:, None]).sum())


def perplexity(
    model: Any, *, tokens: int = 20480, window: int = 1024, text_path: Path = REPO_TEXT
) -> float:
    """Perplexity over the first ``tokens`` tokens of the text, in independent windows."""
    windows = perplexity_windows(text_tokens(model, tokens, text_path), window)
    nll = sum(window_nll(model.logits(w), w) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def _medians_taking_turns(
    steps: Sequence[tuple[Callable[[], object], Callable[[], object]]], repeats: int
) -> list[float]:
    """Median wall time of each ``run`` of (run, undo) ``steps`` over ``repeats`` calls after
    one warm-up round, calling ``undo`` (untimed) after each; the steps take turns, one call
    each, so a shared machine's slow minutes fall on all of them alike."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(repeats + 1):
        for (run, undo), kept in zip(steps, times, strict=True):
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            undo()
            if i:
                kept.append(dt)
    return [statistics.median(t) for t in times]


def _median_seconds(run: Callable[[], object], undo: Callable[[], object], repeats: int) -> float:
    return _medians_taking_turns([(run, undo)], repeats)[0]


def _is_matrix(m: nn.Module) -> bool:
    """A linear layer itself, not a module that wraps one."""
    linear = hasattr(m, "in_features") and hasattr(m, "out_features")
    return linear and not any(_is_matrix(c) for c in m.children())


def measure_matrices(
    model: Any, bandwidth_gb_s: float, *, repeats: int = 11, flush_mb: int = 256
) -> list[dict[str, Any]]:
    """Each matrix of the first decoder layer and the output head, run alone on one row as a
    decode step runs it: bytes it holds, median seconds, and the fraction of ``bandwidth_gb_s``
    that reaches. Before every call a ``flush_mb`` buffer is read, so the weights come from
    memory as they do in a real step (all other layers pass between two uses of a matrix),
    then a tiny matrix of 64 rows runs on the kernels' threads, so that they are awake as in
    a step (they sleep ~1 ms after a job; waking them had cost a small matrix as much as its
    own work)."""
    from gguf import GGMLQuantizationType

    from qwenlm.quant.gguf import GGUFLinear, pack

    flush = torch.ones(flush_mb << 18)
    q8 = GGMLQuantizationType.Q8_0
    waker = GGUFLinear([(q8, 64, pack(q8, torch.zeros(64, 34, dtype=torch.uint8)))], 32, None)
    x32 = torch.zeros(1, 32)

    def undo() -> None:
        flush.sum()
        waker(x32)

    layer = model.model.model.layers[0]
    mods = [(f"layers.0.{n}", m) for n, m in layer.named_modules() if _is_matrix(m)]
    mods.append(("lm_head", model.model.lm_head))
    out = []
    with torch.inference_mode():
        for name, m in mods:
            x = torch.randn(1, m.in_features)
            nbytes = sum(t.nbytes for t in (*m.parameters(), *m.buffers()))
            secs = _median_seconds(lambda m=m, x=x: m(x), undo, repeats)
            out.append(
                {
                    "matrix": name,
                    "shape": [m.out_features, m.in_features],
                    "bytes": nbytes,
                    "seconds": secs,
                    "bandwidth_fraction": nbytes / secs / 1e9 / bandwidth_gb_s,
                }
            )
    return out


def measure_batching(
    model: Any, rows: Sequence[int] = (1, 4, 8, 16), *, context: int = 128, repeats: int = 5
) -> list[dict[str, float]]:
    """The cost of one engine step with more rows, against one row: ``batch`` is a decode step
    of N sequences (one token each, each after its own ``context``-token prompt), ``verify``
    one sequence taking N tokens at once with every row's logits (a speculative verification).
    Median seconds of ``repeats`` steps; the tokens are taken back after each. The kinds and
    row counts take turns, one step each (:func:`_medians_taking_turns`)."""
    engine = model.engine
    ids = text_tokens(model, context + max(rows) * 2)
    seqs = [engine.new_sequence() for _ in range(max(rows))]
    for i, seq in enumerate(seqs):
        engine.prefill(seq, ids[i : i + context])  # a different prompt each
    steps = []
    for n in rows:
        part, draft = seqs[:n], ids[context : context + n]
        steps.append(
            (
                lambda part=part: engine.forward([(s, [ids[context]]) for s in part]),
                lambda part=part: [s.trim(1) for s in part],
            )
        )
        steps.append(
            (
                lambda draft=draft: engine.forward([(seqs[0], draft)], all_logits=True),
                lambda n=n: seqs[0].trim(n),
            )
        )
    medians = _medians_taking_turns(steps, repeats)
    out = [
        {"rows": n, "batch_s": medians[2 * k], "verify_s": medians[2 * k + 1]}
        for k, n in enumerate(rows)
    ]
    for r in out:
        r["batch_ratio"] = r["batch_s"] / out[0]["batch_s"]
        r["verify_ratio"] = r["verify_s"] / out[0]["verify_s"]
    return out


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
    """One cell of the model cards' speed and memory table: prefill a ``context``-token
    prompt (timed), then time ``tokens`` decode steps after it; with the peak memory of it all.
    Timing a fixed number of steps (not generating ``context`` tokens) keeps a cell to the
    length of its prefill."""
    import qwenlm

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = qwenlm.load(spec["model"], quant=spec["quant"], kv_cache=spec.get("kv_cache", "auto"))
    n = int(spec["context"])
    r = measure_decode(model, context=n, tokens=int(spec["tokens"]))
    return {
        "quant": spec["quant"],
        "weight_format": model.weight_format,
        "context": n,
        "decode_tok_s": r["decode_tok_s"],
        "prefill_tok_s": n / r["prefill_s"] if n > 1 else None,
        "peak_rss_mb": peak_rss_mb(),
        "machine": machine_info(),
    }


def run_profile_cell(spec: dict[str, Any], timeout: float = 7200) -> dict[str, Any]:
    """:func:`profile_worker` in a fresh interpreter (``subprocess.TimeoutExpired`` after
    ``timeout`` seconds)."""
    return _worker_process(["--profile", json.dumps(spec)], timeout, "profile")


if __name__ == "__main__":
    if sys.argv[1] == "--profile":
        print(json.dumps(profile_worker(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(run_worker(json.loads(sys.argv[1]))))
