"""Continuous batching: the one loop that turns requests into tokens, for every surface.

A :class:`Request` is a prompt, ``n`` choices, a :class:`GenerationConfig` and a ``deliver``
callback for its :class:`Output` events. :meth:`Scheduler.step` runs one round:

1. drop requests that were cancelled or ran out of time;
2. admit waiting requests while the running choices fit in ``max_num_seqs``;
3. decode: one segment per running choice (its last token, plus a proposer's guesses under
   speculative decoding) in groups of at most ``SMALL_SEGMENT`` rows per forward pass, the
   engine's row-exact path: weights are read once per group, and a row's numbers do not
   depend on its group;
4. prefill: the next piece of the oldest waiting prompt, alone in its forward pass, cut at
   the engine's fixed boundaries. On the engine's row-exact prefill path (every row computed
   on its own: GGUF formats, tiled int8) at most ``prefill_step`` of its tokens a step,
   riding in the decode step's first forward pass when streams are running: a long prompt
   then holds them back one part at a time (a 512-token piece alone on 2 cores: ~1.7 s, a
   64-token part ~0.2 s), its numbers are those of one piece, and no pass of its own reads
   the weights again.

The CLI and the Python API drive a scheduler step by step on the calling thread
(``generate.py``); the evaluator runs a batch of requests to the end (:meth:`Scheduler.run`);
the server runs it on a thread of its own (:meth:`Scheduler.start`) and knows nothing of its
insides. Finished sequences go to a small prefix cache that later prompts starting with the
same tokens reuse, in whole prefill pieces only, so a cache hit changes no result. Nothing
here knows about HTTP: a full queue is :class:`QueueFull`, which the server answers with 503.

On its own thread the loop cannot die silently: an unexpected error ends it with
:attr:`Scheduler.error` set, every request then gets an error event and later submissions
:class:`EngineFailed`; :attr:`Scheduler.stalled_for` tells a watchdog how long a busy loop has
gone without finishing a step. Errors that belong to one request (its admission, its forward
pass, its sampling) fail that request only. :meth:`Scheduler.drain` is the graceful shutdown.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from qwenlm.errors import GenerationError, debug_tracebacks, loggable
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.engine import SMALL_SEGMENT, Engine, SequenceState
from qwenlm.generation.sampling import Sampler, TokenLogprob, token_logprobs
from qwenlm.generation.speculative import Proposer, Speculation, SpeculationStats
from qwenlm.generation.stream import TextStream
from qwenlm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from qwenlm.lora import Adapter

log = logging.getLogger("qwenlm.engine")
T = TypeVar("T")
# Prompt tokens a step feeds on the engine's row-exact prefill path: one native call
# (fastpath.PIECE_ROWS), ~0.2 s of the 0.5B on 2 cores, which the running streams wait out.
PREFILL_STEP = 64


class QueueFull(GenerationError):
    """Too many requests are waiting; try again shortly."""


class EngineFailed(GenerationError):
    """The engine loop stopped on an unexpected error; no request can be served."""


class ShuttingDown(GenerationError):
    """The scheduler is draining before the process exits; it takes no new request."""


@dataclass
class Output:
    """One event of a request: new text of choice ``index``; the last one has ``finish_reason``."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" on a choice's last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # generation failed; the choice ends here
    # Of prompt tokens 1.. (the first has none), on a choice's first event when asked for.
    prompt_logprobs: list[TokenLogprob] | None = None


def check_prompt(model_config: object, prompt: Sequence[int], max_new_tokens: int) -> int:
    """Validate prompt ids against a :class:`~qwenlm.config.ModelConfig`; returns how many
    tokens may still be generated (the request's limit, cut at the context's end)."""
    context = model_config.max_position_embeddings
    vocab = model_config.vocab_size
    if not prompt:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(prompt) >= context:
        raise GenerationError(
            f"the prompt is {len(prompt)} tokens, but the model's context is {context} tokens",
            hint="shorten the prompt or the conversation history",
        )
    if any(not 0 <= int(t) < vocab for t in prompt):
        raise GenerationError(f"the prompt holds token ids outside 0..{vocab - 1}")
    return min(max_new_tokens, context - len(prompt))


class Request:
    """One request on its way through the scheduler: prompt, settings, choices, delivery.

    ``deliver`` is called with each :class:`Output` (on the scheduler's thread). ``sequence``
    continues a caller-held :class:`SequenceState` (a conversation), reusing all it holds;
    without one the prefix cache is used. Choices are numbered from ``offset``.

    ``prompt_logprobs=k`` scores the prompt: it is prefilled afresh with every row's logits,
    and each choice's first event carries the log-probability of every prompt token after the
    first (with ``k`` alternatives). ``generate=False`` stops there: one event per choice,
    ``finish_reason="length"``, no token sampled (lm-evaluation-harness's loglikelihood).
    ``adapter`` runs the request with that LoRA adapter (the engine's ``adapters`` router).
    """

    def __init__(
        self,
        prompt: Sequence[int],
        config: GenerationConfig,
        deliver: Callable[[Output], None],
        *,
        n: int = 1,
        timeout: float | None = None,
        offset: int = 0,
        sequence: SequenceState | None = None,
        speculation: Speculation | None = None,
        prompt_logprobs: int | None = None,
        generate: bool = True,
        adapter: Adapter | None = None,
    ) -> None:
        if n < 1:
            raise GenerationError(f"n must be at least 1, got {n}")
        if sequence is not None and n != 1:
            raise GenerationError("a caller-held sequence takes one choice (n=1)")
        if prompt_logprobs is not None and sequence is not None:
            raise GenerationError("prompt_logprobs scores a fresh sequence, not a caller-held one")
        self.prompt = [int(t) for t in prompt]
        self.config = config
        self.deliver = deliver
        self.n = n
        self.offset = offset
        self.sequence = sequence
        self.speculation = speculation
        self.prompt_logprobs = prompt_logprobs
        self.generate = generate
        self.adapter = adapter
        self.arrived = time.monotonic()
        self.deadline = None if timeout is None else self.arrived + timeout
        self.first_token_at: float | None = None
        self.cancelled = False
        self.finished = False
        # Scheduler state.
        self.limit = 0  # tokens each choice may generate
        self.seq: SequenceState | None = None
        self.pending: list[int] = []
        self.cached = 0
        self.scored: list[TokenLogprob] = []  # prompt_logprobs so far
        self.choices: list[_Choice] = []
        self.unfinished = n

    def cancel(self) -> None:
        """Stop generating (the client left); the scheduler drops the request at its next step."""
        self.cancelled = True

    def _emit(self, out: Output) -> None:
        try:
            self.deliver(out)
        except Exception as e:  # a consumer that is gone must not stop the engine
            _log_error("delivering a result failed; cancelling the request", e)
            self.cancelled = True


class _Choice:
    """One of a request's ``n`` sequences being decoded: cache, sampler, stream, proposer."""

    def __init__(
        self,
        req: Request,
        index: int,
        seq: SequenceState,
        engine: Engine,
        tok: Tokenizer | None,
    ) -> None:
        self.req = req
        self.index = index
        self.seq = seq
        self.sampler = Sampler(
            req.config, req.prompt, engine.config.vocab_size, engine.device, seed_offset=index
        )
        self.stream = TextStream(tok, req.config, len(req.prompt), req.limit)
        self.token: int | None = None  # sampled, not yet fed to the model
        self.proposer: Proposer | None = None
        self.stats: SpeculationStats | None = None
        if req.speculation is not None:
            self.proposer = req.speculation.proposer()
            self.stats = req.speculation.stats
        self.drafts: list[int] = []

    @property
    def done(self) -> bool:
        return self.stream.finish_reason is not None

    def segment(self, context_end: int) -> list[int]:
        """The tokens to feed this step: the last sampled one and any guesses after it."""
        self.drafts = []
        if self.proposer is not None:
            room = min(
                self.req.speculation.max_guesses,
                self.req.limit - self.stream.completion_tokens - 1,
                context_end - len(self.seq) - 2,
            )
            if room > 0:
                self.drafts = self.proposer.propose([*self.seq.tokens, self.token], room)[:room]
        return [self.token, *self.drafts]

    def take(self, rows: torch.Tensor) -> list[Output]:
        """Sample from the logits of this step's rows ((T, vocab) or (vocab,)); keep guesses
        while they equal what was sampled. Returns the events to deliver."""
        # (one row sampled as given: a view of it would lose the greedy token the engine
        # noted for it, sampling.remember_greedy)
        each = [rows] if rows.dim() == 1 else list(rows)
        outs = []
        accepted = 0
        for i, row in enumerate(each):
            token, lp = self.sampler(row)
            self.token = token
            out = self._push(token, lp)
            if out is not None:
                outs.append(out)
            if self.done or i >= len(self.drafts) or token != self.drafts[i]:
                break
            accepted += 1
        if self.drafts:
            self.seq.trim(len(self.drafts) - accepted)  # rejected guesses leave the cache
            if self.stats is not None:
                self.stats.target_passes += 1
                self.stats.proposed += len(self.drafts)
                self.stats.accepted += accepted
                self.stats.history.append(accepted)
        elif self.stats is not None:
            self.stats.target_passes += 1
            self.stats.history.append(0)
        return outs

    def _push(self, token: int, lp: TokenLogprob | None) -> Output | None:
        if self.stats is not None:
            self.stats.emitted += 1
        chunk = self.stream.push(token, lp)
        if chunk is None:
            return None
        return Output(
            self.req.offset + self.index,
            chunk.text,
            chunk.token_ids,
            chunk.logprobs,
            chunk.finish_reason,
            chunk.prompt_tokens,
            chunk.completion_tokens,
        )


class PrefixCache:
    """Finished sequences kept for reuse, least recently used first out, within a token budget."""

    def __init__(self, engine: Engine, max_tokens: int) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.entries: collections.OrderedDict[int, SequenceState] = collections.OrderedDict()

    def take(
        self, prompt: Sequence[int], adapter: Adapter | None = None
    ) -> tuple[SequenceState, list[int]]:
        """A sequence for ``prompt`` (run with ``adapter``) and the tokens it still has to
        prefill; only sequences computed with the same adapter are reused."""
        chunk = self.engine.prefill_chunk
        best, best_n = None, 0
        for key, seq in self.entries.items():
            if seq.adapter is not adapter:
                continue
            # Only whole prefill pieces are reused (see SequenceState.exact).
            n = _common_prefix(seq.tokens, prompt, min(seq.exact, len(prompt) - 1))
            if n // chunk * chunk > best_n:
                best, best_n = key, n // chunk * chunk
        seq = self.entries.pop(best) if best is not None else self.engine.new_sequence()
        seq.adapter = adapter
        return seq, self.engine.begin(seq, prompt, exact=True)

    def put(self, seq: SequenceState) -> None:
        if self.max_tokens <= 0 or seq.exact == 0 or seq.cache.capacity > self.max_tokens:
            return
        self.entries[id(seq)] = seq
        while sum(s.cache.capacity for s in self.entries.values()) > self.max_tokens:
            self.entries.popitem(last=False)


def _expired(req: Request, now: float) -> bool:
    return req.deadline is not None and now > req.deadline


def _log_error(what: str, e: BaseException) -> None:
    """One log line for an error (its kind and message, escaped); the traceback only with
    ``QWENLM_DEBUG=1``."""
    log.error("%s: %s: %s", what, type(e).__name__, loggable(e), exc_info=debug_tracebacks())


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n, limit = 0, min(len(a), len(b), limit)
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Metrics:
    """Counters for /metrics (written by the scheduler, read by the server)."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    prefix_cached_tokens: int = 0
    generation_tokens: int = 0
    decode_steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    engine_errors: int = 0


class Scheduler:
    """Continuous batching over one engine; ``submit`` requests, then ``step`` (or ``start``).

    Without a ``tokenizer`` the outputs carry token ids only (no text).
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer | None,
        *,
        max_num_seqs: int = 16,
        max_queue: int = 64,
        prefix_cache_tokens: int = 16384,
        prefill_step: int = PREFILL_STEP,
    ) -> None:
        if prefill_step < 1:
            raise ValueError(f"prefill_step must be at least 1, got {prefill_step}")
        self.engine = engine
        self.prefill_step = prefill_step
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.prefix_cache = PrefixCache(engine, prefix_cache_tokens)
        self.metrics = Metrics()
        self.error: BaseException | None = None  # why the engine thread stopped, if it did
        self.progress_at = time.monotonic()  # the loop's last finished step (or wake-up)
        self._drain_deadline: float | None = None
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._prefilling: list[Request] = []
        self._running: list[Request] = []
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any]]] = collections.deque()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- submitting (any thread) --------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        """Queue ``req``; :class:`QueueFull` when too many wait, :class:`EngineFailed` when the
        engine loop is dead, :class:`ShuttingDown` while draining, :class:`GenerationError`
        for a request that cannot run."""
        if req.n > self.max_num_seqs:
            raise GenerationError(
                f"n={req.n}: this engine runs at most {self.max_num_seqs} sequences at once"
            )
        if req.speculation is not None:
            req.speculation.check(self.engine)
        req.limit = check_prompt(self.engine.config, req.prompt, req.config.max_new_tokens)
        with self._cv:  # under the lock the loop sets `error` with: no request slips past it
            if self.error is not None:
                raise EngineFailed("the engine stopped after an internal error")
            if self._drain_deadline is not None:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting; retry shortly")
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine's thread between two steps (any thread may ask): other work
        on the model, such as embeddings, takes its turn beside generation without racing it.
        Its result, or its exception, arrives in the returned future; keep each call short
        (one forward pass), since running streams wait for it."""
        if self.error is not None:
            raise EngineFailed("the engine stopped after an internal error")
        future: Future[T] = Future()
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify_all()
        return future

    @property
    def running(self) -> int:
        """Requests being prefilled or decoded."""
        return len(self._prefilling) + len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """False once the engine thread died; it serves nothing more."""
        return self.error is None

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._running or self._calls)

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` began: no new request is taken."""
        return self._drain_deadline is not None

    @property
    def stalled_for(self) -> float:
        """Seconds the loop thread has gone without finishing a step while it has work (0 when
        idle or not started): a step that never returns shows here, not in :attr:`alive`."""
        if self._thread is None or self.idle:
            return 0.0
        return time.monotonic() - self.progress_at

    # -- driving ------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> None:
        """Submit ``requests`` and step until every one of them has finished (same thread)."""
        for req in requests:
            self.submit(req)
        while not all(r.finished for r in requests):
            self.step()

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits (vocab,) after ``prompt``, prefilled through the prefix cache, as a request's
        first token would see them (the calling thread; not while the loop runs on its own)."""
        check_prompt(self.engine.config, prompt, 1)
        seq, pending = self.prefix_cache.take(prompt)
        self.metrics.prompt_tokens += len(prompt)
        self.metrics.prefix_cached_tokens += len(prompt) - len(pending)
        while pending:
            n, logits = self.engine.prefill_piece(seq, pending)
            pending = pending[n:]
        self.prefix_cache.put(seq)
        return logits

    def start(self) -> None:
        """Run the loop on a thread of its own (the server)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwenlm-engine", daemon=True)
            self._thread.start()

    def drain(self, timeout: float) -> None:
        """Begin a graceful shutdown: refuse new requests (:class:`ShuttingDown`); those
        already accepted get ``timeout`` seconds to finish, then end with an error event."""
        with self._cv:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + timeout
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and self.idle:
                        self._cv.wait()
                    if self._stop:
                        break
                    self.progress_at = time.monotonic()
                self.step()
                self.progress_at = time.monotonic()
                if self._drain_deadline is not None and self.progress_at > self._drain_deadline:
                    self._fail_all("the server is shutting down")
            self._fail_all("the server is shutting down")
        except BaseException as e:  # a bug in the loop itself: say so, and fail every request
            with self._cv:
                self.error = e
            _log_error("engine loop stopped", e)
            self._fail_all("the engine stopped after an internal error")

    def _fail_all(self, why: str) -> None:
        with self._cv:
            requests = [*self._waiting, *self._prefilling, *self._running]
            self._waiting.clear()
            self._prefilling, self._running = [], []
            calls = list(self._calls)
            self._calls.clear()
        for req in requests:
            self._fail(req, why, "error")
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineFailed(why))

    # -- one round ----------------------------------------------------------------------------
    def step(self) -> None:
        """Run queued calls, reap, admit, decode every running choice one step, prefill one
        piece."""
        self._run_calls()
        self._reap()
        self._admit()
        if not self._decode():
            self._prefill()

    def _run_calls(self) -> None:
        with self._cv:
            calls = list(self._calls)
            self._calls.clear()
        for fn, future in calls:
            if not future.set_running_or_notify_cancel():
                continue  # the asker gave up
            try:
                future.set_result(fn())
            except Exception as e:  # the caller's failure, not the engine's
                future.set_exception(e)

    def _admit(self) -> None:
        with self._cv:
            busy = sum(r.n for r in self._prefilling) + sum(r.unfinished for r in self._running)
            while self._waiting and busy + self._waiting[0].n <= self.max_num_seqs:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._done(req, "cancelled")
                    continue
                busy += req.n
                self._prefilling.append(req)
        for req in list(self._prefilling):
            if req.seq is None:
                try:
                    if req.sequence is not None:
                        req.seq = req.sequence
                        if req.seq.adapter is not req.adapter:  # its cache holds another's keys
                            req.seq.reset()
                            req.seq.adapter = req.adapter
                        req.pending = self.engine.begin(req.seq, req.prompt, exact=False)
                    elif req.prompt_logprobs is not None:  # every row's logits: nothing cached
                        req.seq = self.engine.new_sequence()
                        req.seq.adapter = req.adapter
                        req.pending = self.engine.begin(req.seq, req.prompt)
                    else:
                        req.seq, req.pending = self.prefix_cache.take(req.prompt, req.adapter)
                except Exception as e:  # e.g. a cache allocation: this request only
                    _log_error("admitting a request failed", e)
                    self.metrics.engine_errors += 1
                    self._fail(req, "the engine failed on this request", "error")
                    continue
                req.cached = len(req.prompt) - len(req.pending)
                self.metrics.prompt_tokens += len(req.prompt)
                self.metrics.prefix_cached_tokens += req.cached

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled or _expired(r, now)]
            for req in gone:
                self._waiting.remove(req)
        for req in [*gone, *self._prefilling, *self._running]:
            if req.cancelled:
                self._finish(req, "cancelled")
            elif _expired(req, now):
                # Out of time: each unfinished choice ends with what it has, as if cut by length.
                for ch in req.choices:
                    if not ch.done:
                        ch.stream.finish_reason = "length"
                        req._emit(
                            Output(
                                req.offset + ch.index,
                                ch.stream.pending,
                                [],
                                finish_reason="length",
                                prompt_tokens=len(req.prompt),
                                completion_tokens=ch.stream.completion_tokens,
                            )
                        )
                for i in range(len(req.choices), req.n):
                    req._emit(Output(req.offset + i, "", [], None, "length", len(req.prompt), 0))
                self._finish(req, "timeout")

    def _decode(self) -> bool:
        """Decode every running choice one step; returns whether the oldest prompt's next part
        rode along in the first forward pass (see :meth:`_rider`)."""
        context_end = self.engine.config.max_position_embeddings
        todo = [ch for req in self._running for ch in req.choices if not ch.done]
        # Rows with adapters (any mix of them) share forwards; base rows keep forwards of their
        # own, on the native path, so they compute as they would with no adapter loaded.
        todo.sort(key=lambda ch: ch.seq.adapter is not None)
        segments = [(ch, ch.segment(context_end)) for ch in todo]
        rider = self._rider() if segments and segments[0][0].seq.adapter is None else None
        rode = rider is not None
        while segments:
            group, rows = [], 0
            adapted = segments[0][0].seq.adapter is not None
            while (
                segments
                and rows + len(segments[0][1]) <= SMALL_SEGMENT
                and (segments[0][0].seq.adapter is not None) == adapted
            ):
                rows += len(segments[0][1])
                group.append(segments.pop(0))
            fed = [(ch.seq, tokens) for ch, tokens in group]
            every = [len(t) > 1 for _, t in group]
            if rider is not None:
                fed.append((rider[0].seq, rider[1]))
                every.append(rider[0].prompt_logprobs is not None)
            results = self._forward(fed, every)
            self.metrics.decode_steps += 1
            if rider is not None:
                self._prefilled(rider[0], rider[1], results.pop(), part=True)
                rider = None
            for (ch, _), logits in zip(group, results, strict=True):
                if ch.req.finished:
                    continue
                if isinstance(logits, BaseException):
                    self._fail(ch.req, "the engine failed on this request", "error")
                    continue
                self._took(ch, logits)
        return rode

    def _rider(self) -> tuple[Request, list[int]] | None:
        """The oldest prompt's next part, where it may join the decode step's forward pass:
        on the engine's row-exact prefill path every row is computed on its own, so the part's
        numbers are those of a pass alone, and the pass reads the weights once for both (a
        prefill pass of its own would read them again, which the running streams wait out)."""
        if not self._prefilling:
            return None
        req = self._prefilling[0]
        if req.seq is None or not self.engine.row_exact_prefill(req.seq):
            return None
        # (at most one native call's rows beside the decode rows: a larger pass would leave
        # the native forward, and the decode rows with it)
        most = min(self.prefill_step, self.engine.native.piece_rows() or 1)
        try:
            return req, self.engine.prefill_part(req.seq, req.pending, most)
        except Exception:  # _prefill runs it alone and reports what went wrong
            return None

    def _prefill(self) -> None:
        if not self._prefilling:
            return
        req = self._prefilling[0]
        try:
            most = self.prefill_step if self.engine.row_exact_prefill(req.seq) else None
            piece = self.engine.prefill_part(req.seq, req.pending, most)
            (logits,) = self.engine.forward(
                [(req.seq, piece)], all_logits=req.prompt_logprobs is not None
            )
        except Exception as e:
            _log_error("prefill failed", e)
            self.metrics.engine_errors += 1
            self._fail(req, "the engine failed on this request", "error")
            return
        self._prefilled(req, piece, logits, part=most is not None)

    def _prefilled(
        self, req: Request, piece: list[int], logits: torch.Tensor | BaseException, *, part: bool
    ) -> None:
        """``req``'s sequence took ``piece`` of its pending prompt (``logits``, or why not)."""
        if isinstance(logits, BaseException):  # (_forward logged and counted it)
            self._fail(req, "the engine failed on this request", "error")
            return
        n = len(piece)
        try:
            self.engine.prefill_fed(req.seq, n, part=part)
            if req.prompt_logprobs is not None:
                # Row j of the piece predicts the prompt token after it.
                at = len(req.prompt) - len(req.pending) + 1
                targets = req.prompt[at : at + n]
                req.scored += token_logprobs(logits[: len(targets)], targets, req.prompt_logprobs)
                logits = logits[-1]
        except Exception as e:
            _log_error("prefill failed", e)
            self.metrics.engine_errors += 1
            self._fail(req, "the engine failed on this request", "error")
            return
        req.pending = req.pending[n:]
        if not req.pending:
            self._start(req, logits)

    def _forward(
        self, segments: list[tuple[SequenceState, list[int]]], every: list[bool]
    ) -> list[torch.Tensor | BaseException]:
        """One forward pass; if it fails, each segment alone, so one bad request fails alone
        (a failed pass stores nothing: tokens are appended only after it succeeds)."""
        try:
            return list(self.engine.forward(segments, all_logits=every))
        except Exception as e:
            _log_error("forward pass failed", e)
            self.metrics.engine_errors += 1
            if len(segments) == 1:
                return [e]
        out: list[torch.Tensor | BaseException] = []
        for seg, full in zip(segments, every, strict=True):
            out.extend(self._forward([seg], [full]))
        return out

    def _start(self, req: Request, logits: torch.Tensor) -> None:
        """The prompt is in the cache: fork it for the other choices, sample first tokens."""
        if req.prompt_logprobs is not None or not req.generate:
            scored = req.scored if req.prompt_logprobs is not None else None
            finish = None if req.generate else "length"
            for i in range(req.n):
                req._emit(
                    Output(
                        req.offset + i,
                        "",
                        [],
                        finish_reason=finish,
                        prompt_tokens=len(req.prompt),
                        prompt_logprobs=scored,
                    )
                )
        if not req.generate:
            self._finish(req, "length")
            return
        self._prefilling.remove(req)
        seqs = [req.seq] + [self.engine.fork(req.seq) for _ in range(req.n - 1)]
        req.choices = [_Choice(req, i, s, self.engine, self.tokenizer) for i, s in enumerate(seqs)]
        req.first_token_at = time.monotonic()
        self.metrics.ttft_sum += req.first_token_at - req.arrived
        self.metrics.ttft_count += 1
        self._running.append(req)
        for ch in req.choices:
            self._took(ch, logits)

    def _took(self, ch: _Choice, logits: torch.Tensor) -> None:
        req = ch.req
        try:
            outs = ch.take(logits)
        except Exception as e:  # e.g. a logits processor that raised: this request only
            _log_error("sampling failed", e)
            self._fail(req, "sampling failed on this request", "error")
            return
        for out in outs:
            self.metrics.generation_tokens += len(out.token_ids)
            req._emit(out)
            if out.finish_reason is not None:
                req.unfinished -= 1
                if req.unfinished == 0:
                    self._finish(req, out.finish_reason)

    def _fail(self, req: Request, why: str, outcome: str) -> None:
        if req.finished:
            return
        done = {ch.index for ch in req.choices if ch.done}
        for i in range(req.n):
            if i not in done:
                req._emit(Output(req.offset + i, "", [], error=why))
        self._finish(req, outcome)

    def _finish(self, req: Request, outcome: str) -> None:
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req in self._running:
            self._running.remove(req)
        if req.sequence is None:
            seqs = [ch.seq for ch in req.choices] or ([req.seq] if req.seq is not None else [])
            try:
                for seq in seqs:
                    self.prefix_cache.put(seq)  # what it holds is still valid
            except Exception as e:  # only a lost chance of reuse
                _log_error("keeping a finished sequence for reuse failed", e)
                self.metrics.engine_errors += 1
        req.choices = []
        self._done(req, outcome)

    def _done(self, req: Request, outcome: str) -> None:
        req.finished = True
        self.metrics.requests[outcome] += 1
