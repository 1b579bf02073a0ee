"""``qwenlm quantize``: convert a model to int8 / int4 weights and save it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from qwenlm import registry
from qwenlm.cli.common import add_group_size_arg, add_pull_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm quantize",
        description="Quantize a model's weights and save it as a folder that every qwenlm command "
        "loads.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=registry.DEFAULT_MODEL,
        help="registry name, .gguf file or model folder",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--mode",
        default="int8",
        choices=["int8", "int4", "f32"],
        help="weight format (default int8)",
    )
    add_group_size_arg(p)
    p.add_argument(
        "--head",
        choices=["int8", "int4", "f32"],
        help="output head format (default: int8 for int4)",
    )
    p.add_argument("--cache-dir", help="model cache folder")
    add_pull_arg(p)
    return p


def quantize_checkpoint(
    model: str,
    *,
    out: str | Path,
    mode: str = "int8",
    group_size: int = 32,
    head: str | None = None,
    cache_dir: str | None = None,
    pull: bool = False,
) -> Path:
    """Read ``model``, quantize it slice by slice, and write it to ``out``."""
    from qwenlm.quant import load_quantized, save_quantized
    from qwenlm.weights import open_checkpoint

    path = registry.resolve(model, cache_dir=cache_dir, pull=pull)
    with open_checkpoint(path) as ckpt:
        net = load_quantized(ckpt, mode, group_size=group_size, head=head)
        return save_quantized(net, out, tokenizer=ckpt.tokenizer, chat_template=ckpt.chat_template)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out = quantize_checkpoint(
        args.model,
        out=args.out,
        mode=args.mode,
        group_size=args.group_size,
        head=args.head,
        cache_dir=args.cache_dir,
        pull=args.pull,
    )
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(
        f"wrote {out} ({size / 1e6:.0f} MB of weights) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    return 0
