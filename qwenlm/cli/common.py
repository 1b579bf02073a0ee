"""Options shared by the commands that load a model and generate."""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import time
from typing import Any

from qwenlm import registry


def add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    what = (
        "registry name, .gguf file or Hugging Face model folder "
        f"(default: {registry.DEFAULT_MODEL})"
    )
    if positional:
        p.add_argument(
            "model", nargs="?", default=registry.DEFAULT_MODEL, metavar="MODEL", help=what
        )
    else:
        p.add_argument("-m", "--model", default=registry.DEFAULT_MODEL, help=what)
    add_pull_arg(p)
    p.add_argument(
        "--cache-dir",
        help="model cache folder (default: $QWENLM_CACHE, $XDG_CACHE_HOME/qwenlm, ~/.cache/qwenlm)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weight dtype (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--quant",
        default="auto",
        choices=["auto", "none", "f32", "int8", "int4", "gguf"],
        help="weight format: int8/int4/f32 run on native CPU kernels (on CUDA: dequantized per "
        "forward pass), gguf runs a GGUF file's own formats as stored; none is plain PyTorch in "
        "--dtype (auto: on CPU gguf for a block-quantized GGUF file, else int8; none elsewhere)",
    )
    add_group_size_arg(p)
    p.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "float", "f16", "int8"],
        help="attention cache format: f16 takes half the memory and bytes per step of float32"
        " (llama.cpp's default), int8 a quarter (auto: f16 with --quant gguf, else float)",
    )
    p.add_argument(
        "--adapter",
        metavar="PATH",
        help="LoRA adapter folder (from qwenlm train, or PEFT) to apply to the model",
    )


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N processes: start with torchrun --nproc-per-node N -m "
        "qwenlm ... (gloo on CPU, NCCL on CUDA; rank 0 does the I/O; default 1)",
    )


def add_pull_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pull", action="store_true", help="pull a registry model first if it is not cached"
    )


def add_group_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        choices=[32, 64, 128],
        help="int4 group size (default 32)",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation settings)")
    g.add_argument("--temperature", type=float, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.8)")
    g.add_argument(
        "--top-k", type=int, help="sample among the k likeliest tokens; 0 is off (default 20)"
    )
    g.add_argument("--repetition-penalty", type=float, help="1.0 is off (default 1.05)")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate (default 2048)")
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop when TEXT is generated (not printed); repeatable",
    )


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {
        "temperature": 0.0 if args.greedy else args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "stop": tuple(args.stop) if args.stop else None,
    }
    return {k: v for k, v in opts.items() if v is not None}


def load_model(
    args: argparse.Namespace, *, quiet: bool = False, data_parallel: bool = False
) -> Any:
    """Load the model the options name. Under torchrun with ``--tensor-parallel N``, ranks
    other than 0 never return: they run rank 0's forward passes, then exit. Without it, more
    than one process is an error unless the command shards work over them (``data_parallel``)."""
    from qwenlm.api import load
    from qwenlm.parallel import DistributedError

    tp = getattr(args, "tensor_parallel", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and tp == 1 and not data_parallel:
        raise DistributedError(
            f"this command runs in one process, but torchrun started {world}",
            hint=f"add --tensor-parallel {world} to split the model over them",
        )
    quiet = quiet or int(os.environ.get("RANK", "0")) > 0
    t0 = time.perf_counter()
    if not quiet:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    model = load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        cache_dir=args.cache_dir,
        pull=args.pull,
        adapter=getattr(args, "adapter", None),
        quant=args.quant,
        group_size=args.group_size,
        kv_cache=args.kv_cache,
        tensor_parallel=tp,
    )
    if model.rank:
        model.follow()
        raise SystemExit(0)
    if tp > 1:
        atexit.register(model.close)  # however rank 0 ends, the other ranks are let go
    if not quiet:
        print(
            f"loaded in {time.perf_counter() - t0:.1f}s ({model.device}, {model.weight_format}"
            + (f", split over {tp} ranks)" if tp > 1 else ")"),
            file=sys.stderr,
            flush=True,
        )
    return model
