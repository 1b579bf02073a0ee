"""A code interpreter for agents: model-written Python run in the sandbox, with state kept
across calls like a notebook kernel.

The kernel is one long-lived sandboxed process (:mod:`qwenlm.sandbox`: no network, nothing of
the host visible but the Python runtime, a size-capped working folder, CPU/memory/process
limits). Each cell returns its stdout, stderr, the value of its last expression, the error if
it raised, and the matplotlib figures it left open, as PNG. A cell past its time limit kills
the kernel; the next call starts a fresh one and says that the earlier state is gone.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
from dataclasses import dataclass, field

from qwenlm.agent.tools import Tool, ToolResult
from qwenlm.sandbox import Limits, Sandbox, SandboxError, kill_group

# The kernel, run as main.py in the sandbox. Requests are JSON lines on stdin; each answer is
# one JSON line on a private copy of stdout, so what user code writes to fd 1 cannot forge one.
# Figures travel inside the answer (base64 PNG): the parent never reads the sandbox's files.
KERNEL = r"""
import ast, base64, contextlib, io, json, os, sys, traceback
proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
os.dup2(2, 1)  # raw writes to fd 1 (subprocesses, C code) land in stderr, away from the protocol
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
count = 0

def save_figures():
    global count
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return {}
    saved = {}
    for num in plt.get_fignums():
        count += 1
        png = io.BytesIO()
        plt.figure(num).savefig(png, format="png")
        saved[f"figure-{count}.png"] = base64.b64encode(png.getvalue()).decode()
    plt.close("all")
    return saved

def run(code, cap):
    out, err = io.StringIO(), io.StringIO()
    value = error = None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(tree, "<cell>", "exec"), namespace)
            if last is not None:
                result = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
                if result is not None:
                    value = repr(result)
    except BaseException as e:
        if isinstance(e, SystemExit):
            error = "SystemExit: the cell called exit(); the kernel keeps running"
        else:
            lines = traceback.format_exception(type(e), e, e.__traceback__)
            # drop the kernel's own frames: the model needs the cell's part only
            keep = [l for l in lines if 'File "<cell>"' in l or not l.startswith("  File ")]
            error = "".join(keep)
    try:
        images = save_figures()
    except Exception as e:
        images, error = {}, (error or "") + f"\n(saving figures failed: {e})"
    cut = lambda s: s if len(s) <= cap else s[:cap] + f"\n... ({len(s) - cap} more characters cut)"
    return {"stdout": cut(out.getvalue()), "stderr": cut(err.getvalue()),
            "value": cut(value) if value is not None else None, "error": error, "images": images}

for line in sys.stdin:
    request = json.loads(line)
    proto.write(json.dumps(run(request["code"], request["cap"])) + "\n")
    proto.flush()
"""

INTERPRETER_LIMITS = Limits(
    cpu_seconds=120,
    wall_seconds=30.0,
    memory_bytes=4 << 30,
    processes=64,
    file_bytes=256 << 20,
    disk_bytes=512 << 20,
)
ANSWER_BYTES = 64 << 20  # one cell's answer (text and figures); a longer line resets the kernel


@dataclass
class CellResult:
    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: str | None = None
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    restarted: bool = False  # the kernel was (re)started before this cell: earlier state is gone

    def to_text(self, *, limit: int = 4000) -> str:
        """The observation the model reads."""
        parts = []
        if self.restarted:
            parts.append("(note: the interpreter was restarted; earlier variables are gone)")
        if self.stdout:
            parts.append("stdout:\n" + self.stdout.rstrip())
        if self.stderr:
            parts.append("stderr:\n" + self.stderr.rstrip())
        if self.value is not None:
            parts.append("result: " + self.value)
        if self.error:
            parts.append("error:\n" + self.error.rstrip())
        parts += [f"[image saved: {name}]" for name in self.images]
        text = "\n".join(parts) or "(no output)"
        return text if len(text) <= limit else text[:limit] + "\n... (output cut)"


class CodeInterpreter:
    """A notebook-like Python session in the sandbox. Use as a context manager, or ``close()``."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        sandbox: Sandbox | None = None,
        output_cap: int = 20_000,
    ) -> None:
        self.limits = limits or INTERPRETER_LIMITS
        self.sandbox = sandbox or Sandbox(self.limits)
        self.output_cap = output_cap
        self._proc = None
        self._stderr: list[bytes] = []
        self._lock = threading.Lock()
        self._starts = 0

    def _start(self) -> None:
        self._proc = self.sandbox.start(KERNEL, limits=self.limits)
        self._stderr = []

        def drain(stream, sink: list[bytes]) -> None:
            kept = 0
            while chunk := stream.read1(65536):
                if kept < self.limits.output_bytes:  # kept only for debugging; never unbounded
                    sink.append(chunk)
                    kept += len(chunk)

        threading.Thread(target=drain, args=(self._proc.stderr, self._stderr), daemon=True).start()

    def _stop(self) -> None:
        if self._proc is not None:
            kill_group(self._proc)
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
            for s in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                with contextlib.suppress(Exception):
                    s.close()
            self._proc = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, code: str, *, timeout: float | None = None) -> CellResult:
        """Run one cell. ``timeout`` (seconds of wall time) defaults to the limits' wall clock."""
        if not isinstance(code, str):
            raise SandboxError("code must be a string")
        with self._lock:
            new_kernel = self._proc is None or self._proc.poll() is not None
            if new_kernel:
                self._stop()
                self._start()
                self._starts += 1
            # The first start of a session is no news to the model; a later one loses state.
            restarted = new_kernel and self._starts > 1
            timeout = timeout or self.limits.wall_seconds
            answer: list[bytes] = []

            def read() -> None:
                with contextlib.suppress(Exception):
                    answer.append(self._proc.stdout.readline(ANSWER_BYTES))

            try:
                self._proc.stdin.write(
                    (json.dumps({"code": code, "cap": self.output_cap}) + "\n").encode()
                )
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._stop()
                return CellResult(
                    error="the interpreter died before the cell could run", restarted=restarted
                )
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive() or not answer or not answer[0]:
                timed_out = reader.is_alive()
                self._stop()
                why = (
                    f"the cell ran past {timeout:.0f} s and was stopped"
                    if timed_out
                    else "the interpreter died (a resource limit: CPU time, memory or processes)"
                )
                return CellResult(
                    error=f"{why}; the interpreter was reset and its variables are gone",
                    restarted=restarted,
                )
            if not answer[0].endswith(b"\n"):
                self._stop()
                return CellResult(
                    error=f"the cell's answer passed {ANSWER_BYTES >> 20} MB; the interpreter was "
                    "reset and its variables are gone",
                    restarted=restarted,
                )
            try:
                data = json.loads(answer[0])
                images = {
                    str(name): base64.b64decode(png, validate=True)
                    for name, png in dict(data.get("images") or {}).items()
                }
            except (binascii.Error, TypeError, ValueError):  # JSONDecodeError is a ValueError
                self._stop()
                return CellResult(
                    error="the interpreter sent an unreadable answer and was reset",
                    restarted=restarted,
                )
            return CellResult(
                stdout=str(data.get("stdout") or ""),
                stderr=str(data.get("stderr") or ""),
                value=data.get("value"),
                error=data.get("error"),
                images=images,
                restarted=restarted,
            )

    def as_tool(self) -> Tool:
        """The interpreter as an agent tool named ``code_interpreter``."""

        def code_interpreter(code: str) -> ToolResult:
            cell = self.run(code)
            return ToolResult(cell.to_text(), error=cell.error is not None, files=dict(cell.images))

        return Tool(
            "code_interpreter",
            "Run Python code in a sandboxed notebook-like session (state is kept between calls; "
            "no network). Returns stdout, stderr, the value of the last expression, errors, and "
            "matplotlib figures saved as PNG. Use print() to show results.",
            {
                "type": "object",
                "properties": {"code": {"type": "string", "description": "the Python code to run"}},
                "required": ["code"],
            },
            code_interpreter,
            name_for_human="Code Interpreter",
        )
