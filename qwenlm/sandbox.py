"""A sandbox for model-written code: a separate, limited, network-less Python process that sees
nothing of the machine but the Python runtime and its own working folder.

Layers, outermost first (each one holds even if the ones inside it are broken):

1. **Namespaces** (Linux user namespaces; required: without them the sandbox refuses to run,
   it never falls back to running code unconfined). New user, mount, PID, network, IPC and
   UTS namespaces:

   - *Files*: a root built from nothing. A small read-only tmpfs holds, at their usual paths,
     read-only bind mounts of the Python runtime (its prefixes and import path) and the system
     libraries it loads, five harmless devices (``/dev/null``, ``zero``, ``full``, ``random``,
     ``urandom``), a fresh ``/proc``, and the working folder ``/sandbox``: a tmpfs of
     ``disk_bytes`` (``/tmp`` points into it). Nothing else of the host exists inside; the
     folders on the way to the runtime (``/root`` for a runtime under it) can be crossed but
     not listed.
   - *Identity*: the program runs as uid 65534 holding no capability in any set, with
     ``no_new_privs``, and may not create user namespaces, so it cannot mount, unshare or
     gain rights. A root parent maps that uid to the host's ``nobody``; another user maps it
     to itself (the one id the kernel lets it map).
   - *Processes*: ``/proc`` shows only the sandbox; when its first process dies the kernel
     kills everything in it. ``RLIMIT_NPROC`` counts per user and namespace and never binds
     host root, which the program is not, so a fork bomb stops at the limit.
   - *Network*: a namespace whose only interface is a loopback that is down.
2. **Resource limits** (``setrlimit`` in the program's process): CPU seconds, address space,
   processes, file size, open files, no core dumps.
3. **Wall clock**, enforced by the parent: the whole process group is killed at the deadline.
4. **An in-process guard** (``sys.addaudithook``) that refuses sockets and writes outside the
   working folder with a clear message. Code can get past it with ``ctypes``; it is the last
   line, not the only one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qwenlm.errors import QwenlmError

NOBODY = 65534
WORK = "/sandbox"  # the working folder, as the program sees it
SETUP_SECONDS = 30.0  # building the namespaces takes ~0.1 s; this only bounds a stuck start
# CLONE_NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS
NAMESPACES = 0x10000000 | 0x20000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # syscall numbers (no libc wrapper)


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
    disk_bytes: int = 128 << 20  # all files together (the working folder is a tmpfs: memory)
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
    (wall clock), ``"cpu_limit"``, ``"killed"`` (another signal, e.g. the output cap),
    ``"output_limit"``.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# Runs first (python -I -c BOOT CONFIG), as three processes: this one makes the namespaces and
# waits; its child, the first process of the new PID namespace, builds the new root and reaps;
# the grandchild drops every right and runs main.py. Only the standard library: nothing from
# qwenlm is trusted to be importable. Lines on the `ctl` pipe tell the parent how setup went:
# "U" (namespaces made: write the id maps), "R" (ready: user code starts), "E why" (failed).
BOOT = r"""
import ctypes, json, os, re, resource, shutil, signal, sys
cfg = json.loads(sys.argv[1])
WORK, UID, ROOT = cfg["work"], cfg["uid"], cfg["stage"] + "/root"
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# Flags the outer namespace locked on a mount; a read-only remount must repeat them.
LOCKED = {"nosuid": NOSUID, "nodev": NODEV, "noexec": NOEXEC, "noatime": 1024,
          "nodiratime": 2048, "relatime": 1 << 21}
DEVICES = ("null", "zero", "full", "random", "urandom")

def tell(line):
    os.write(cfg["ctl"], (line.replace("\n", " ") + "\n").encode())

def check(ret, what):
    if ret != 0:
        raise OSError(what + ": " + os.strerror(ctypes.get_errno()))

def mount(src, dst, fstype=None, flags=0, data=None):
    enc = lambda s: None if s is None else s.encode()
    check(
        libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        "mount " + dst,
    )

def runtime_paths():
    # What the interpreter loads from: its prefixes, its import path, the system libraries.
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), *sys.path]
    return paths + ["/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64",
                    "/usr/local/lib", "/etc/ld.so.cache"]

def expose(path, bound, depth=0):
    # Make `path` appear read-only under the same name inside, recreating the symbolic links
    # on the way (/lib -> usr/lib) so that both the name and its target resolve.
    parts = [p for p in os.path.abspath(path).split("/") if p]
    for i in range(1, len(parts) + 1):
        cur = "/" + "/".join(parts[:i])
        if os.path.islink(cur):
            link = ROOT + cur
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(os.readlink(cur), link)
            if depth < 16:
                expose(os.path.join(os.path.realpath(cur), *parts[i:]), bound, depth + 1)
            return
    path = "/" + "/".join(parts)
    covered = any(path == b or path.startswith(b + "/") for b in bound)
    if path == "/" or not os.path.exists(path) or covered:
        return
    if os.path.isdir(path):
        os.makedirs(ROOT + path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(ROOT + path), exist_ok=True)
        open(ROOT + path, "a").close()
    mount(path, ROOT + path, flags=BIND | REC)
    bound.append(path)

def build_root():
    mount(None, "/", flags=REC | PRIVATE)  # nothing below propagates back to the host
    os.umask(0o066)  # folders made here can be crossed, not listed
    mount("tmpfs", ROOT, "tmpfs", NOSUID | NODEV, "size=1m,nr_inodes=4096,mode=755")
    bound = []
    for path in runtime_paths():
        expose(path, bound)
    os.makedirs(ROOT + "/dev")
    for name in DEVICES:
        open(ROOT + "/dev/" + name, "a").close()
        mount("/dev/" + name, ROOT + "/dev/" + name, flags=BIND)
    for name, fd in (("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")):
        os.symlink("/proc/self/fd" + fd, ROOT + "/dev/" + name)
    os.makedirs(ROOT + "/proc")
    mount("proc", ROOT + "/proc", "proc", NOSUID | NODEV | NOEXEC)
    os.makedirs(ROOT + WORK)
    mount("tmpfs", ROOT + WORK, "tmpfs", NOSUID | NODEV,
          f"size={cfg['limits']['disk_bytes']},nr_inodes=16384,mode=700,uid={UID},gid={UID}")
    if not os.path.lexists(ROOT + "/tmp"):
        os.symlink(WORK, ROOT + "/tmp")
    # else the runtime itself lives under /tmp (a virtual environment there): /tmp then holds
    # it read-only, and TMPDIR still points at the working folder.
    try:
        shutil.copytree(cfg["stage"] + "/files", ROOT + WORK, dirs_exist_ok=True)
    except (OSError, shutil.Error) as e:
        raise OSError(f"the input files do not fit the working folder ({e})")
    for folder, dirs, files in os.walk(ROOT + WORK):
        for name in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            os.chown(name, UID, UID)
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    for row in rows:
        target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), row[4])
        if not target.startswith(ROOT + "/") or target in (ROOT + WORK, ROOT + "/proc"):
            continue
        flags = REMOUNT | BIND | RDONLY | NOSUID
        for opt in row[5].split(","):
            flags |= LOCKED.get(opt, 0)
        mount(None, target, flags=flags)
    os.mkdir(ROOT + "/.old")
    check(libc.syscall(cfg["pivot_root"], ROOT.encode(), (ROOT + "/.old").encode()), "pivot_root")
    os.chdir("/")
    check(libc.umount2(b"/.old", 2), "detach the host's root")  # 2: MNT_DETACH
    os.rmdir("/.old")
    mount(None, "/", flags=REMOUNT | RDONLY | NOSUID | NODEV)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")  # in this namespace: no way back to capabilities for the program
    return bound

def drop_privileges(bound):
    for cap in range(64):  # the bounding set: no capability can come back, even through exec
        if libc.prctl(24, ctypes.c_ulong(cap), 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            break  # EINVAL: past the last capability this kernel knows
    if os.getuid() != UID:
        os.setgroups([])
        os.setresgid(UID, UID, UID)
        os.setresuid(UID, UID, UID)
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")
    check(libc.prctl(38, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapPrm", "CapEff", "CapBnd"))]
    if len(caps) != 3 or any(int(c, 16) for c in caps):
        raise OSError("capabilities are still held: " + " ".join(caps))
    unreadable = [p for p in bound if os.path.isdir(p) and not os.access(p, os.R_OK | os.X_OK)]
    if unreadable:
        raise OSError("user nobody cannot read the Python runtime at " + ", ".join(unreadable))

def set_limits():
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu_seconds"]), ("RLIMIT_AS", lim["memory_bytes"]),
                        ("RLIMIT_NPROC", lim["processes"]), ("RLIMIT_FSIZE", lim["file_bytes"]),
                        ("RLIMIT_NOFILE", lim["open_files"]), ("RLIMIT_CORE", 0)):
        # CPU: SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
        hard = int(value) + 1 if name == "RLIMIT_CPU" else int(value)
        resource.setrlimit(getattr(resource, name), (int(value), hard))

def guard():
    work_prefix = os.path.realpath(WORK) + os.sep
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
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if (mode and any(c in mode for c in "wax+")) or writes:
                if not inside(path):
                    raise PermissionError("sandbox: writing outside the working folder")
        elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
                       "os.truncate", "os.symlink", "os.link", "shutil.rmtree", "os.utime"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError("sandbox: changing files outside the working folder")
    sys.addaudithook(hook)

def exit_like(status):
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    os._exit(code)

def program(bound):
    try:
        drop_privileges(bound)
        set_limits()
        os.umask(0o022)
        os.chdir(WORK)
    except Exception as e:
        tell(f"E {e}")
        os._exit(125)
    tell("R")
    os.close(cfg["ctl"])
    if cfg["guard"]:
        guard()
    sys.argv = ["main.py"]
    sys.path.insert(0, WORK)
    import runpy
    runpy.run_path(os.path.join(WORK, "main.py"), run_name="__main__")

def init():
    # The first process of the PID namespace: it ignores signals it has no handler for (so the
    # program runs in a child), reaps orphans, and its exit kills everything left inside.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    libc.prctl(1, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the waiter
    libc.prctl(4, ctypes.c_ulong(0), 0, 0, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace it
    try:
        bound = build_root()
    except Exception as e:
        tell(f"E {e}")
        os._exit(125)
    child = os.fork()
    if child == 0:
        program(bound)
        sys.exit(0)  # runpy returned: exit through the normal path so buffers are flushed
    os.close(cfg["ctl"])
    signal.signal(signal.SIGTERM, lambda *a: os._exit(128 + signal.SIGTERM))
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            exit_like(status)

parent = os.getppid()
if libc.unshare(cfg["namespaces"]) != 0:
    tell("E unshare: " + os.strerror(ctypes.get_errno()))
    os._exit(125)
tell("U")
os.read(cfg["go"], 1)  # the parent closes its end once the id maps are written
os.close(cfg["go"])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
first = os.fork()
if first == 0:
    init()
os.close(cfg["ctl"])
while True:  # wait for the namespace to end; end it if the parent that started us is gone
    signal.sigtimedwait({signal.SIGCHLD}, 1.0)
    pid, status = os.waitpid(first, os.WNOHANG)
    if pid:
        exit_like(status)
    if os.getppid() != parent:
        os.kill(first, signal.SIGKILL)
"""


def _namespaces_work(python: str | None = None) -> bool:
    """Whether this user may make the sandbox's namespaces here (tried in a child; ~30 ms)."""
    if not sys.platform.startswith("linux"):
        return False
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({NAMESPACES}) != 0)"
    try:
        r = subprocess.run(
            [python or sys.executable, "-I", "-c", probe], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _id_maps() -> tuple[str, str]:
    """``uid_map`` and ``gid_map`` for the sandbox's user namespace."""
    if os.geteuid() == 0:
        # Setup runs as root (it must reach a runtime under, say, a 0700 /root), the program as
        # the host's nobody: host root is exempt from RLIMIT_NPROC, nobody is not.
        ids = f"0 0 1\n{NOBODY} {NOBODY} 1\n"
        return ids, ids
    # Anyone else may map only their own ids; they are not exempt from RLIMIT_NPROC either.
    return f"{NOBODY} {os.geteuid()} 1\n", f"{NOBODY} {os.getegid()} 1\n"


def _read_line(fd: int, deadline: float) -> str:
    """One line from the setup pipe ('' at its end), waiting at most until ``deadline``."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise SandboxError(f"the sandbox did not start within {SETUP_SECONDS:.0f} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", errors="replace").strip()


def _clean_env() -> dict[str, str]:
    # Nothing from the parent's environment leaks in (tokens, proxies); libraries that want a
    # writable home or cache get the working folder.
    return {
        "PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin",
        "HOME": WORK,
        "TMPDIR": WORK,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "MPLCONFIGDIR": WORK + "/.matplotlib",
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

    Needs Linux with user namespaces available to this user; raises :class:`SandboxError`
    otherwise (code is never run without them). ``guard=False`` turns the in-process guard off
    (to test the outer layers on their own).
    """

    def __init__(
        self, limits: Limits | None = None, *, guard: bool = True, python: str | None = None
    ) -> None:
        self.limits = limits or Limits()
        self.guard = guard
        self.python = python or sys.executable
        if platform.machine() not in PIVOT_ROOT:
            raise SandboxError(
                f"the sandbox does not support this machine ({platform.machine()})",
                hint="it runs on Linux on x86_64, aarch64 or riscv64",
            )
        if not _namespaces_work(self.python):
            raise SandboxError(
                "Linux user namespaces are not available here (unshare failed), and the "
                "sandbox never runs code without them",
                hint="enable unprivileged user namespaces (sysctl user.max_user_namespaces; on "
                "Ubuntu, kernel.apparmor_restrict_unprivileged_userns=0)",
            )

    def start(
        self,
        code: str,
        *,
        files: Mapping[str, bytes | str] | None = None,
        limits: Limits | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``code`` as ``main.py`` in the working folder, with pipes on stdin/stdout/stderr.

        Returns once the sandbox is set up and the code starts; raises :class:`SandboxError`
        if it cannot be set up. For long-lived programs (the code interpreter's kernel);
        :meth:`run` is the one-shot form. ``files`` are copied into the working folder first.
        """
        limits = limits or self.limits
        stage = Path(tempfile.mkdtemp(prefix="qwenlm-sandbox-"))
        try:
            inputs = stage / "files"
            inputs.mkdir()
            (stage / "root").mkdir()  # where the new root is mounted (in the sandbox only)
            for name, data in {**(files or {}), "main.py": code}.items():
                path = (inputs / name).resolve()
                if not path.is_relative_to(inputs):
                    raise SandboxError(f"sandbox file name {name!r} leaves the working folder")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data.encode() if isinstance(data, str) else data)
            return self._launch(stage, limits)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # the sandbox has its own copy by now

    def _launch(self, stage: Path, limits: Limits) -> subprocess.Popen[bytes]:
        ctl_r, ctl_w = os.pipe()
        go_r, go_w = os.pipe()
        cfg = {
            "stage": str(stage),
            "work": WORK,
            "uid": NOBODY,
            "namespaces": NAMESPACES,
            "pivot_root": PIVOT_ROOT[platform.machine()],
            "limits": dataclasses.asdict(limits),
            "guard": self.guard,
            "ctl": ctl_w,
            "go": go_r,
        }
        try:
            proc = subprocess.Popen(
                [self.python, "-I", "-c", BOOT, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=stage,
                env=_clean_env(),
                pass_fds=(ctl_w, go_r),
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as e:
            for fd in (ctl_r, ctl_w, go_r, go_w):
                os.close(fd)
            raise SandboxError(f"could not start the sandbox: {e}") from None
        os.close(ctl_w)
        os.close(go_r)
        try:
            deadline = time.monotonic() + SETUP_SECONDS
            line = _read_line(ctl_r, deadline)
            if line == "U":
                uid_map, gid_map = _id_maps()
                if os.geteuid() != 0:
                    Path(f"/proc/{proc.pid}/setgroups").write_text("deny")
                Path(f"/proc/{proc.pid}/uid_map").write_text(uid_map)
                Path(f"/proc/{proc.pid}/gid_map").write_text(gid_map)
                os.close(go_w)
                go_w = -1
                line = _read_line(ctl_r, deadline)
            if line != "R":
                why = line[2:] if line.startswith("E ") else "it exited during setup"
                raise SandboxError(
                    f"could not set the sandbox up: {why}",
                    hint="the sandbox needs user, mount and PID namespaces that allow mounting "
                    "(inside a container: allow nested namespaces); code is never run without",
                )
        except BaseException as e:
            kill_group(proc)
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
            if isinstance(e, OSError):
                raise SandboxError(f"could not set the sandbox up: {e}") from None
            raise
        finally:
            os.close(ctl_r)
            if go_w >= 0:
                os.close(go_w)
        return proc

    def run(
        self,
        code: str,
        *,
        stdin: str | bytes = b"",
        files: Mapping[str, bytes | str] | None = None,
        limits: Limits | None = None,
    ) -> SandboxResult:
        """Run ``code`` to the end (or to a limit) in a fresh sandbox, then discard it."""
        limits = limits or self.limits
        t0 = time.monotonic()
        proc = self.start(code, files=files, limits=limits)
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
        rc = proc.returncode
        stdout, stderr = out.text(), err.text()
        status = _status(rc, timed_out=timed_out, overflow=overflow.is_set())
        return SandboxResult(status, rc, stdout, stderr, time.monotonic() - t0)


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
    """SIGKILL the sandbox's whole process group (and with it, everything in its namespace)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
