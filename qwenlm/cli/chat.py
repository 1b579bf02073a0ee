"""``qwenlm chat``: an interactive, streaming chat in the terminal."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from qwenlm.cli.common import (
    add_model_args,
    add_parallel_args,
    add_sampling_args,
    load_model,
    sampling_options,
)

if TYPE_CHECKING:
    from qwenlm.api import Qwen

HELP = '''commands:
  /reset          start a new conversation (the system prompt stays)
  /system TEXT    set the system prompt for the following turns
  /system         show the system prompt
  /exit, /quit    leave (Ctrl-D works too)
  /help           this text
multi-line input: end a line with \\ to continue it, or wrap the message in """ ... """.
Ctrl-C stops the current reply; at the prompt it clears the line.'''


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwenlm chat", description="Chat with a Qwen model in the terminal."
    )
    add_model_args(p, positional=True)
    add_parallel_args(p)
    p.add_argument("--system", help="system prompt (default: the model template's own)")
    p.add_argument(
        "--verbose", "-v", action="store_true", help="print token counts and speed after each reply"
    )
    add_sampling_args(p)
    p.add_argument(
        "--tools",
        metavar="LIST",
        help="let the model call tools: 'code' (a sandboxed Python interpreter), 'calculator', or "
        "both comma-separated",
    )
    return p


class ChatSession:
    """A conversation with one model: its messages, system prompt and reusable KV cache."""

    def __init__(
        self, model: Qwen, *, system: str | None = None, options: dict[str, Any] | None = None
    ) -> None:
        self.model = model
        self.system = system
        self.options = options or {}
        self.messages: list[dict[str, str]] = []
        self.sequence = model.new_sequence()

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str, write: Callable[[str], None]) -> dict[str, Any]:
        """Stream the reply to ``text`` through ``write``; returns counts and the finish reason.

        A KeyboardInterrupt stops the reply; what was shown stays in the conversation.
        """
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        messages += [*self.messages, {"role": "user", "content": text}]
        parts: list[str] = []
        stats: dict[str, Any] = {"finish_reason": None, "completion_tokens": 0, "prompt_tokens": 0}
        t0 = time.perf_counter()
        stream = None
        try:
            with _interrupt_flag() as interrupted:
                stream = self.model.chat_chunks(messages, sequence=self.sequence, **self.options)
                for chunk in stream:
                    if chunk.text:
                        parts.append(chunk.text)
                        write(chunk.text)
                    stats.update(
                        completion_tokens=chunk.completion_tokens,
                        prompt_tokens=chunk.prompt_tokens,
                    )
                    if chunk.finish_reason:
                        stats["finish_reason"] = chunk.finish_reason
                    if interrupted:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            stats["finish_reason"] = "interrupted"
        finally:
            if stream is not None:
                stream.close()
        stats["seconds"] = time.perf_counter() - t0
        self.messages += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "".join(parts)},
        ]
        return stats


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[list[bool]]:
    """While the block runs, Ctrl-C also leaves a mark (the yielded list becomes truthy)
    besides raising KeyboardInterrupt, so an interrupt that lands where the exception is
    swallowed (a finalizer, code that catches everything) still stops the reply at the
    next chunk. Only on the main thread, and only over Python's own Ctrl-C handler."""
    mark: list[bool] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield mark
        return

    def on_interrupt(signum: int, frame: object) -> None:
        mark.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield mark
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def read_message(read: Callable[[str], str]) -> str:
    """One message from the user: a line, backslash-continued lines, or a \"\"\" block."""
    line = read(">>> ")
    if line.lstrip().startswith('"""'):
        rest = line.lstrip()[3:]
        if rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3]
        lines = [rest] if rest else []
        while True:
            line = read("... ")
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def run(
    session: ChatSession,
    *,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    verbose: bool = False,
) -> None:
    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write("Type a message, /help for commands, /exit or Ctrl-D to leave.\n")
    while True:
        try:
            text = read_message(read)
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(use /exit or Ctrl-D to leave)\n")
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/help":
            write(HELP + "\n")
            continue
        if command == "/reset":
            session.reset()
            write("(new conversation)\n")
            continue
        if command == "/system" or command.startswith("/system "):
            value = command[len("/system") :].strip()
            if value:
                session.system = value
                write("(system prompt set)\n")
            else:
                shown = session.system if session.system is not None else "(the template default)"
                write(f"system prompt: {shown}\n")
            continue
        if command.startswith("/") and " " not in command:
            write(f"unknown command {command}; /help lists them\n")
            continue
        stats = session.reply(text, write)
        if stats["finish_reason"] == "interrupted":
            write("\n[stopped]\n")
        elif stats["finish_reason"] == "length":
            write("\n[reply cut at the token limit]\n")
        else:
            write("\n")
        if verbose:
            n, s = stats["completion_tokens"], stats["seconds"]
            print(
                f"[{stats['prompt_tokens']} prompt tokens, {n} generated, {n / s:.1f} tokens/s]",
                file=sys.stderr,
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = sampling_options(args)
    if args.tools:
        from qwenlm.agent.function_calling import parse_tool_names

        parse_tool_names(args.tools)  # a typo is reported before the model loads
    model = load_model(args)
    model.generation_config(**options)  # report bad flags now, not after the first message
    # Line editing and history for input(), where the platform has readline.
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401
    if args.tools:
        from qwenlm.agent.function_calling import tool_chat_session

        with tool_chat_session(model, args.tools, system=args.system, options=options) as session:
            run(session, verbose=args.verbose)
        return 0
    run(ChatSession(model, system=args.system, options=options), verbose=args.verbose)
    return 0
