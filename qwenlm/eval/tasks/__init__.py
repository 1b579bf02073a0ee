"""The benchmarks, one module each; ``make_task(name, ...)`` builds one by name."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from qwenlm.eval.run import EvalError, Task

# name -> "module:class"; loaded on use so one task's imports never slow another.
TASKS = {
    "humaneval": "qwenlm.eval.tasks.humaneval:HumanEval",
    "mbpp": "qwenlm.eval.tasks.mbpp:MBPP",
    "gsm8k": "qwenlm.eval.tasks.gsm8k:GSM8K",
    "math": "qwenlm.eval.tasks.math:MATH",
    "mmlu": "qwenlm.eval.tasks.mmlu:MMLU",
    "cmmlu": "qwenlm.eval.tasks.cmmlu:CMMLU",
    "ceval": "qwenlm.eval.tasks.ceval:CEval",
    "bbh": "qwenlm.eval.tasks.bbh:BBH",
    "perplexity": "qwenlm.eval.perplexity:Perplexity",
    "tooluse": "qwenlm.eval.tasks.tooluse:ToolUse",
}


def task_class(name: str) -> type:
    if name not in TASKS:
        raise EvalError(f"unknown task {name!r}", hint=f"tasks are {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_task(name: str, data: str | None = None, **options: Any) -> Task:
    """Build task ``name`` from its data path and the options it accepts (others are ignored,
    so one set of command-line flags serves every task; ``None`` means the task's default)."""
    cls = task_class(name)
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(data, **kwargs)
