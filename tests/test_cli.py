"""The command line as a user runs it: real processes, a real pseudo-terminal, the real model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pexpect
import pytest

from qwenlm.cli.chat import ChatSession, read_message

QWENLM = [sys.executable, "-m", "qwenlm"]


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QWENLM, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("chat", "generate", "pull", "list"):
        assert cmd in r.stdout


def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_model_not_pulled_is_one_line_and_a_hint(tmp_path):
    r = run("generate", "hi", "--cache-dir", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: model 'qwen2.5-coder-0.5b-instruct' is not pulled",
        "hint: run: qwenlm pull qwen2.5-coder-0.5b-instruct",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "-m", "/nonexistent/model.gguf"], "error: no such file or directory"),
        (["generate", "hi", "-m", "qwen9-huge"], "error: unknown model"),
        (["chat", "qwen2.5-coder-0.5b-instructt"], "qwen2.5-coder-0.5b-instruct"),
    ],
)
def test_bad_model_arguments(args, message, tmp_path):
    r = run(*args, "--cache-dir", str(tmp_path))
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_model_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    r = run("generate", "hi", "-m", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error: malformed GGUF file")
    assert "Traceback" not in r.stderr


def test_list_shows_registry(tmp_path):
    r = run("list", "--cache-dir", str(tmp_path))
    assert r.returncode == 0
    assert "qwen2.5-coder-0.5b-instruct" in r.stdout and "qwen2.5-coder-1.5b-instruct" in r.stdout


def test_read_message_multiline_forms():
    def reader(lines):
        it = iter(lines)
        return lambda prompt: next(it)

    assert read_message(reader(["hello"])) == "hello"
    assert read_message(reader(["one\\", "two\\", "three"])) == "one\ntwo\nthree"
    assert read_message(reader(['"""first', "second", 'third"""'])) == "first\nsecond\nthird"
    assert read_message(reader(['"""inline"""'])) == "inline"


def test_ctrl_c_stops_a_reply_even_where_the_interrupt_is_swallowed():
    # A KeyboardInterrupt can land in code that swallows it (a finalizer, a catch-all); the
    # terminal chat once ran on to the token limit after a Ctrl-C. The mark it leaves stops
    # the reply at the next chunk all the same.
    class Model:
        def new_sequence(self) -> None:
            return None

        def chat_chunks(self, messages, **_):
            for i in range(10):
                if i == 3:
                    with contextlib.suppress(BaseException):  # swallowed, as described
                        signal.raise_signal(signal.SIGINT)
                yield SimpleNamespace(
                    text=f"{i} ", completion_tokens=i + 1, prompt_tokens=5, finish_reason=None
                )

    shown: list[str] = []
    session = ChatSession(Model())
    stats = session.reply("count", shown.append)
    assert stats["finish_reason"] == "interrupted"
    assert "".join(shown) == "0 1 2 3 "  # the chunk being made when Ctrl-C came, no more
    assert session.messages[-1] == {"role": "assistant", "content": "0 1 2 3 "}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.real_model
def test_generate_answers_the_prime_question(real_model_path):
    r = run(
        "generate",
        "写一个Python函数判断素数",
        "--greedy",
        "--max-new-tokens",
        "200",
        "-m",
        str(real_model_path),
    )
    assert r.returncode == 0, r.stderr
    assert "def " in r.stdout and "%" in r.stdout and "return" in r.stdout


@pytest.mark.real_model
def test_generate_bad_sampling_flag(real_model_path):
    r = run("generate", "hi", "--temperature", "-1", "-m", str(real_model_path))
    assert r.returncode == 1 and "error: temperature must be" in r.stderr


@pytest.mark.real_model
def test_chat_in_a_real_terminal(real_model_path):
    env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "qwenlm", "chat", str(real_model_path), "--greedy", "--max-new-tokens", "300"],
        env=env,
        encoding="utf-8",
        timeout=600,  # a loaded machine can take minutes to load and quantize the model
        dimensions=(40, 200),
    )
    try:
        child.expect_exact(">>> ")
        child.sendline("What is 2+3? Reply with the number only.")
        child.expect(r"5")
        child.expect_exact(">>> ")
        # multi-turn: the model sees the history
        child.sendline("My favourite colour is teal. Reply with OK only.")
        child.expect_exact(">>> ")
        child.sendline("What is my favourite colour? One word.")
        child.expect("(?i)teal")
        child.expect_exact(">>> ")
        # Ctrl-C stops a long reply but not the program
        # (a reply that cannot end soon: the model once answered an essay request with a short
        # refusal that finished before the Ctrl-C arrived)
        child.sendline("Count from 1 to 500, one number per line, no other text.")
        child.expect_exact("text.\r\n")  # the terminal's echo of the line
        child.expect(r"\w{3}")  # the reply has started streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>> ")
        child.sendline("/system You always answer in French.")
        child.expect_exact("(system prompt set)")
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.sendline('"""Say the word')
        child.expect_exact("... ")
        child.sendline('hello, and nothing else."""')
        child.expect(r"(?i)bonjour|salut")
        child.expect_exact(">>> ")
        child.sendline("/nope")
        child.expect_exact("unknown command /nope")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
