"""``qwenlm merge --adapter ADAPTER --out FOLDER``: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def merge_adapter(
    *,
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str | os.PathLike[str] | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write base + adapter as one Hugging Face model folder that ``qwenlm.load`` reads.

    ``model`` defaults to the adapter's ``base_model_name_or_path``. A GGUF base is written
    dequantized, with tokenizer files generated from its vocabulary.
    """
    from qwenlm import registry
    from qwenlm.lora import AdapterError, load_adapter, merge_lora, read_adapter_config
    from qwenlm.models import build_model
    from qwenlm.weights import open_checkpoint
    from qwenlm.weights.hf_writer import write_hf_folder

    base = model or read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise AdapterError(
            f"{adapter}/adapter_config.json names no base model", hint="pass the base with -m MODEL"
        )
    out = Path(out)
    if out.resolve() == Path(adapter).resolve():
        raise AdapterError("--out must differ from the adapter folder")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with open_checkpoint(registry.resolve(base, cache_dir=cache_dir)) as ckpt:
        net = build_model(ckpt.config, ckpt.tensors(torch.float32))
        load_adapter(net, adapter)
        merge_lora(net)
        generation = dict(ckpt.generation_defaults)
        if "stop_token_ids" in generation:
            generation["eos_token_id"] = list(generation.pop("stop_token_ids"))
        return write_hf_folder(
            out,
            config=ckpt.config,
            tensors=dict(net.state_dict()),
            tokenizer=ckpt.tokenizer,
            chat_template=ckpt.chat_template,
            dtype=dt,
            generation=generation or None,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm merge",
        description="Fold a LoRA adapter into its base model and write a Hugging Face model "
        "folder.",
    )
    p.add_argument(
        "--adapter", required=True, help="adapter folder (adapter_config.json + weights)"
    )
    p.add_argument("--out", required=True, help="folder to write the merged model to")
    p.add_argument(
        "-m", "--model", help="base model (default: the adapter's base_model_name_or_path)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-dir", help="model cache folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"merging {args.adapter} into {args.model or 'its base model'} ...", file=sys.stderr)
    out = merge_adapter(
        adapter=args.adapter,
        out=args.out,
        model=args.model,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
    )
    print(f"merged model written to {out}", file=sys.stderr)
    return 0
