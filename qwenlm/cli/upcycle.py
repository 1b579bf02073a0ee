"""``qwenlm upcycle``: turn a dense Qwen2 checkpoint into a Qwen2-MoE model folder."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from qwenlm import registry
from qwenlm.models.upcycle import UpcycleSpec, ffn_copies, upcycle_tensors
from qwenlm.weights import open_checkpoint


def upcycle(
    *,
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: UpcycleSpec,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Upcycle ``model`` (registry name, GGUF or HF folder) and write the MoE folder ``out``."""
    from qwenlm.weights.hf_writer import write_hf_folder

    with open_checkpoint(registry.resolve(model, cache_dir=cache_dir)) as ckpt:
        config, tensors = upcycle_tensors(ckpt.config, ckpt.tensors(torch.float32), spec)
        weights = dict(tensors)
        if "lm_head.weight" not in weights and not config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        return write_hf_folder(
            out,
            config=config,
            tensors=weights,
            tokenizer=ckpt.tokenizer,
            chat_template=ckpt.chat_template,
            dtype=dtype,
        )


def build_parser() -> argparse.ArgumentParser:
    d = UpcycleSpec()
    p = argparse.ArgumentParser(
        prog="qwenlm upcycle",
        description="Turn a dense Qwen2 model into a mixture-of-experts model (Qwen2 report's "
        "upcycling: copied, shuffled, cut into fine-grained experts, partly re-initialised).",
    )
    p.add_argument("model", help="dense model: registry name, .gguf file or HF folder")
    p.add_argument("--out", required=True, help="folder to write the MoE model to")
    p.add_argument("--experts", type=int, default=d.num_experts, help="number of routed experts")
    p.add_argument("--top-k", type=int, default=d.num_experts_per_tok, help="experts per token")
    p.add_argument("--expert-size", type=int, help="expert width (default: FFN width / 4)")
    p.add_argument("--shared-size", type=int, help="shared expert width (default: FFN width)")
    p.add_argument("--sparse-step", type=int, default=1, help="every k-th layer is sparse")
    p.add_argument(
        "--reinit", type=float, default=d.reinit_fraction, help="fraction re-initialised"
    )
    p.add_argument("--no-shuffle", action="store_true", help="keep the FFN units in order")
    p.add_argument("--norm-topk-prob", action="store_true", help="renormalise top-k weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-dir", help="model cache folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = UpcycleSpec(
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size,
        shared_expert_intermediate_size=args.shared_size,
        decoder_sparse_step=args.sparse_step,
        reinit_fraction=args.reinit,
        shuffle=not args.no_shuffle,
        norm_topk_prob=args.norm_topk_prob,
        seed=args.seed,
    )
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    out = upcycle(model=args.model, out=args.out, spec=spec, dtype=dt, cache_dir=args.cache_dir)
    with open_checkpoint(out) as ck:
        c = ck.config
    copies = ffn_copies(c.num_experts, c.moe_intermediate_size, c.intermediate_size)
    print(
        f"upcycled: {c.num_experts} experts of {c.moe_intermediate_size} from {copies} copies of "
        f"the {c.intermediate_size}-wide FFN, shared expert {c.shared_expert_intermediate_size}; "
        f"written to {out}",
        file=sys.stderr,
    )
    return 0
