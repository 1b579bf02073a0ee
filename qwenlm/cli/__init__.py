"""The ``qwenlm`` command: a thin dispatcher over subcommand modules.

Each subcommand module has ``build_parser()`` and ``main(argv)``; the work itself is done by
keyword-only functions of the Python API that users can import.
"""

from __future__ import annotations

import importlib
import os
import sys

from qwenlm import __version__

# name -> ("module:function", help); the function takes argv and returns an exit code.
COMMANDS = {
    "chat": ("qwenlm.cli.chat:main", "chat with a model in the terminal"),
    "generate": ("qwenlm.cli.generate:main", "generate a reply to one prompt, printed to stdout"),
    "pull": ("qwenlm.cli.models:main", "download and verify a registry model"),
    "list": ("qwenlm.cli.models:list_main", "list registry models and which are pulled"),
    "quantize": ("qwenlm.cli.quantize:main", "quantize a model to int8/int4 and save it"),
    "bench": ("qwenlm.cli.bench:main", "measure decode and prefill speed, memory and perplexity"),
    "profile": ("qwenlm.cli.bench:profile_main", "the model cards' speed and memory table"),
    "train": ("qwenlm.cli.train:main", "pretrain, fine-tune (full, LoRA, Q-LoRA) or DPO-train"),
    "merge": ("qwenlm.cli.merge:main", "fold a LoRA adapter into its base model"),
    "export": ("qwenlm.cli.export:main", "write a model as a GGUF file for llama.cpp / Ollama"),
    "upcycle": ("qwenlm.cli.upcycle:main", "turn a dense model into a mixture of experts"),
    "longppl": ("qwenlm.cli.longctx:ppl_main", "perplexity by context length, extensions on/off"),
    "needle": ("qwenlm.cli.longctx:needle_main", "needle-in-a-haystack grid and heatmap"),
    "serve": ("qwenlm.cli.serve:main", "serve an OpenAI-compatible API and a web chat page"),
    "eval": (
        "qwenlm.cli.eval:main",
        "evaluate a model on a benchmark (HumanEval, MMLU, GSM8K ...)",
    ),
}


def _usage() -> str:
    lines = [f"qwenlm {__version__}: run Qwen models", "", "usage: qwenlm COMMAND [options]", ""]
    lines += [f"  {name:<10} {help}" for name, (_, help) in COMMANDS.items()]
    lines += ["", "`qwenlm COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"qwenlm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"qwenlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from qwenlm.errors import QwenlmError, debug_tracebacks

    try:
        module, _, function = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module), function)(argv[1:])
    except QwenlmError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `qwenlm generate ... | head`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug_tracebacks():
            raise
        print(f"error: unexpected {type(e).__name__}: {e}", file=sys.stderr)
        print(
            "hint: rerun with QWENLM_DEBUG=1 for the full traceback and report it", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
