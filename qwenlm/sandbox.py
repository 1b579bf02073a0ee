"""A sandbox for model-written code: a separate, limited, network-less Python process.

Layers, outermost first (each one holds even if the ones inside it are broken):

1. **Namespaces** (Linux, when ``unshare`` works for this user): a new user, network, mount
   and PID namespace. The network namespace has no interface but a loopback that is down, so
   every connection fails; the mount namespace re-mounts every file system read-only except
   the sandbox's own working folder; the PID namespace means that when the sandbox's first
   process dies the kernel kills everything it started.
2. **Resource limits** (``setrlimit`` in the child, before user code runs): CPU seconds,
   address space, processes (counted inside the sandbox's user namespace, so a fork bomb is
   bounded without touching other processes of the same user), file size, open files, no
   core dumps. Without namespaces, a root parent drops the child to ``nobody``.
3. **Wall clock**, enforced by the parent: the whole process group is killed at the deadline.
4. **An in-process guard** (``sys.addaudithook``) that refuses sockets and writes outside the
   working folder. Code can get past it with ``ctypes``; it is the last line, not the only one.

The working folder is a fresh temporary folder, removed afterwards. Reading files outside it
is not prevented (the interpreter and its libraries must be readable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from qwenlm.errors import QwenlmError

Isolation = Literal["auto", "namespaces", "limits"]

NOBODY = 65534


class SandboxError(QwenlmError):
    """The sandbox could not be set up (not: the code inside it failed)."""


@dataclass(frozen=True)
class Limits:
    """What a sandboxed program may use. Sizes in bytes, times in seconds."""

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 2 << 30  # address space per process
    processes: int = 32  # processes and threads of the sandbox (numpy starts a few)
    file_bytes: int = 64 << 20  # largest file it may write
    open_files: int = 256
    output_bytes: int = 1 << 20  # stdout/stderr kept, each; more stops the program

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise SandboxError(
                    f"sandbox limit {f.name} must be a positive number, got {value!r}"
                )


@dataclass
class SandboxResult:
    """How a sandboxed program ended.

    ``status``: ``"ok"`` (exit 0), ``"error"`` (non-zero exit or an exception), ``"timeout"``
    (wall clock), ``"cpu_limit"``, ``"killed"`` (another signal, e.g. the output cap), ``"output_limit"``.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)  # files it left, when asked for

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Runs first inside the sandbox (python -I -c BOOT CONFIG). Only the standard library: the
# user's code is not importable yet and nothing from qwenlm is trusted to be there.
BOOT = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
work = cfg["work"]

def mount_readonly():
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, dst, flags):
        if libc.mount(src.encode(), dst.encode(), None, flags, None) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
    ATIME = {"noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
    mount("none", "/", REC | PRIVATE)
    mount(work, work, BIND | REC)  # its own mount, so the read-only pass below skips it
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    for row in rows:
        target = row[4].replace("\\040", " ")
        if target == work:
            continue
        flags = REMOUNT | BIND | RDONLY
        for opt in row[5].split(","):  # flags locked by the outer namespace must be kept
            flags |= {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC}.get(opt, 0) | ATIME.get(opt, 0)
        try:
            mount("none", target, flags)
        except OSError:
            pass  # e.g. a mount hidden under another; the ones that matter are checked below
    probe = os.path.join(os.path.dirname(work), ".qwenlm-sandbox-probe")
    try:
        open(probe, "w").close()
    except OSError:
        return
    os.unlink(probe)
    raise SystemExit("sandbox: could not make the file system read-only")

def set_limits():
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu_seconds"]), ("RLIMIT_AS", lim["memory_bytes"]),
                        ("RLIMIT_NPROC", lim["processes"]), ("RLIMIT_FSIZE", lim["file_bytes"]),
                        ("RLIMIT_NOFILE", lim["open_files"]), ("RLIMIT_CORE", 0)):
        # CPU: SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
        hard = int(value) + 1 if name == "RLIMIT_CPU" else int(value)
        resource.setrlimit(getattr(resource, name), (int(value), hard))

def guard():
    work_prefix = os.path.realpath(work) + os.sep
    writable = ("/dev/null", "/dev/zero", "/dev/urandom")
    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor; opening it was checked
        real = os.path.realpath(os.fsdecode(path))
        return real.startswith(work_prefix) or real in writable or real + os.sep == work_prefix
    denied_net = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                  "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
    def hook(event, args):
        if event in denied_net or (event == "socket.__new__" and args[1] != 1):  # 1: AF_UNIX
            raise PermissionError("sandbox: no network")
        if event == "open" and len(args) > 2:
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                if not inside(path):
                    raise PermissionError("sandbox: writing outside the working folder")
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
                       "os.truncate", "os.symlink", "os.link", "shutil.rmtree", "os.utime"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError("sandbox: changing files outside the working folder")
    sys.addaudithook(hook)

if cfg["namespaces"]:
    mount_readonly()
os.chdir(work)
# As the first process of a PID namespace this one ignores default-action signals (SIGXCPU),
# so the program runs in a child, and this one reports how the child ended.
pid = os.fork() if cfg["namespaces"] else 0
if pid:
    signal.signal(signal.SIGTERM, lambda *a: os._exit(128 + signal.SIGTERM))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(1)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
if cfg["drop_to"] is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
set_limits()
if cfg["guard"]:
    guard()
sys.argv = ["main.py"]
sys.path.insert(0, work)
import runpy
runpy.run_path(os.path.join(work, "main.py"), run_name="__main__")
"""


def _namespaces_work() -> bool:
    """Whether ``unshare`` can make the namespaces here (tried once per call; ~5 ms)."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        r = subprocess.run(
            [exe, "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _others_can_run(python: str) -> bool:
    """Whether a user with no special rights can run ``python`` and read its standard library."""
    import stat
    import sysconfig

    for target in (os.path.realpath(python), sysconfig.get_paths()["stdlib"]):
        path = Path(target)
        for folder in path.parents:
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
        if not path.stat().st_mode & stat.S_IROTH:
            return False
    return True


def _clean_env(work: str) -> dict[str, str]:
    # Nothing from the parent's environment leaks in (tokens, proxies); libraries that want a
    # writable home or cache get the working folder.
    return {
        "PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin",
        "HOME": work,
        "TMPDIR": work,
        "MPLCONFIGDIR": os.path.join(work, ".matplotlib"),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }


class _Capture:
    """Drains a pipe on a thread, keeping at most ``cap`` bytes; calls ``on_overflow`` past it."""

    def __init__(self, stream: IO[bytes], cap: int, on_overflow) -> None:
        self.data = bytearray()
        self.overflowed = False
        self._thread = threading.Thread(
            target=self._run, args=(stream, cap, on_overflow), daemon=True
        )
        self._thread.start()

    def _run(self, stream: IO[bytes], cap: int, on_overflow) -> None:
        while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
            room = cap - len(self.data)
            self.data += chunk[: max(room, 0)]
            if len(chunk) > room and not self.overflowed:
                self.overflowed = True
                on_overflow()

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return bytes(self.data).decode("utf-8", errors="replace")


class Sandbox:
    """Runs Python programs under :class:`Limits` in a fresh, isolated interpreter.

    ``isolation``: ``"auto"`` uses namespaces where ``unshare`` works and limits alone
    otherwise; ``"namespaces"`` fails when they are not available; ``"limits"`` skips them.
    ``guard=False`` turns the in-process guard off (to test the outer layers on their own).
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        isolation: Isolation = "auto",
        guard: bool = True,
        python: str | None = None,
    ) -> None:
        if isolation not in ("auto", "namespaces", "limits"):
            raise SandboxError(
                f"unknown isolation {isolation!r}", hint="use auto, namespaces or limits"
            )
        if not hasattr(os, "fork") or sys.platform == "win32":
            raise SandboxError("the sandbox needs a POSIX system (Linux or macOS)")
        self.limits = limits or Limits()
        self.guard = guard
        self.python = python or sys.executable
        have = isolation != "limits" and _namespaces_work()
        if isolation == "namespaces" and not have:
            raise SandboxError(
                "Linux user namespaces are not available here (`unshare --user --net` failed)",
                hint="enable unprivileged user namespaces, or use isolation='limits'",
            )
        self.namespaces = have
        if not have and os.geteuid() == 0 and not _others_can_run(self.python):
            # Root ignores RLIMIT_NPROC, so the child must drop to nobody, who must be able to
            # read the interpreter; refusing beats running code with no bound on processes.
            raise SandboxError(
                "running as root without user namespaces, and user 'nobody' cannot read "
                f"the Python interpreter ({os.path.realpath(self.python)})",
                hint="enable unprivileged user namespaces, or install Python where all users can read it",
            )

    def _command(self, work: str, limits: Limits) -> tuple[list[str], int | None]:
        drop_to = None
        if not self.namespaces and os.geteuid() == 0:
            drop_to = NOBODY  # root ignores RLIMIT_NPROC and file permissions
            os.chown(work, NOBODY, NOBODY)
        cfg = {
            "work": work,
            "limits": dataclasses.asdict(limits),
            "namespaces": self.namespaces,
            "guard": self.guard,
            "drop_to": drop_to,
        }
        cmd = [self.python, "-I", "-c", BOOT, json.dumps(cfg)]
        if self.namespaces:
            cmd = [
                "unshare",
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                *cmd,
            ]
        return cmd, drop_to

    @contextlib.contextmanager
    def workdir(self):
        work = tempfile.mkdtemp(prefix="qwenlm-sandbox-")
        try:
            yield os.path.realpath(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def start(
        self,
        code: str,
        work: str,
        *,
        files: Mapping[str, bytes | str] | None = None,
        limits: Limits | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``code`` as ``main.py`` in the folder ``work`` with pipes on stdin/stdout/stderr.

        For long-lived programs (the code interpreter's kernel); :meth:`run` is the one-shot form.
        """
        limits = limits or self.limits
        root = Path(work)
        for name, data in (files or {}).items():
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                raise SandboxError(f"sandbox file name {name!r} leaves the working folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        (root / "main.py").write_text(code, encoding="utf-8")
        cmd, drop_to = self._command(work, limits)
        if drop_to is not None:
            for path in root.rglob("*"):
                os.chown(path, drop_to, drop_to)
        try:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=work,
                env=_clean_env(work),
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as e:
            raise SandboxError(f"could not start the sandbox: {e}") from None

    def run(
        self,
        code: str,
        *,
        stdin: str | bytes = b"",
        files: Mapping[str, bytes | str] | None = None,
        keep_files: bool = False,
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run ``code`` to the end (or to a limit) in a fresh working folder, then remove it."""
        limits = limits or self.limits
        with self.workdir() as work:
            t0 = time.monotonic()
            proc = self.start(code, work, files=files, limits=limits)
            overflow = threading.Event()

            def on_overflow() -> None:
                overflow.set()
                kill_group(proc)

            out = _Capture(proc.stdout, limits.output_bytes, on_overflow)
            err = _Capture(proc.stderr, limits.output_bytes, on_overflow)
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.stdin.write(stdin.encode() if isinstance(stdin, str) else stdin)
                proc.stdin.close()
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
                proc.wait()
            seconds = time.monotonic() - t0
            rc = proc.returncode
            stdout, stderr = out.text(), err.text()
            status = _status(rc, timed_out=timed_out, overflow=overflow.is_set())
            left: dict[str, bytes] = {}
            if keep_files:
                for path in Path(work).rglob("*"):
                    if path.is_file() and not path.is_symlink() and path.name != "main.py":
                        left[str(path.relative_to(work))] = path.read_bytes()
        return SandboxResult(status, rc, stdout, stderr, seconds, left)


def _status(rc: int | None, *, timed_out: bool, overflow: bool) -> str:
    if timed_out:
        return "timeout"
    if overflow:
        return "output_limit"
    if rc == 0:
        return "ok"
    # A signal shows as -N from Popen, or 128+N from the namespace's first process.
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc and rc > 128 else None)
    if sig in (signal.SIGXCPU, signal.SIGKILL) and rc is not None:
        return "cpu_limit" if sig == signal.SIGXCPU else "killed"
    return "error"


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox's whole process group (and with namespaces, everything in it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def run_python(code: str, *, limits: Limits | None = None, **kwargs) -> SandboxResult:
    """One-shot convenience: ``Sandbox(limits).run(code, ...)``."""
    return Sandbox(limits).run(code, **kwargs)
