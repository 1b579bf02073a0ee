"""``qwenlm export MODEL --gguf OUT.gguf``: write a model as a GGUF file that llama.cpp loads."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def export_gguf(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type: str = "f16",
    adapter: str | os.PathLike[str] | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    pull: bool = False,
) -> Path:
    """Write ``model`` as a GGUF file at ``out`` with its tokenizer and chat template inside.

    ``model`` is a registry name, a GGUF file or a Hugging Face model folder (such as the ones
    ``qwenlm train`` and ``qwenlm merge`` write); ``adapter`` is a LoRA adapter folder, merged
    into the weights first. ``type`` is the matrices' format: ``f16``, ``q8_0`` or ``f32``
    (norms and biases stay f32). The file is written atomically and an existing ``out`` is only
    replaced with ``force=True``. Supported: Qwen2 (dense) and Qwen2-MoE.
    """
    from qwenlm import registry
    from qwenlm.models import build_model, model_class
    from qwenlm.weights import open_checkpoint
    from qwenlm.weights.gguf_writer import (
        ExportError,
        check_exportable,
        check_output,
        write_gguf,
    )

    check_output(out, type=type, force=force)  # before minutes of work, not after
    with open_checkpoint(registry.resolve(model, cache_dir=cache_dir, pull=pull)) as ckpt:
        if ckpt.quantization is not None:
            raise ExportError(
                f"{ckpt.path} is a quantized checkpoint, which GGUF export does not read",
                hint="export the float model it was made from",
            )
        config = ckpt.config
        check_exportable(config)
        with torch.device("meta"):
            expected = {
                n: tuple(p.shape) for n, p in model_class(config)(config).named_parameters()
            }
        stored = ckpt.shapes()
        # A head tied to the embedding is not written: llama.cpp then uses token_embd.
        if config.tie_word_embeddings or "lm_head.weight" not in stored:
            expected.pop("lm_head.weight", None)
        if adapter is None:
            # Streamed from the checkpoint one tensor at a time.
            for n, shape in expected.items():
                if n not in stored:
                    raise ExportError(f"{ckpt.path} is missing tensor {n}")
                if tuple(stored[n]) != shape:
                    raise ExportError(
                        f"{ckpt.path}: tensor {n} has shape {list(stored[n])}, "
                        f"the config implies {list(shape)}"
                    )
            read = ckpt.read
        else:
            from qwenlm.lora import load_adapter, merge_lora

            net = build_model(config, ckpt.tensors(torch.float32))
            load_adapter(net, adapter)
            read = merge_lora(net).state_dict().__getitem__
        return write_gguf(
            out,
            config=config,
            tokenizer=ckpt.tokenizer,
            chat_template=ckpt.chat_template,
            shapes=expected,
            read=read,
            type=type,
            name=ckpt.name,
            force=force,
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm export",
        description="Write a model (optionally with a LoRA adapter merged) as a GGUF file that "
        "llama.cpp (and tools built on it, such as Ollama) loads, with its tokenizer and chat "
        "template inside.",
    )
    p.add_argument("model", metavar="MODEL", help="registry name, .gguf file or model folder")
    p.add_argument("--gguf", required=True, metavar="OUT", help="the .gguf file to write")
    p.add_argument(
        "--type",
        default="f16",
        choices=["f16", "q8_0", "f32"],
        help="format of the weight matrices (default f16; norms and biases stay f32)",
    )
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder to merge in first")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--pull", action="store_true", help="pull a registry model first if needed")
    p.add_argument("--cache-dir", help="model cache folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"exporting {args.model} to {args.gguf} ({args.type}) ...", file=sys.stderr)
    out = export_gguf(
        args.model,
        args.gguf,
        type=args.type,
        adapter=args.adapter,
        force=args.force,
        cache_dir=args.cache_dir,
        pull=args.pull,
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0
