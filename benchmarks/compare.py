"""qwenlm against llama.cpp, ik_llama.cpp and transformers, side by side, on one GGUF file.

    python benchmarks/compare.py                                  # default model, 3 rounds
    python benchmarks/compare.py --ik-llama-bench /tmp/ik_build/bin/llama-bench --ppl
    python benchmarks/compare.py --engines qwenlm:int8 llama.cpp --busy

Each engine runs in its own fresh process per round (so peak memory is its own), and rounds
interleave the engines (A B C, A B C, ...) so that a busy spell on a shared machine falls on
all of them; the tables report medians over rounds and ratios to mainline llama.cpp. Every
engine gets the same GGUF file, the same token ids and the same thread count.

Measured per engine: decode tokens/s (greedy, after a 1-token and a 2048-token context),
prefill tokens/s and time to first token (512- and 2048-token prompts), peak resident memory,
with ``--ppl`` perplexity on data/text/kjv-genesis.txt (independent 1024-token windows, the
same for every engine that exposes its logits), and each speed as a fraction of the machine's
roofline: decode against the measured read bandwidth and the bytes a step reads (weights as
the engine holds them, plus the KV cache), prefill against the measured float32 matmul rate
and the FLOPs per token. For qwenlm also each matrix of one decoder layer and the output head
alone. ``--busy`` repeats every measurement beside one busy-loop process.

Engines: ``qwenlm:MODE`` (a ``--quant`` mode with its default KV cache, f16 for gguf;
``qwenlm:MODE+float``, ``+f16`` or ``+int8`` with that ``--kv-cache``), ``llama.cpp``
(llama-cpp-python), ``ik_llama.cpp`` (the ik-llama-cpp-python wheel, run-time repacking on),
``ik-llama-bench`` (a llama-bench binary built from ik_llama.cpp's source, ``--ik-llama-bench
PATH``, run with ``-rtr 1``) and ``transformers`` (the GGUF dequantized to float32). Engines
that are not installed are skipped with a note. Writes table.md, results.json and chart.png
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# Importing qwenlm sets OMP_WAIT_POLICY for its own process where the user set none; the
# other engines' workers get the environment the user gave, not ours.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's qwenlm, in the driver and in every worker
PPL_WINDOW = 1024
BUSY_SUFFIX = " +busy"  # the label of an engine measured beside a busy loop


# -- workers: one engine, one task, in this process ------------------------------------------
# Workers of the llama.cpp engines import neither torch nor qwenlm for speed runs (the driver
# hands them token ids), so their peak memory is theirs alone.


def _peak_rss_mb(children: bool = False) -> float:
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def _perplexity(spec: dict, logits_of: Any) -> float:
    """Perplexity over the spec's windows; ``logits_of(window)`` gives (T, vocab) logits."""
    import math

    import torch

    from qwenlm.benchmark import window_nll

    windows = spec["ppl_windows"]
    nll = sum(window_nll(torch.as_tensor(logits_of(w)), w) for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


class _LlamaCppEngine:
    """llama-cpp-python: reset, feed tokens, read the last (or every) row of logits."""

    kv_element_bytes = 2  # float16 KV cache, llama.cpp's default

    def __init__(self, spec: dict, n_ctx: int, all_logits: bool) -> None:
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        self.llm = Llama(
            model_path=spec["gguf"],
            n_ctx=n_ctx,
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            # eval() feeds n_batch tokens per llama_decode; llama.cpp itself still computes
            # in micro-batches of n_ubatch = 512.
            n_batch=n_ctx,
            logits_all=all_logits,
            verbose=False,
        )
        self.vocab = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()

    def eval(self, tokens: list[int]) -> Any:
        """The logits after the last of ``tokens`` (vocab,)."""
        self.llm.eval(tokens)
        ptr = self.llm._ctx.get_logits_ith(-1)
        return self.np.ctypeslib.as_array(ptr, shape=(self.vocab,))

    def eval_all(self, tokens: list[int]) -> Any:
        """The logits after each of ``tokens`` (T, vocab)."""
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)]


class _IkLlamaEngine:
    """The ik-llama-cpp-python wheel through its C API, with run-time repacking (``-rtr``)."""

    kv_element_bytes = 2

    def __init__(self, spec: dict, n_ctx: int, all_logits: bool) -> None:
        import numpy as np
        from ik_llama_cpp import _ctypes_api as C

        self.np, self.C = np, C
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        mp.use_mmap = False  # repacking rewrites the weights in memory
        mp.repack_tensors = True
        self.model = C.llama_model_load_from_file(spec["gguf"].encode(), mp)
        if not self.model:
            raise RuntimeError(f"ik_llama.cpp could not load {spec['gguf']}")
        cp = C.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_threads = cp.n_threads_batch = spec["threads"]
        # Its flash-attention kernels assert on long prompts on CPUs without VNNI.
        cp.flash_attn = spec["vnni"]
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("ik_llama.cpp could not create a context")
        self.vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.pos = 0

    def reset(self) -> None:
        self.C.llama_kv_cache_clear(self.ctx)
        self.pos = 0

    def _decode(self, tokens: list[int], every: bool) -> None:
        from ik_llama_cpp._internals import make_batch_range

        batch = make_batch_range(tokens, pos_start=self.pos, logits_last=True)
        for i in range(len(tokens) if every else 0):
            batch.logits[i] = 1
        ret = self.C.llama_decode(self.ctx, batch)
        self.C.llama_batch_free(batch)
        if ret != 0:
            raise RuntimeError(f"ik_llama.cpp llama_decode returned {ret}")
        self.pos += len(tokens)

    def _row(self, i: int) -> Any:
        ptr = self.C.llama_get_logits_ith(self.ctx, i)
        return self.np.ctypeslib.as_array(ptr, shape=(self.vocab,))

    def eval(self, tokens: list[int]) -> Any:
        self._decode(tokens, every=False)
        return self._row(-1)

    def eval_all(self, tokens: list[int]) -> Any:
        self._decode(tokens, every=True)
        return self.np.stack([self._row(i) for i in range(len(tokens))])


def _speed(engine: Any, spec: dict) -> dict:
    """Decode and prefill speed of a llama.cpp-style engine (reset / eval)."""
    import numpy as np

    out: dict[str, Any] = {}
    for ctx in spec["contexts"]:
        engine.reset()
        logits = engine.eval(spec["tokens"][: max(ctx, 1)])
        t0 = time.perf_counter()
        for _ in range(spec["decode_tokens"]):
            logits = engine.eval([int(np.argmax(logits))])
        out[f"decode@{ctx}"] = spec["decode_tokens"] / (time.perf_counter() - t0)
    for n in spec["prefill"]:
        engine.reset()
        t0 = time.perf_counter()
        int(np.argmax(engine.eval(spec["tokens"][:n])))
        dt = time.perf_counter() - t0
        out[f"prefill@{n}"], out[f"ttft@{n}"] = n / dt, dt
    out["peak_rss_mb"] = _peak_rss_mb()
    out["kv_element_bytes"] = engine.kv_element_bytes
    return out


def _llama_style(engine_cls: type, spec: dict) -> dict:
    if spec["task"] == "ppl":
        engine = engine_cls(spec, PPL_WINDOW, all_logits=True)

        def logits_of(window: list[int]) -> Any:
            engine.reset()
            return engine.eval_all(window)

        return {"perplexity": _perplexity(spec, logits_of)}
    n_ctx = max(spec["contexts"] + spec["prefill"]) + spec["decode_tokens"] + 8
    return _speed(engine_cls(spec, n_ctx, all_logits=False), spec)


def worker_llama(spec: dict) -> dict:
    return _llama_style(_LlamaCppEngine, spec)


def worker_ik_llama(spec: dict) -> dict:
    return _llama_style(_IkLlamaEngine, spec)


def llama_bench_command(spec: dict) -> list[str]:
    """ik_llama.cpp's llama-bench for the spec: run-time repacking, one repetition per round
    (rounds give the medians), JSON out."""
    n = spec["decode_tokens"]
    cmd = [spec["ik_llama_bench"], "-m", spec["gguf"], "-t", str(spec["threads"])]
    cmd += ["-rtr", "1", "-fa", "1" if spec["vnni"] else "0", "-r", "1", "-o", "json"]
    cmd += ["-p", ",".join(str(p) for p in spec["prefill"]), "-n", str(n)]
    for ctx in spec["contexts"]:
        if ctx > 0:
            cmd += ["-gp", f"{ctx},{n}"]
    return cmd


def parse_llama_bench(stdout: str) -> dict[str, float]:
    """decode@CTX and prefill@N tokens/s from llama-bench's JSON (tests named ``pp512``,
    ``tg128`` from an empty context, ``tg128@pp2048`` after a 2048-token prompt)."""
    out = {}
    for t in json.loads(stdout[stdout.index("[") :]):
        name = t["test"]
        if name.startswith("pp"):
            out[f"prefill@{t['n_prompt']}"] = float(t["avg_ts"])
        elif name.startswith("tg"):
            out[f"decode@{t['n_prompt'] if '@pp' in name else 0}"] = float(t["avg_ts"])
    return out


def worker_ik_bench(spec: dict) -> dict:
    # Its own limit ends it before the driver kills this worker, which would orphan it.
    limit = max(spec["timeout"] - 30, 1)
    proc = subprocess.run(llama_bench_command(spec), capture_output=True, text=True, timeout=limit)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise RuntimeError(f"llama-bench failed: {tail[0]}")
    out: dict[str, Any] = parse_llama_bench(proc.stdout)
    out["peak_rss_mb"] = _peak_rss_mb(children=True)
    out["kv_element_bytes"] = 2
    return out


def worker_qwenlm(spec: dict) -> dict:
    import torch

    import qwenlm
    from qwenlm.benchmark import (
        measure_decode,
        measure_matrices,
        measure_prefill,
        peak_rss_mb,
        perplexity,
        weight_bytes_per_token,
    )

    torch.set_num_threads(spec["threads"])
    mode, _, kv = spec["variant"].partition("+")
    model = qwenlm.load(spec["gguf"], quant=mode, group_size=32, kv_cache=kv or "auto")
    if spec["task"] == "ppl":
        return {"perplexity": perplexity(model, tokens=spec["ppl_tokens"], window=PPL_WINDOW)}
    out: dict[str, Any] = {
        "bytes_per_token": weight_bytes_per_token(model),
        "kv_element_bytes": model.engine.kv_dtype.itemsize,
    }
    for ctx in spec["contexts"]:
        r = measure_decode(model, context=ctx, tokens=spec["decode_tokens"])
        out[f"decode@{ctx}"] = r["decode_tok_s"]
    for n in spec["prefill"]:
        r = measure_prefill(model, tokens=n)
        out[f"prefill@{n}"], out[f"ttft@{n}"] = r["prefill_tok_s"], r["ttft_s"]
    out["peak_rss_mb"] = peak_rss_mb()  # before the matrix benchmark's flush buffer
    if spec.get("bandwidth_gb_s"):
        out["matrices"] = measure_matrices(model, spec["bandwidth_gb_s"])
    return out


def worker_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(spec["threads"])
    path = Path(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    if spec["task"] == "ppl":
        with torch.inference_mode():
            return {"perplexity": _perplexity(spec, lambda w: model(torch.tensor([w])).logits[0])}
    out: dict[str, Any] = {
        "bytes_per_token": sum(
            p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n
        ),
        "kv_element_bytes": 4,
    }
    ids = spec["tokens"]
    with torch.inference_mode():
        for ctx in spec["contexts"]:
            cache = DynamicCache()
            logits = model(
                torch.tensor([ids[: max(ctx, 1)]]), past_key_values=cache, use_cache=True
            ).logits
            t0 = time.perf_counter()
            for _ in range(spec["decode_tokens"]):
                token = logits[0, -1].argmax().view(1, 1)
                logits = model(token, past_key_values=cache, use_cache=True).logits
            out[f"decode@{ctx}"] = spec["decode_tokens"] / (time.perf_counter() - t0)
        for n in spec["prefill"]:
            t0 = time.perf_counter()
            logits = model(torch.tensor([ids[:n]]), logits_to_keep=1).logits
            int(logits[0, -1].argmax())
            dt = time.perf_counter() - t0
            out[f"prefill@{n}"], out[f"ttft@{n}"] = n / dt, dt
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def worker_machine(spec: dict) -> dict:
    """The ceilings: read bandwidth on 1 thread and on the engines' threads (best of 7 passes
    over 1 GiB), float32 matmul GFLOP/s at prefill shapes of this model."""
    from qwenlm.benchmark import measure_bandwidth, measure_matmul, prefill_shapes
    from qwenlm.weights import open_checkpoint

    with open_checkpoint(spec["gguf"]) as ckpt:
        shapes = prefill_shapes(ckpt.config)
    threads = sorted({1, spec["threads"]})
    return {
        "bandwidth_gb_s": {str(t): measure_bandwidth(threads=t) for t in threads},
        "matmul_gflop_s": measure_matmul(shapes, threads=spec["threads"]),
        "matmul_shapes": shapes,
    }


WORKERS = {
    "qwenlm": worker_qwenlm,
    "llama.cpp": worker_llama,
    "ik_llama.cpp": worker_ik_llama,
    "ik-llama-bench": worker_ik_bench,
    "transformers": worker_transformers,
    "machine": worker_machine,
}


# -- the driver ------------------------------------------------------------------------------


def start_busy(limit_s: float = 3600) -> subprocess.Popen:
    """One process spinning on a core, pinned to none and niced 0: the load a shared machine
    puts beside an engine. It stops by itself after ``limit_s`` should nobody stop it."""
    loop = f"import time\nend = time.monotonic() + {limit_s}\nwhile time.monotonic() < end: pass"
    return subprocess.Popen([sys.executable, "-c", loop])


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def worker_env(engine: str, threads: int) -> dict[str, str]:
    """The environment of an engine's worker process: its thread count, and for the other
    engines the user's own OpenMP wait policy (qwenlm's import set one for this process)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not engine.startswith("qwenlm"):
        env.pop("OMP_WAIT_POLICY", None)
        if USER_OMP_WAIT_POLICY is not None:
            env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    return env


def run_worker(engine: str, spec: dict, timeout: float, busy: bool = False) -> dict | str:
    """One worker in a fresh process (beside a busy loop if ``busy``); its result, or a
    one-line reason it failed."""
    env = worker_env(engine, spec["threads"])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "timeout": timeout}, f)
    spinner = start_busy(timeout + 60) if busy else None
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", engine, f.name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"over the {timeout:.0f} s timeout"
    finally:
        if spinner is not None:
            stop(spinner)
        os.unlink(f.name)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if proc.returncode < 0 and engine == "llama.cpp" and _has_amx():
            return (
                f"killed by signal {-proc.returncode}: llama-cpp-python's AMX backend crashes "
                "on this CPU; bash benchmarks/setup.sh builds it without AMX (docs/benchmarks.md)"
            )
        return lines[-1] if lines else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _has_amx() -> bool:
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def engine_problem(engine: str, ik_llama_bench: str | None) -> str | None:
    """Why ``engine`` cannot run here (None if it can)."""
    import importlib.util

    from qwenlm.quant import MODES

    name, _, variant = engine.partition(":")
    if name == "qwenlm":
        from qwenlm.generation.engine import KV_CACHE_FORMATS

        mode, plus, kv = variant.partition("+")
        if mode not in ("none", *MODES):
            return f"no qwenlm mode {mode!r}"
        return None if not plus or kv in KV_CACHE_FORMATS else f"no KV cache format {kv!r}"
    if name == "ik-llama-bench":
        if not ik_llama_bench:
            return "needs --ik-llama-bench PATH (bash benchmarks/build_ik_llama.sh SOURCE)"
        return None if os.access(ik_llama_bench, os.X_OK) else f"{ik_llama_bench} is not executable"
    if name not in WORKERS or name == "machine":
        return f"unknown engine {engine!r}"
    module = {"llama.cpp": "llama_cpp", "ik_llama.cpp": "ik_llama_cpp"}.get(name, name)
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (bash benchmarks/setup.sh)"
    return None


def default_engines() -> list[str]:
    from qwenlm.quant import MODES

    ours = [f"qwenlm:{m}" for m in ("int8", "int4", "gguf") if m in MODES]
    return [*ours, "llama.cpp", "ik_llama.cpp", "transformers"]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llama-cpp-python", "ik-llama-cpp-python", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def medians(runs: list[dict]) -> dict[str, Any]:
    """Per key the median over rounds; per matrix the median seconds."""
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in runs)
        for k, v in runs[0].items()
        if isinstance(v, int | float)
    }
    if "matrices" in runs[0]:
        out["matrices"] = [
            {
                **m,
                "seconds": (s := statistics.median(r["matrices"][i]["seconds"] for r in runs)),
                "bandwidth_fraction": m["bandwidth_fraction"] * m["seconds"] / s,
            }
            for i, m in enumerate(runs[0]["matrices"])
        ]
    return out


def roofline(
    row: dict, *, config: Any, bandwidth: float, matmul: float, decode_tokens: int
) -> dict[str, dict[str, float]]:
    """Per speed key its ceiling (tokens/s) and the fraction of it reached. A decode step at
    context C reads the weights once plus the cache of the positions before it (on average
    C + decode_tokens / 2 of them while the timed tokens run)."""
    from qwenlm.benchmark import kv_bytes_per_position, prefill_flops_per_token

    out = {}
    for key, speed in row.items():
        kind, _, n = key.partition("@")
        if kind == "decode" and "bytes_per_token" in row:
            kv = kv_bytes_per_position(config, row.get("kv_element_bytes", 2))
            step = row["bytes_per_token"] + kv * (max(int(n), 1) + decode_tokens / 2)
            ceiling = bandwidth * 1e9 / step
        elif kind == "prefill" and (flops := prefill_flops_per_token(config, int(n))):
            ceiling = matmul * 1e9 / flops
        else:
            continue
        out[key] = {"ceiling": ceiling, "fraction": speed / ceiling}
    return out


def _cells(values: list[str]) -> str:
    return "| " + " | ".join(values) + " |"


def speed_table(rows: dict[str, dict], keys: list[str], ppl: dict[str, float]) -> str:
    head = ["engine", *keys, "peak RSS MB", "GB/token"] + (["perplexity"] if ppl else [])
    lines = [_cells(head), "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, *(f"{r[k]:.2f}" if k in r else "-" for k in keys)]
        cells += [f"{r['peak_rss_mb']:.0f}"]
        cells += [f"{r['bytes_per_token'] / 1e9:.3f}" if "bytes_per_token" in r else "-"]
        if ppl:  # measured once per engine, quietly
            cells += [f"{ppl[name]:.4f}" if name in ppl else "-"]
        lines.append(_cells(cells))
    return "\n".join(lines)


def roofline_table(roofs: dict[str, dict], keys: list[str]) -> str:
    head = ["engine", *(f"{k} (ceiling)" for k in keys)]
    lines = [_cells(head), "|" + "---|" * len(head)]
    for name, roof in roofs.items():
        cells = [
            f"{roof[k]['fraction']:.0%} ({roof[k]['ceiling']:.1f})" if k in roof else "-"
            for k in keys
        ]
        lines.append(_cells([name, *cells]))
    return "\n".join(lines)


def matrix_table(name: str, matrices: list[dict], bandwidth: float) -> str:
    lines = [
        f"{name}, one row through each matrix alone (weights from memory):",
        "",
        "| matrix | shape | MB | µs | GB/s | of bandwidth |",
        "|---|---|---|---|---|---|",
    ]
    for m in matrices:
        rate = m["bytes"] / m["seconds"] / 1e9
        lines.append(
            f"| {m['matrix']} | {m['shape'][0]}x{m['shape'][1]} | {m['bytes'] / 1e6:.1f} | "
            f"{m['seconds'] * 1e6:.0f} | {rate:.1f} | {rate / bandwidth:.0%} |"
        )
    return "\n".join(lines)


def ratio_lines(rows: dict[str, dict], keys: list[str], peer: str = "llama.cpp") -> list[str]:
    """Each engine against mainline llama.cpp measured the same way (quiet or busy)."""
    lines = []
    speed = [k for k in keys if k.startswith(("decode", "prefill"))]
    for name, r in rows.items():
        ref = peer + (BUSY_SUFFIX if name.endswith(BUSY_SUFFIX) else "")
        if name == ref or ref not in rows:
            continue
        ratios = [f"{k} {r[k] / rows[ref][k]:.2f}x" for k in speed if k in r and k in rows[ref]]
        lines.append(f"- {name} vs {ref}: {', '.join(ratios)}")
    for name, r in rows.items():
        quiet = rows.get(name.removesuffix(BUSY_SUFFIX))
        if name.endswith(BUSY_SUFFIX) and quiet:
            kept = [f"{k} {r[k] / quiet[k]:.0%}" for k in speed if k in r and k in quiet]
            lines.append(f"- {name} keeps of its quiet speed: {', '.join(kept)}")
    return lines


def chart(rows: dict[str, dict], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed_keys = [k for k in keys if k.startswith(("decode", "prefill"))]
    fig, axes = plt.subplots(1, len(speed_keys), figsize=(4 * len(speed_keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], speed_keys, strict=True):
        names = [n for n in rows if k in rows[n]]
        ax.bar(range(len(names)), [rows[n][k] for n in names], color="#4a7bd0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(k.replace("@", " @ ") + " (tokens/s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    from qwenlm.cli.bench import add_ppl_option

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="qwen2.5-coder-0.5b-instruct", help="registry name or GGUF path"
    )
    p.add_argument(
        "--engines",
        nargs="+",
        help="engines (default: qwenlm's int8, int4 and gguf modes where present, llama.cpp, "
        "ik_llama.cpp, transformers, and ik-llama-bench with --ik-llama-bench); qwenlm:MODE "
        "for any --quant mode",
    )
    p.add_argument(
        "--ik-llama-bench",
        metavar="PATH",
        help="ik_llama.cpp's llama-bench binary (bash benchmarks/build_ik_llama.sh SOURCE)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[0, 2048])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    add_ppl_option(p)
    p.add_argument(
        "--busy",
        action="store_true",
        help="also run every measurement beside one busy-loop process",
    )
    p.add_argument("--no-matrices", action="store_true", help="skip qwenlm's per-matrix benchmark")
    p.add_argument(
        "--out", default="benchmarks/results", help="folder for table.md, results.json, chart.png"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker (3600)")
    return p


def select_engines(args: argparse.Namespace) -> list[str]:
    """The engines asked for (or the defaults) that can run here; the others named on stderr."""
    wanted = args.engines or default_engines()
    if args.ik_llama_bench and "ik-llama-bench" not in wanted:
        wanted.append("ik-llama-bench")
    engines = []
    for e in wanted:
        problem = engine_problem(e, args.ik_llama_bench)
        if problem:
            print(f"skipping {e}: {problem}", file=sys.stderr)
        else:
            engines.append(e)
    return engines


def run_rounds(
    engines: list[str], base: dict, args: argparse.Namespace, gguf_bytes: int
) -> dict[str, list[dict]]:
    """Every engine (and with --busy its busy twin) once per round, interleaved."""
    labels = [(e, busy) for e in engines for busy in ((False, True) if args.busy else (False,))]
    runs: dict[str, list[dict]] = {e + (BUSY_SUFFIX if b else ""): [] for e, b in labels}
    for r in range(args.rounds):
        for engine, busy in labels:
            label = engine + (BUSY_SUFFIX if busy else "")
            print(f"round {r + 1}/{args.rounds}: {label} ...", file=sys.stderr, flush=True)
            name, _, variant = engine.partition(":")
            res = run_worker(name, {**base, "variant": variant}, args.timeout, busy)
            if isinstance(res, str):
                print(f"  {label} failed: {res}", file=sys.stderr)
                continue
            if name not in ("qwenlm", "transformers"):
                res["bytes_per_token"] = gguf_bytes  # the llama.cpp engines read the file's
            runs[label].append(res)
    return runs


def run_perplexity(
    engines: list[str], base: dict, windows: list[list[int]], args: argparse.Namespace
) -> dict[str, float]:
    """Each engine's perplexity over ``windows``, once (it does not vary between rounds)."""
    ppl: dict[str, float] = {}
    for engine in engines:
        if engine == "ik-llama-bench":
            continue  # a binary that prints speeds, not logits
        print(f"perplexity: {engine} ...", file=sys.stderr, flush=True)
        name, _, variant = engine.partition(":")
        spec = {**base, "variant": variant, "task": "ppl", "ppl_tokens": args.ppl}
        res = run_worker(name, {**spec, "ppl_windows": windows}, args.timeout)
        if isinstance(res, str):
            print(f"  {engine} failed: {res}", file=sys.stderr)
        else:
            ppl[engine] = res["perplexity"]
    return ppl


def header(info: dict, ceilings: dict, args: argparse.Namespace, model: str) -> list[str]:
    """The machine, its ISA and ceilings, the versions and how the figures were taken."""
    from qwenlm.benchmark import isa_text

    bw = ceilings["bandwidth_gb_s"]
    busy = f", each engine also beside one busy-loop process ({BUSY_SUFFIX.strip()})"
    return [
        f"Machine: {info['cpu']}, {info['cores']} cores; ISA {isa_text(info)}; "
        f"{args.threads} threads for every engine; torch {info['torch']}, "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
        + f"; load average at the end {', '.join(f'{x:.2f}' for x in info['load_average'])}.",
        f"Read bandwidth {', '.join(f'{v:.1f} GB/s on {t} thread(s)' for t, v in bw.items())} "
        f"(best of 7 passes over 1 GiB each; the ceiling is the higher); float32 matmul "
        f"{ceilings['matmul_gflop_s']:.0f} "
        f"GFLOP/s on {args.threads} threads at this model's prefill shapes.",
        f"Medians of {args.rounds} interleaved rounds"
        + (busy if args.busy else "")
        + f"; model {model}; tokens/s; ttft in s.",
    ]


def main() -> int:
    args = build_parser().parse_args()
    from qwenlm import registry
    from qwenlm.benchmark import (
        gguf_bytes_per_token,
        has_vnni,
        machine_info,
        perplexity_windows,
        text_tokens,
    )
    from qwenlm.tokenizer import Tokenizer
    from qwenlm.weights import open_checkpoint
    from qwenlm.weights.gguf import GGUFFile

    gguf = str(registry.resolve(args.model, pull=True))
    engines = select_engines(args)
    with GGUFFile(gguf) as gf:
        # text_tokens reads the tokenizer off a model: every engine gets these same ids
        source = SimpleNamespace(tokenizer=Tokenizer.from_gguf_metadata(gf.metadata))
    with open_checkpoint(gguf) as ckpt:
        config = ckpt.config
    gguf_bytes = gguf_bytes_per_token(gguf)
    base = {
        "gguf": gguf,
        "threads": args.threads,
        "decode_tokens": args.decode_tokens,
        "contexts": args.contexts,
        "prefill": args.prefill,
        "tokens": text_tokens(source, max(args.contexts + args.prefill + [1])),
        "vnni": has_vnni(),
        "ik_llama_bench": args.ik_llama_bench,
        "task": "speed",
    }
    print("measuring the machine ...", file=sys.stderr, flush=True)
    ceilings = run_worker("machine", base, args.timeout)
    if isinstance(ceilings, str):
        raise SystemExit(f"could not measure the machine: {ceilings}")
    # A process on N threads can read at least as fast as on one: the best figure is the
    # ceiling (on a shared machine the N-thread pass is the one more often disturbed).
    bandwidth = max(ceilings["bandwidth_gb_s"].values())
    matmul = ceilings["matmul_gflop_s"]
    if not args.no_matrices:
        base["bandwidth_gb_s"] = bandwidth
    runs = run_rounds(engines, base, args, gguf_bytes)
    ppl = {}
    if args.ppl:
        windows = perplexity_windows(text_tokens(source, args.ppl), PPL_WINDOW)
        ppl = run_perplexity(engines, base, windows, args)

    rows = {label: medians(rs) for label, rs in runs.items() if rs}
    keys = (
        [f"decode@{c}" for c in args.contexts]
        + [f"prefill@{n}" for n in args.prefill]
        + [f"ttft@{n}" for n in args.prefill]
    )
    roofs = {
        label: roofline(
            r, config=config, bandwidth=bandwidth, matmul=matmul, decode_tokens=args.decode_tokens
        )
        for label, r in rows.items()
    }
    info = {**machine_info(), "versions": versions()}
    lines = [
        *header(info, ceilings, args, Path(gguf).name),
        "",
        speed_table(rows, keys, ppl),
        "",
        "Fraction of the roofline (ceiling tokens/s in brackets): decode against "
        f"{bandwidth:.1f} GB/s and the bytes a step reads, prefill against {matmul:.0f} GFLOP/s.",
        "",
        roofline_table(roofs, [k for k in keys if not k.startswith("ttft")]),
        "",
        *ratio_lines(rows, keys),
    ]
    for label, r in rows.items():
        if "matrices" in r and not label.endswith(BUSY_SUFFIX):
            lines += ["", matrix_table(label, r["matrices"], bandwidth)]
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(report + "\n")
    result = {
        "command": sys.argv,
        "machine": info,
        "ceilings": ceilings,
        "gguf_bytes_per_token": gguf_bytes,
        "runs": runs,
        "medians": rows,
        "roofline": roofs,
        "perplexity": ppl,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    try:
        chart(rows, keys, out / "chart.png")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[3]).read_text())
        print(json.dumps(WORKERS[sys.argv[2]](spec)))
        sys.exit(0)
    sys.exit(main())
