"""Engine events into reply deltas, for every route that generates (OpenAI's and Ollama's).

Streaming and non-streaming replies come from one generator, :func:`deltas`; each choice's text
goes through a :class:`ChoiceParser`: reasoning split off first (for reasoning models), then
content and tool calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from qwenlm.chat.tools import ToolCall
from qwenlm.generation.sampling import TokenLogprob
from qwenlm.generation.scheduler import Output
from qwenlm.serve.functions import ReplyParser
from qwenlm.serve.http import Job, next_event
from qwenlm.serve.protocol import APIError
from qwenlm.serve.reasoning import ThinkSplitter


class ChoiceParser:
    """One choice's text into (reasoning, content) deltas and, at the end, tool calls."""

    def __init__(self, parser: ReplyParser, splitter: ThinkSplitter | None = None) -> None:
        self.parser = parser
        self.splitter = splitter

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = self.splitter.feed(text) if self.splitter else ("", text)
        return reasoning, self.parser.feed(content)

    def finish(self, reason: str) -> tuple[str, str, list[ToolCall], str]:
        """(reasoning, content, tool calls, finish reason) still to send once the choice ended."""
        reasoning, content = self.splitter.finish() if self.splitter else ("", "")
        content = self.parser.feed(content)
        rest, calls, reason = self.parser.finish(reason)
        return reasoning, content + rest, calls, reason


async def deltas(
    jobs: list[Job], events: asyncio.Queue[Output], parsers: list[ChoiceParser]
) -> AsyncIterator[tuple[int, str, str, list[TokenLogprob] | None, list[ToolCall], Output]]:
    """(choice, reasoning, content, logprobs, tool calls, event) for every event of ``jobs``."""
    left = sum(j.n for j in jobs)
    while left:
        out = await next_event(events, jobs)
        if out.error is not None:
            raise APIError(500, out.error, type="server_error", code="engine_error")
        parser = parsers[out.index]
        reasoning, content = parser.feed(out.text)
        calls: list[ToolCall] = []
        if out.finish_reason is not None:
            left -= 1
            more, rest, calls, out.finish_reason = parser.finish(out.finish_reason)
            reasoning, content = reasoning + more, content + rest
        yield out.index, reasoning, content, out.logprobs, calls, out


def token_text(tokenizer: Any, token: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 replaced) and its bytes."""
    b = tokenizer.id_to_bytes(token)
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Log-probabilities as OpenAI's chat (and Ollama) write them: token, logprob, bytes, top."""
    out = []
    for lp in lps:
        text, raw = token_text(tokenizer, lp.token)
        top = []
        for t, v in lp.top:
            tt, tb = token_text(tokenizer, t)
            top.append({"token": tt, "logprob": v, "bytes": tb})
        out.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return out
