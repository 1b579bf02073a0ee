"""Continuous batching: one engine thread serving every request, new ones joining between steps.

Each request (a :class:`Job`) has a prompt and ``n`` choices. The engine thread loops:

1. drop jobs whose client went away or whose time ran out;
2. admit waiting jobs while the running choices fit in ``max_num_seqs``;
3. step: one token of every running choice, in groups of ``SMALL_SEGMENT`` rows per forward (the
   ragged batch of :class:`~qwenlm.generation.engine.Engine`: weights read once per group); the
   rows a group leaves free carry pieces of prompts being prefilled, and prompts get up to
   ``prefill_budget`` more tokens in forwards of their own, so a long prompt never stalls the
   running streams for long.

Every forward stays on the engine's exact per-row path (at most ``SMALL_SEGMENT`` rows, prompt
pieces of at most ``SMALL_SEGMENT`` tokens), where a token's numbers do not depend on what it was
batched with or how its prompt was cut. So a request gives the same tokens alone, under load, or
with its prefix taken from the cache: with a seed, the same text every time. A larger
``prefill_chunk`` prefills long prompts faster through the fused path, at the price of
rounding-level differences between those cases.

Finished sequences go to a small prefix cache; a later prompt that starts with the same tokens
(the next turn of a conversation, a shared system prompt) takes that sequence and prefills only
the rest. The ``n`` choices of one request share one prefill: the prompt's cache is copied.
Results go back to the asyncio side through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenlm.generation.engine import SMALL_SEGMENT, Engine, SequenceState
from qwenlm.generation.generate import GenerationConfig, TextStream, make_generator
from qwenlm.generation.sampling import apply_repetition_penalty, sample
from qwenlm.serve.protocol import APIError, SamplingParams
from qwenlm.tokenizer import Tokenizer

log = logging.getLogger("qwenlm.serve")


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the ``top`` alternatives (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """One event for a request: new text of choice ``index``; the last one has ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the engine failed (the request gets a 500)


class Job:
    """One request on its way through the engine: prompt, parameters, choices, results."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        config: GenerationConfig,
        *,
        n: int = 1,
        max_new_tokens: int,
        timeout: float | None = None,
        events: asyncio.Queue[Output] | None = None,
        offset: int = 0,
    ) -> None:
        """``events`` may be shared by several jobs (a batch of prompts), whose choices are
        then numbered from ``offset``."""
        self.prompt = list(prompt)
        self.params = params
        self.config = config
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.arrived = time.monotonic()
        self.deadline = None if timeout is None else self.arrived + timeout
        self.first_token_at: float | None = None
        self.cancelled = False
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Output] = events if events is not None else asyncio.Queue()
        self.offset = offset
        # Engine-thread state.
        self.seq: SequenceState | None = None
        self.pending: list[int] = []
        self.choices: list[_Choice] = []
        self.unfinished = n

    def cancel(self) -> None:
        """Stop generating (the client left); the engine drops the job at its next step."""
        self.cancelled = True

    def _emit(self, out: Output) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, out)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True


class _Choice:
    """One of a job's ``n`` sequences being decoded: its cache, sampler and text stream."""

    def __init__(
        self, job: Job, index: int, seq: SequenceState, tokenizer: Tokenizer, engine: Engine
    ) -> None:
        self.job = job
        self.index = index
        self.seq = seq
        c = job.config
        self.stream = TextStream(tokenizer, c, len(job.prompt), job.max_new_tokens)
        if c.seed is not None:
            c = GenerationConfig(**{**c.__dict__, "seed": c.seed + index})
        self.generator = make_generator(c, engine.device)
        vocab = engine.config.vocab_size
        p = job.params
        self.seen: torch.Tensor | None = None
        if job.config.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=engine.device)
            self.seen[torch.tensor(job.prompt, device=engine.device)] = True
        self.counts: torch.Tensor | None = None
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, device=engine.device)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=engine.device)
            self.bias = (ids, torch.tensor(list(p.logit_bias.values()), device=engine.device))
        self.token: int | None = None  # sampled, not yet fed to the model
        self.logprobs: list[TokenLogprob] = []  # of tokens not yet released in a chunk

    def take(self, logits: torch.Tensor) -> Output | None:
        """Sample the next token from ``logits`` (vocab,); returns an event if text came out."""
        c, p = self.job.config, self.job.params
        x = logits
        if self.bias is not None:
            x = x.clone()
            x[self.bias[0]] += self.bias[1]
        if self.seen is not None:
            x = apply_repetition_penalty(x, self.seen, c.repetition_penalty)
        if self.counts is not None:
            x = x - self.counts * p.frequency_penalty - (self.counts > 0) * p.presence_penalty
        token = sample(
            x, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, generator=self.generator
        )
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        self.token = token
        if p.logprobs and token not in self.stream.stop_ids:
            # Log-probabilities of the model's own distribution, before any sampling settings.
            lp = torch.log_softmax(logits.float(), -1)
            top: list[tuple[int, float]] = []
            if p.top_logprobs:
                values, ids = torch.topk(lp, p.top_logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            self.logprobs.append(TokenLogprob(token, float(lp[token]), top))
        chunk = self.stream.push(token)
        if chunk is None:
            return None
        lps = None
        if p.logprobs:
            k = len(chunk.token_ids)
            lps, self.logprobs = self.logprobs[:k], self.logprobs[k:]
        return Output(
            self.job.offset + self.index,
            chunk.text,
            chunk.token_ids,
            lps,
            chunk.finish_reason,
            chunk.prompt_tokens,
            chunk.completion_tokens,
        )

    @property
    def done(self) -> bool:
        return self.stream.finish_reason is not None


def fork(engine: Engine, seq: SequenceState) -> SequenceState:
    """A copy of ``seq`` with its own cache (the other choices of a request share its prompt)."""
    new = engine.new_sequence()
    n = len(seq)
    new.cache.reserve(n)
    src, dst = seq.cache, new.cache
    for a, b in (
        (src.keys, dst.keys),
        (src.values, dst.values),
        (src.key_scales, dst.key_scales),
        (src.value_scales, dst.value_scales),
    ):
        for x, y in zip(a, b, strict=True):
            y[:, :n] = x[:, :n]
    new.tokens = list(seq.tokens)
    dst.length = n
    return new


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """Finished sequences kept for reuse, least recently used first out, within a token budget."""

    def __init__(self, engine: Engine, max_tokens: int, min_match: int = 16) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.min_match = min_match
        self.entries: collections.OrderedDict[int, SequenceState] = collections.OrderedDict()

    def take(self, prompt: Sequence[int]) -> tuple[SequenceState, int]:
        """A sequence for ``prompt`` and how many of its tokens are already cached."""
        best, best_n = None, 0
        for key, seq in self.entries.items():
            n = _common_prefix(seq.tokens, prompt)
            if n > best_n:
                best, best_n = key, n
        if best is not None and best_n >= self.min_match:
            seq = self.entries.pop(best)
            return seq, seq.reuse(prompt)
        return self.engine.new_sequence(), 0

    def put(self, seq: SequenceState) -> None:
        if self.max_tokens <= 0 or seq.cache.capacity > self.max_tokens:
            return
        self.entries[id(seq)] = seq
        while sum(s.cache.capacity for s in self.entries.values()) > self.max_tokens:
            self.entries.popitem(last=False)


@dataclass
class Metrics:
    """Counters for /metrics (written by the engine thread, read by the server)."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    engine_errors: int = 0


class Scheduler:
    """Owns the engine thread; ``submit`` jobs from the asyncio side, read their ``events``."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        max_num_seqs: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = SMALL_SEGMENT,
        prefill_budget: int = 64,
        prefix_cache_tokens: int = 16384,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = max(prefill_budget, prefill_chunk)
        self.prefix_cache = PrefixCache(engine, prefix_cache_tokens)
        self.metrics = Metrics()
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._prefilling: list[Job] = []
        self._running: list[Job] = []
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- the asyncio side -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qwenlm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue is a 503 with Retry-After."""
        if job.n > self.max_num_seqs:
            raise APIError(
                400,
                f"Invalid 'n': this server runs at most {self.max_num_seqs} sequences at once.",
                param="n",
            )
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise APIError(
                    503,
                    "The server is overloaded: too many requests are waiting. Retry shortly.",
                    type="server_error",
                    code="server_overloaded",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    @property
    def running(self) -> int:
        """Requests being prefilled or decoded."""
        return len(self._prefilling) + len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._waiting or self._prefilling or self._running):
                    self._cv.wait()
                if self._stop:
                    break
            self._reap()
            self._admit()
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a failing forward must not take the server down
                log.error("engine error: %s", type(e).__name__)
                self.metrics.engine_errors += 1
                for job in [*self._prefilling, *self._running]:
                    job._emit(Output(0, "", [], error="the engine failed on this request"))
                self._prefilling, self._running = [], []
        for job in [*self._waiting, *self._prefilling, *self._running]:
            job._emit(Output(0, "", [], error="the server is shutting down"))

    def _admit(self) -> None:
        with self._cv:
            busy = sum(j.n for j in self._prefilling) + sum(j.unfinished for j in self._running)
            while self._waiting and busy + self._waiting[0].n <= self.max_num_seqs:
                job = self._waiting.popleft()
                if job.cancelled:
                    continue
                busy += job.n
                job.seq, cached = self.prefix_cache.take(job.prompt)
                job.pending = job.prompt[cached:]
                self.metrics.prompt_tokens += len(job.prompt)
                self.metrics.prefix_cached_tokens += cached
                self._prefilling.append(job)

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cv:
            for job in list(self._waiting):
                if job.cancelled:
                    self._waiting.remove(job)
                    self.metrics.requests["cancelled"] += 1
        for job in [*self._prefilling, *self._running]:
            if job.cancelled:
                self._finish_job(job, "cancelled")
            elif job.deadline is not None and now > job.deadline:
                # Out of time: each unfinished choice ends with what it has, as if cut by length.
                for ch in job.choices:
                    if not ch.done:
                        ch.stream.finish_reason = "length"
                        job._emit(
                            Output(
                                job.offset + ch.index,
                                ch.stream.pending,
                                [],
                                finish_reason="length",
                                prompt_tokens=len(job.prompt),
                                completion_tokens=ch.stream.completion_tokens,
                            )
                        )
                for i in range(len(job.choices), job.n):
                    job._emit(Output(job.offset + i, "", [], None, "length", len(job.prompt), 0))
                self._finish_job(job, "timeout")

    def _finish_job(self, job: Job, outcome: str) -> None:
        if job in self._prefilling:
            self._prefilling.remove(job)
            if job.seq is not None:
                self.prefix_cache.put(job.seq)  # what was prefilled so far is still valid
        if job in self._running:
            self._running.remove(job)
        for ch in job.choices:
            self.prefix_cache.put(ch.seq)
        job.choices = []
        self.metrics.requests[outcome] += 1

    def _step(self) -> None:
        """One round: every running choice advances one token; prompts advance a chunk."""
        decoding = [ch for job in self._running for ch in job.choices if not ch.done]
        queue = list(self._prefilling)
        exact = self.prefill_chunk <= SMALL_SEGMENT
        budget = self.prefill_budget
        while decoding or (queue and budget > 0):
            group, decoding = decoding[:SMALL_SEGMENT], decoding[SMALL_SEGMENT:]
            fills: list[tuple[Job, list[int]]] = []
            if exact:
                # Prompt pieces ride in the rows a decode group leaves free (all rows stay on
                # the exact per-row path); without decode rows they spend the step's budget.
                spare = SMALL_SEGMENT - len(group)
                for job in queue:
                    if spare <= 0 or (not group and budget <= 0):
                        break
                    piece = job.pending[: min(spare, self.prefill_chunk)]
                    job.pending = job.pending[len(piece) :]
                    fills.append((job, piece))
                    spare -= len(piece)
                    if not group:
                        budget -= len(piece)
            elif not group and queue:
                job = queue[0]
                piece = job.pending[: self.prefill_chunk]
                job.pending = job.pending[len(piece) :]
                fills.append((job, piece))
                budget -= len(piece)
            if not group and not fills:
                break
            segments = [(ch.seq, [ch.token]) for ch in group]
            segments += [(job.seq, piece) for job, piece in fills]
            logits = self.engine.forward(segments)
            if group:
                self.metrics.decode_steps += 1
            for ch, lg in zip(group, logits, strict=False):
                self._took(ch, ch.take(lg))
            for (job, _), lg in zip(fills, logits[len(group) :], strict=True):
                if not job.pending:
                    queue.remove(job)
                    self._start(job, lg)

    def _start(self, job: Job, logits: torch.Tensor) -> None:
        """The prompt is in the cache: fork it for the other choices, sample first tokens."""
        self._prefilling.remove(job)
        seqs = [job.seq] + [fork(self.engine, job.seq) for _ in range(job.n - 1)]
        job.choices = [_Choice(job, i, s, self.tokenizer, self.engine) for i, s in enumerate(seqs)]
        job.first_token_at = time.monotonic()
        self.metrics.ttft_sum += job.first_token_at - job.arrived
        self.metrics.ttft_count += 1
        self._running.append(job)
        for ch in job.choices:
            self._took(ch, ch.take(logits))

    def _took(self, ch: _Choice, out: Output | None) -> None:
        self.metrics.generation_tokens += 1
        if out is None:
            return
        job = ch.job
        job._emit(out)
        if out.finish_reason is not None:
            job.unfinished -= 1
            if job.unfinished == 0:
                self._finish_job(job, out.finish_reason)

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "waiting": self.waiting}
