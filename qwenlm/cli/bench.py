"""``qwenlm bench``: speed, memory and perplexity of each weight format, as a table."""

from __future__ import annotations

import argparse
import json
import sys

from qwenlm import registry
from qwenlm.cli.common import add_group_size_arg


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
        choices=["none", "f32", "int8", "int4", "gguf"],
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


def build_profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm profile",
        description="The Qwen model cards' speed and memory table for each weight format: tokens/s "
        "generating 2048 and 8192 tokens from one token, peak memory encoding 2048 tokens and "
        "generating 8192. Every cell runs in a fresh process.",
    )
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL)
    p.add_argument(
        "--quant",
        nargs="+",
        default=["f32", "int8", "int4"],
        choices=["none", "f32", "int8", "int4", "gguf"],
    )
    p.add_argument(
        "--generate", type=int, nargs="+", default=[2048, 8192], help="generation lengths"
    )
    p.add_argument("--encode", type=int, nargs="+", default=[2048], help="prompt lengths to encode")
    p.add_argument("--kv-cache", default="float", choices=["float", "int8"])
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="FILE")
    return p


def profile_main(argv: list[str] | None = None) -> int:
    from qwenlm.benchmark import machine_info, run_profile_cell

    args = build_profile_parser().parse_args(argv)
    path = str(registry.resolve(args.model))
    cells = []
    for quant in args.quant:
        for task, lengths in (("generate", args.generate), ("encode", args.encode)):
            for n in lengths:
                print(f"{quant}: {task} {n} tokens ...", file=sys.stderr, flush=True)
                spec = {
                    "model": path,
                    "quant": quant,
                    "task": task,
                    "tokens": n,
                    "kv_cache": args.kv_cache,
                    "threads": args.threads,
                }
                cells.append(run_profile_cell(spec))
    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch "
        f"{info['torch']}, "
        f"KV cache {args.kv_cache}, load average "
        f"{', '.join(f'{x:.2f}' for x in info['load_average'])}"
    )
    head = (
        ["format"]
        + [f"generate {n} (tok/s)" for n in args.generate]
        + [f"encode {n} (tok/s)" for n in args.encode]
    )
    head += [f"peak MB encoding {n}" for n in args.encode] + [
        f"peak MB generating {n}" for n in args.generate
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for quant in args.quant:
        mine = [
            c
            for c in cells
            if c["quant"].split()[0] == quant
            or (quant == "none" and c["quant"].startswith("float"))
        ]
        get = {(c["task"], c["tokens"]): c for c in mine}
        row = [mine[0]["quant"] if mine else quant]
        row += [f"{get[('generate', n)]['tok_s']:.2f}" for n in args.generate]
        row += [f"{get[('encode', n)]['tok_s']:.2f}" for n in args.encode]
        row += [f"{get[('encode', n)]['peak_rss_mb']:.0f}" for n in args.encode]
        row += [f"{get[('generate', n)]['peak_rss_mb']:.0f}" for n in args.generate]
        print("| " + " | ".join(row) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "cells": cells}, f, indent=2)
    return 0
