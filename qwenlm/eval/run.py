"""The evaluation harness: a task's samples through a model, scored, saved and resumable.

Data flows one way: ``task.load()`` gives samples; ``task.evaluate(engine, batch)`` turns a
batch of samples into per-sample records (prompting the model through :class:`EvalEngine`);
``task.summarize(records)`` gives the metrics. Records are appended to ``records.jsonl`` after
every batch, so an interrupted run picks up where it stopped.

Under torchrun the samples still to run are dealt out over the processes (``dist``): each runs
its share a batch at a time, in step with the others; after each round every process has every
new record, and rank 0 alone writes the files. A record depends on its sample only, so the
result is the one process's, whatever the process count, and a run interrupted with one count
resumes with another.

:class:`EvalEngine` is the only thing tasks know about the model. ``complete`` sends a batch of
requests through the engine's scheduler together (the same one the server runs), so they
decode side by side; each completion equals what the request gives alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from qwenlm.errors import QwenlmError
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.scheduler import Output, Scheduler
from qwenlm.generation.scheduler import Request as EngineRequest
from qwenlm.generation.stream import GenerationChunk, collect

if TYPE_CHECKING:
    from qwenlm.api import Qwen
    from qwenlm.parallel import Dist


class EvalError(QwenlmError):
    """A task's data is missing or malformed, or a run cannot be resumed as asked."""


MODES = ("chat", "base")


def check_mode(mode: str) -> str:
    """``mode`` if it is a prompting mode tasks know (chat template or plain text)."""
    if mode not in MODES:
        raise EvalError(f"unknown mode {mode!r}", hint="use chat or base")
    return mode


def task_data(name: str, data: str | Path | None, what: str, hint: str) -> Path:
    """Task ``name``'s data path, or one clear error naming ``what`` it needs and how to pass it."""
    if data is None:
        raise EvalError(f"{name} needs its {what}", hint=hint)
    return Path(data)


@dataclass(frozen=True)
class Request:
    """One completion to make: prompt token ids and how to decode."""

    prompt: tuple[int, ...]
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class EvalEngine:
    """What a task sees of a model: prompts in, completions or next-token scores out."""

    def __init__(self, model: Qwen, *, batch_size: int = 8) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        # Consecutive prompts of a task share a long prefix (instructions, few-shot examples):
        # the scheduler's prefix cache prefills it once.
        self.scheduler = Scheduler(
            model.engine, model.tokenizer, max_num_seqs=batch_size, max_queue=1 << 20
        )
        self.generated_tokens = 0

    def chat_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, reply_prefix: str = ""
    ) -> tuple[int, ...]:
        """Ids of a conversation with the assistant's turn opened, begun with ``reply_prefix``."""
        ids = self.model.encode_chat(messages)
        return tuple(ids + self.tokenizer.encode(reply_prefix))

    def text_prompt(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text))

    def complete(self, requests: Sequence[Request]) -> list[Completion]:
        """Completions for ``requests``, in order, decoded together."""
        outputs: list[list[Output]] = [[] for _ in requests]
        jobs = [
            EngineRequest(
                r.prompt,
                GenerationConfig(
                    max_new_tokens=r.max_new_tokens,
                    stop=r.stop,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    top_k=0,
                    repetition_penalty=1.0,
                    seed=r.seed,
                ),
                outs.append,
            )
            for r, outs in zip(requests, outputs, strict=True)
        ]
        self.scheduler.run(jobs)
        out = []
        for outs in outputs:
            errors = [o.error for o in outs if o.error is not None]
            if errors:
                raise EvalError(f"generation failed: {errors[0]}")
            result = collect(
                GenerationChunk(
                    o.text, o.token_ids, o.finish_reason, o.prompt_tokens, o.completion_tokens
                )
                for o in outs
            )
            self.generated_tokens += result.completion_tokens
            out.append(
                Completion(
                    result.text, result.finish_reason, result.prompt_tokens,
                    result.completion_tokens,
                )
            )  # fmt: skip
        return out

    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], candidates: Sequence[int]
    ) -> list[list[float]]:
        """For each prompt, the log-probabilities of the ``candidates`` as its next token."""
        out = []
        for prompt in prompts:
            logits = self.scheduler.prompt_logits(list(prompt))
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append([float(logprobs[c]) for c in candidates])
        return out


class Task(Protocol):
    """A benchmark: reads its data, prompts and scores a batch of samples, summarizes."""

    name: str

    def config(self) -> dict[str, Any]: ...  # settings that change the numbers (for resume checks)

    def load(self) -> list[dict[str, Any]]: ...  # samples, each with a unique "id"

    def evaluate(
        self, engine: EvalEngine, samples: list[dict[str, Any]]
    ) -> list[dict[str, Any]]: ...

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]: ...


@dataclass
class EvalResult:
    task: str
    model: str
    metrics: dict[str, float]
    records: list[dict[str, Any]]
    seconds: float  # wall time of this run, plus earlier runs that were resumed
    output: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            (self.task, k, f"{v:.4f}" if isinstance(v, float) else str(v))
            for k, v in self.metrics.items()
        ]
        rows.append((self.task, "samples", str(len(self.records))))
        rows.append((self.task, "seconds", f"{self.seconds:.0f}"))
        widths = [max(len(r[i]) for r in [("task", "metric", "value"), *rows]) for i in range(3)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
        return "\n".join(
            [
                line(("task", "metric", "value")),
                line(tuple("-" * w for w in widths)),
                *map(line, rows),
            ]
        )


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill mid-write: that sample runs again
    return records


def _start(
    output: str | os.PathLike[str] | None,
    meta: dict[str, Any],
    restart: bool,
    samples: list[dict[str, Any]],
    dist: Dist | None,
) -> tuple[Path | None, dict[Any, dict[str, Any]], float, list[int]]:
    """(records file, records already made by id, seconds spent, indices still to do); rank 0
    reads the run folder and sends the work list to the other ranks."""
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    done: dict[Any, dict[str, Any]] = {}
    earlier_seconds = 0.0
    records_path = None
    try:
        if output is not None and rank == 0:
            records_path, done, earlier_seconds = _resume(Path(output), meta, restart)
    except BaseException:
        if world > 1:
            dist.broadcast_ints([-1])  # the other ranks wait for the work list: let them go
        raise
    todo = [i for i, s in enumerate(samples) if s["id"] not in done]
    if world > 1:
        todo = dist.broadcast_ints(todo if rank == 0 else None)
        if todo == [-1]:
            raise EvalError("rank 0 could not open the run; its error says why")
    return records_path, done, earlier_seconds, todo


def _append(
    records_path: Path, new: list[dict[str, Any]], meta: dict[str, Any], seconds: float
) -> None:
    with records_path.open("a", encoding="utf-8") as f:
        for r in new:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (records_path.parent / "run.json").write_text(
        json.dumps({**meta, "seconds": seconds}, indent=1)
    )


def _write_summary(out: Path, result: EvalResult, meta: dict[str, Any], generated: int) -> None:
    summary = {
        "task": result.task,
        "model": result.model,
        "config": meta["config"],
        "settings": meta["settings"],
        "metrics": result.metrics,
        "samples": len(result.records),
        "seconds": round(result.seconds, 1),
        "generated_tokens": generated,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))


def _resume(
    out: Path, meta: dict[str, Any], restart: bool
) -> tuple[Path, dict[Any, dict[str, Any]], float]:
    """(records file, records already there by id, seconds spent) of run folder ``out``.

    Refuses a folder holding a run with other settings; ``restart`` discards what is there.
    """
    out.mkdir(parents=True, exist_ok=True)
    records_path, meta_path = out / "records.jsonl", out / "run.json"
    if restart:
        records_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
    earlier_seconds = 0.0
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} != meta:
            raise EvalError(
                f"{out} holds a run with other settings ({old.get('task')} on "
                f"{old.get('model')}, {old.get('config')})",
                hint="use another --output folder, or --restart to discard that run",
            )
        earlier_seconds = float(old.get("seconds", 0.0))
    done = {}
    if records_path.exists():
        for r in _read_records(records_path):
            done[r["id"]] = r
    meta_path.write_text(json.dumps({**meta, "seconds": earlier_seconds}, indent=1))
    return records_path, done, earlier_seconds


def run_eval(
    model: Qwen,
    task: Task,
    *,
    output: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    restart: bool = False,
    progress: bool = True,
    engine: EvalEngine | None = None,
    settings: dict[str, Any] | None = None,
    dist: Dist | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a :class:`qwenlm.Qwen`) on ``task``.

    With ``output`` (a folder), records go to ``records.jsonl`` as they are made and the
    summary to ``summary.json``; a later call with the same folder skips the samples already
    there (``restart=True`` starts over). ``limit`` evaluates the first N samples only.
    ``dist`` (from :func:`qwenlm.parallel.setup`) shares the samples among the processes
    torchrun started; every process calls ``run_eval`` alike and gets the whole result.
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    samples = task.load()
    if limit is not None:
        samples = samples[:limit]
    ids = [s["id"] for s in samples]
    if len(set(ids)) != len(ids):
        raise EvalError(f"{task.name}: sample ids are not unique")
    engine = engine or EvalEngine(model, batch_size=batch_size)
    model_name = str(getattr(model, "name", None) or "model")
    # ``settings``: how the model was loaded (quantization, dtype), which a resumed run must match.
    meta = {
        "task": task.name,
        "model": model_name,
        "config": task.config(),
        "settings": settings or {},
    }
    records_path, done, earlier_seconds, todo = _start(output, meta, restart, samples, dist)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=len(samples),
            initial=len(samples) - len(todo),
            desc=task.name,
            unit="sample",
            dynamic_ncols=True,
        )
    mine = todo[rank::world]
    rounds = -(-len(todo[::world]) // batch_size)  # rank 0's share is the largest
    t0 = time.monotonic()
    try:
        for i in range(rounds):
            batch = [samples[j] for j in mine[i * batch_size : (i + 1) * batch_size]]
            new = task.evaluate(engine, batch) if batch else []
            if world > 1:
                texts = dist.gather_bytes(json.dumps(new, ensure_ascii=False).encode())
                new = [r for text in texts for r in json.loads(text)]
            for r in new:
                done[r["id"]] = r
            if records_path is not None:
                _append(records_path, new, meta, earlier_seconds + time.monotonic() - t0)
            if bar is not None:
                bar.update(len(new))
    finally:
        if bar is not None:
            bar.close()
    records = [done[i] for i in ids if i in done]
    generated = engine.generated_tokens
    if world > 1:
        (total,) = dist.sum([float(generated)])
        generated = int(total)
    result = EvalResult(
        task.name,
        model_name,
        task.summarize(records),
        records,
        earlier_seconds + time.monotonic() - t0,
    )
    if output is not None:
        result.output = Path(output)
    if output is not None and rank == 0:
        _write_summary(Path(output), result, meta, generated)
    return result


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file (``.gz`` read as gzip); errors name the file and line."""
    import gzip

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"no such data file: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(
                    f"{p}:{n}: not valid JSON ({e.msg})", hint="each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise EvalError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def require(row: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise EvalError(
            f"{where}: missing field(s) {', '.join(missing)}",
            hint=f"each record needs {', '.join(keys)}",
        )
