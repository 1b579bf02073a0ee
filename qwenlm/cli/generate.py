"""``qwenlm generate``: one prompt in, the model's reply streamed to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from qwenlm.cli.common import (
    add_model_args,
    add_parallel_args,
    add_sampling_args,
    load_model,
    sampling_options,
)
from qwenlm.errors import QwenlmError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm generate",
        description="Generate a reply to PROMPT (as a chat message, unless --raw) and print it.",
    )
    p.add_argument("prompt", help="the prompt; - reads it from stdin")
    add_model_args(p)
    add_parallel_args(p)
    p.add_argument("--system", help="system prompt (default: the model template's own)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="complete PROMPT as plain text, without the chat template",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="do not stop at end-of-turn tokens (for benchmarking)",
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", help="print token counts and speed to stderr"
    )
    g = p.add_argument_group(
        "speculative decoding (the same output as without it, for any sampling settings; "
        "fastest with --greedy)"
    )
    g.add_argument(
        "--draft", metavar="MODEL", help="a smaller model of the same family that proposes tokens"
    )
    g.add_argument(
        "--prompt-lookup", action="store_true", help="propose tokens by copying from the prompt"
    )
    g.add_argument(
        "--num-draft",
        type=int,
        default=None,
        help="the most tokens proposed per step (default 5 with --draft, 7 with --prompt-lookup)",
    )
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options = sampling_options(args)
    if args.ignore_eos:
        options["ignore_eos"] = True
    speculative = args.draft is not None or args.prompt_lookup
    if args.draft is not None and args.tensor_parallel > 1:
        raise QwenlmError(
            "--draft does not combine with --tensor-parallel", hint="use --prompt-lookup"
        )
    model = load_model(args, quiet=not args.verbose)
    model.generation_config(**options)  # validate the flags before any work
    stats = None
    spec = None
    if speculative:
        from qwenlm.generation.speculative import SpeculationStats

        draft = (
            load_model(
                argparse.Namespace(**{**vars(args), "model": args.draft}), quiet=not args.verbose
            )
            if args.draft
            else None
        )
        stats = SpeculationStats()
        spec = model.speculation(
            draft, prompt_lookup=args.prompt_lookup, num_draft=args.num_draft, stats=stats
        )
    if args.raw:
        stream = model.generate_chunks(prompt, speculate=spec, **options)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        stream = model.chat_chunks(
            [*messages, {"role": "user", "content": prompt}], speculate=spec, **options
        )
    t0 = time.perf_counter()
    last = None
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        s = time.perf_counter() - t0
        print(
            f"[{last.prompt_tokens} prompt tokens, {last.completion_tokens} generated in {s:.1f}s "
            f"({last.completion_tokens / s:.1f} tokens/s), finish: {last.finish_reason}]",
            file=sys.stderr,
        )
        if stats is not None:
            print(
                f"[speculation: {stats.accepted}/{stats.proposed} guesses accepted "
                f"({stats.acceptance_rate:.0%}), {stats.tokens_per_pass:.2f} tokens per target "
                f"pass]",
                file=sys.stderr,
            )
    return 0
