"""``qwenlm bench``: speed, memory and perplexity of each weight format, as a table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from qwenlm import registry
from qwenlm.cli.common import add_group_size_arg
from qwenlm.errors import QwenlmError
from qwenlm.quant import MODES as QUANT_MODES


def add_ppl_option(p: argparse.ArgumentParser) -> None:
    """``--ppl [TOKENS]``: also perplexity on the benchmark text (what bench and
    benchmarks/compare.py both offer)."""
    p.add_argument(
        "--ppl",
        type=int,
        nargs="?",
        const=20480,
        default=0,
        metavar="TOKENS",
        help="also measure perplexity on TOKENS tokens of data/text/kjv-genesis.txt "
        "(default 20480)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm bench",
        description="Measure decode and prefill speed, time to first token, peak memory and (with "
        "--ppl) perplexity for each weight format, each in a fresh process. Medians of --runs "
        "runs.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=registry.DEFAULT_MODEL,
        help="registry name, .gguf file or model folder",
    )
    p.add_argument(
        "--quant",
        nargs="+",
        default=["int8", "int4"],
        choices=["none", *QUANT_MODES],
        help="weight formats to measure (default: int8 int4)",
    )
    add_group_size_arg(p)
    p.add_argument(
        "--decode-tokens", type=int, default=128, help="tokens decoded per run (default 128)"
    )
    p.add_argument(
        "--context",
        type=int,
        nargs="+",
        default=[0, 2048],
        help="contexts to decode from (default 0 2048)",
    )
    p.add_argument(
        "--prefill",
        type=int,
        nargs="+",
        default=[512, 2048],
        help="prompt lengths to prefill (default 512 2048)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per measurement; the median is reported (default 3)",
    )
    add_ppl_option(p)
    p.add_argument("--threads", type=int, help="torch/kernel threads (default: torch's)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def markdown(results: list[dict]) -> str:
    keys = [k for k in results[0] if k.startswith(("decode_tok_s@", "prefill_tok_s@", "ttft_s@"))]
    head = ["format", *keys, "peak RSS MB", "GB read/token"] + (
        ["perplexity"] if "perplexity" in results[0] else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [
            r["quant"],
            *(f"{r[k]:.2f}" for k in keys),
            f"{r['peak_rss_mb']:.0f}",
            f"{r['weight_bytes_per_token'] / 1e9:.3f}",
        ]
        if "perplexity" in r:
            row.append(f"{r['perplexity']:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qwenlm.benchmark import machine_info, run_in_subprocess

    args = build_parser().parse_args(argv)
    path = str(registry.resolve(args.model))
    results = []
    for quant in args.quant:
        print(f"measuring {quant} ...", file=sys.stderr, flush=True)
        results.append(
            run_in_subprocess(
                {
                    "model": path,
                    "quant": quant,
                    "group_size": args.group_size,
                    "decode_tokens": args.decode_tokens,
                    "decode_contexts": args.context,
                    "prefill_tokens": args.prefill,
                    "runs": args.runs,
                    "ppl_tokens": args.ppl,
                    "threads": args.threads,
                }
            )
        )
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch "
        f"{info['torch']}, "
        f"load average {', '.join(f'{x:.2f}' for x in info['load_average'])}"
    )
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)
    return 0


LONG_CONTEXT = 8192


def build_profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm profile",
        description="The Qwen model cards' speed and memory table for each weight format: decode "
        "tokens/s after a 1-, 2048- (and with --long 8192-) token context, prefill tokens/s of "
        "that context, and the peak memory of doing both. Every cell runs in a fresh process.",
    )
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL)
    p.add_argument(
        "--quant",
        nargs="+",
        default=list(QUANT_MODES),
        choices=["none", *QUANT_MODES],
        help=f"weight formats (default: {' '.join(QUANT_MODES)})",
    )
    p.add_argument(
        "--context",
        type=int,
        nargs="+",
        default=[1, 2048],
        help="context lengths, one cell each (default 1 2048)",
    )
    p.add_argument("--long", action="store_true", help=f"add the {LONG_CONTEXT}-token cells")
    p.add_argument(
        "--tokens",
        type=int,
        default=32,
        help="decode steps timed after each context (default 32)",
    )
    p.add_argument("--kv-cache", default="auto", choices=["auto", "float", "f16", "int8"])
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds per cell; a cell that takes longer is left out of the table (default 900)",
    )
    p.add_argument("--json", metavar="FILE")
    return p


def profile_table(cells: list[dict], quants: list[str], contexts: list[int]) -> str:
    """Markdown: one row per format; decode and prefill tokens/s and peak MB per context
    ("-" for a cell that did not run, and for the prefill of a 1-token context)."""
    get = {(c["quant"], c["context"]): c for c in cells if "decode_tok_s" in c}

    def cell(q: str, n: int, key: str, fmt: str) -> str:
        value = get.get((q, n), {}).get(key)
        return "-" if value is None else format(value, fmt)

    head = ["format"] + [f"decode tok/s @{n}" for n in contexts]
    head += [f"prefill tok/s @{n}" for n in contexts if n > 1]
    head += [f"peak MB @{n}" for n in contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q in quants:
        shown = next((c["weight_format"] for (cq, _), c in get.items() if cq == q), q)
        row = [shown] + [cell(q, n, "decode_tok_s", ".2f") for n in contexts]
        row += [cell(q, n, "prefill_tok_s", ".2f") for n in contexts if n > 1]
        row += [cell(q, n, "peak_rss_mb", ".0f") for n in contexts]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def profile_main(argv: list[str] | None = None) -> int:
    from qwenlm.benchmark import isa_text, machine_info, run_profile_cell

    args = build_profile_parser().parse_args(argv)
    path = str(registry.resolve(args.model))
    contexts = sorted(set(args.context) | ({LONG_CONTEXT} if args.long else set()))
    if min(contexts) < 1 or args.tokens < 1:
        raise QwenlmError(
            "contexts and --tokens must be at least 1", hint="e.g. --context 1 2048 --tokens 32"
        )
    cells: list[dict] = []
    for quant in args.quant:
        for n in contexts:
            print(f"{quant}: context {n} ...", file=sys.stderr, flush=True)
            spec = {
                "model": path,
                "quant": quant,
                "context": n,
                "tokens": args.tokens,
                "kv_cache": args.kv_cache,
                "threads": args.threads,
            }
            try:
                cells.append(run_profile_cell(spec, timeout=args.timeout))
            except subprocess.TimeoutExpired:
                print(f"  left out: over {args.timeout:.0f} s", file=sys.stderr)
                cells.append({**spec, "skipped": f"over {args.timeout:.0f} s"})
            except RuntimeError as e:
                print(f"  left out: {e}", file=sys.stderr)
                cells.append({**spec, "skipped": str(e)})
    info = machine_info()
    print(
        f"machine: {info['cpu']} ({isa_text(info)}), {info['cores']} cores, "
        f"{args.threads or info['threads']} threads, torch {info['torch']}, "
        f"KV cache {args.kv_cache}"
        + (" (f16 with gguf, else float)" if args.kv_cache == "auto" else "")
        + f", {args.tokens} decode steps per cell, load average "
        f"{', '.join(f'{x:.2f}' for x in info['load_average'])}"
    )
    print(profile_table(cells, args.quant, contexts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "tokens": args.tokens, "cells": cells}, f, indent=2)
    return 0
