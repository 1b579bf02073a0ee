"""``qwenlm longppl`` and ``qwenlm needle``: long-context evaluation with extensions on and off."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenlm.cli.common import add_model_args, load_model
from qwenlm.eval.longcontext import (
    LongContextError,
    default_variants,
    heatmap,
    needle_grid,
    parse_lengths,
    perplexity_by_length,
    ppl_table,
)

if TYPE_CHECKING:
    from qwenlm.api import Qwen


def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p, positional=True)
    p.set_defaults(quant="none")  # variants share the float weights
    p.add_argument("--data", required=True, help="a long UTF-8 text file")
    p.add_argument(
        "--variants",
        default="base,yarn,dca",
        help="comma-separated: base, yarn, dca (default: all three)",
    )
    p.add_argument("--yarn-factor", type=float, default=4.0, help="YaRN factor (default 4)")
    p.add_argument("--dca-chunk", type=int, help="DCA chunk size (default: trained context)")
    p.add_argument("--dca-local", type=int, help="DCA local size (default: chunk / 8)")
    p.add_argument("--output", "-o", help="where to write the results (JSON; PNG for needle)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _variants(args: argparse.Namespace, model: Qwen) -> dict[str, dict[str, Any]]:
    allv = default_variants(model.config, args.yarn_factor)
    dca = allv["dca"]["dual_chunk_attention_config"]
    if args.dca_chunk:
        dca["chunk_size"] = args.dca_chunk
        dca["local_size"] = max(args.dca_chunk // 8, 1)
    if args.dca_local:
        dca["local_size"] = args.dca_local
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in allv]
    if unknown:
        raise LongContextError(
            f"unknown variant(s) {', '.join(unknown)}", hint="use base, yarn, dca"
        )
    return {v: allv[v] for v in names}


def _load(args: argparse.Namespace) -> tuple[Any, str]:
    if args.quant != "none":
        raise LongContextError("long-context variants need --quant none")
    try:
        text = Path(args.data).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LongContextError(f"cannot read {args.data}: {e}") from None
    return load_model(args), text


def ppl_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm longppl",
        description="Perplexity by context length on a long text, with long-context extensions "
        "on and off: the same final tokens read with more and more context before them.",
    )
    _common(p)
    p.add_argument("--lengths", default="1k,2k,4k,8k,16k,32k", help="window lengths (tokens)")
    p.add_argument("--windows", type=int, default=1, help="windows per length (default 1)")
    p.add_argument(
        "--score-last", type=int, default=512, help="tokens scored at each window's end (512)"
    )
    return p


def ppl_main(argv: list[str] | None = None) -> int:
    args = ppl_parser().parse_args(argv)
    model, text = _load(args)
    variants = _variants(args, model)
    ids = model.tokenizer.encode(text)
    out = Path(args.output) if args.output else None
    rows: list[dict[str, Any]] = []

    def save(row: Any) -> None:
        rows.append(dataclasses.asdict(row))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"variants": variants, "rows": rows}, indent=1))

    result = perplexity_by_length(
        model.model,
        ids,
        parse_lengths(args.lengths),
        variants,
        score_last=args.score_last,
        windows=args.windows,
        progress=not args.no_progress,
        on_row=save,
    )
    print(ppl_table(result))
    return 0


def needle_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm needle",
        description="Needle in a haystack: a passcode hidden at each depth of each context length; "
        "greedy answers, a depth x length grid and a heatmap PNG.",
    )
    _common(p)
    p.add_argument("--lengths", default="1k,4k,8k,16k,32k", help="context lengths (tokens)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, 0 = start")
    p.add_argument("--seed", type=int, default=0, help="passcode seed")
    return p


def needle_main(argv: list[str] | None = None) -> int:
    args = needle_parser().parse_args(argv)
    try:
        depths = [float(d) for d in args.depths.split(",")]
    except ValueError:
        raise LongContextError(f"bad --depths {args.depths!r}") from None
    if any(not 0 <= d <= 1 for d in depths):
        raise LongContextError("depths must be between 0 and 1")
    model, text = _load(args)
    variants = _variants(args, model)
    out = Path(args.output or "needle")
    cells: list[dict[str, Any]] = []

    def save(cell: Any) -> None:
        cells.append(dataclasses.asdict(cell))
        out.mkdir(parents=True, exist_ok=True)
        (out / "needle.json").write_text(
            json.dumps({"variants": variants, "cells": cells}, indent=1)
        )

    result = needle_grid(
        model,
        text,
        parse_lengths(args.lengths),
        depths,
        variants,
        seed=args.seed,
        progress=not args.no_progress,
        on_cell=save,
    )
    png = heatmap(result, out / "needle.png", title=f"needle in a haystack: {model.name}")
    for name in variants:
        mine = [c for c in result if c.variant == name]
        print(f"{name}: {sum(c.found for c in mine)}/{len(mine)} found")
    print(f"heatmap: {png}", file=sys.stderr)
    return 0
