"""The sandbox stops or denies what model-written code must not do, and the parent carries on.

Each attack runs with every layer on, and again with the in-process guard off, so the outer
layers (namespaces, resource limits, wall clock) are shown to hold on their own. The fork bomb
is bounded by RLIMIT_NPROC counted inside the sandbox's own user namespace, so it cannot
starve other processes on the machine.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from qwenlm.sandbox import Limits, Sandbox, SandboxError, _namespaces_work

LIMITS = Limits(cpu_seconds=3, wall_seconds=8.0, memory_bytes=1 << 30, processes=16)


@pytest.fixture(scope="module", params=["guarded", "unguarded"])
def sandbox(request) -> Sandbox:
    if not _namespaces_work():
        pytest.skip("unprivileged user namespaces unavailable")
    return Sandbox(LIMITS, isolation="namespaces", guard=request.param == "guarded")


def test_runs_code_and_captures_output(sandbox):
    r = sandbox.run(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nprint(input())", stdin="fed\n"
    )
    assert r.status == "ok" and r.returncode == 0
    assert r.stdout == "out\nfed\n" and r.stderr == "err\n"


def test_error_exit(sandbox):
    r = sandbox.run("raise ValueError('boom')")
    assert r.status == "error" and "ValueError: boom" in r.stderr


def test_infinite_loop_is_stopped_by_the_cpu_limit(sandbox):
    r = sandbox.run("while True:\n    pass\n")
    assert r.status == "cpu_limit"
    assert r.seconds < LIMITS.wall_seconds


def test_sleeping_forever_is_stopped_by_the_wall_clock(sandbox):
    r = sandbox.run(
        "import time\ntime.sleep(1000)\n", limits=Limits(cpu_seconds=3, wall_seconds=2.0)
    )
    assert r.status == "timeout"
    assert r.seconds < 10


def test_allocating_10_gb_fails(sandbox):
    r = sandbox.run("x = bytearray(10 * 1024**3)\nprint('allocated')\n")
    assert r.status == "error"
    assert "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_fork_bomb_is_bounded_and_killed(sandbox):
    code = (
        "import os\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
    )
    r = sandbox.run(code, limits=Limits(cpu_seconds=2, wall_seconds=4.0, processes=16))
    assert r.status in ("timeout", "cpu_limit", "killed")
    # Everything it started is gone (the PID namespace dies with its first process). Forked
    # children keep the sandbox's command line, so look for that rather than counting all
    # processes, which other jobs on the machine change.
    assert sandbox_processes() == []


def sandbox_processes() -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # not a process, or gone meanwhile
        if b'"namespaces":' in cmdline and b'"limits":' in cmdline and pid.isdigit():
            found.append(int(pid))
    return found


def test_writing_outside_its_folder_is_denied(sandbox, tmp_path):
    target = tmp_path / "escape.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')",
        "open('/tmp/qwenlm-sandbox-escape.txt', 'w').write('x')",
    ):
        r = sandbox.run(code)
        assert r.status == "error", code
        assert "PermissionError" in r.stderr or "Read-only file system" in r.stderr
    assert not target.exists() and not os.path.exists("/tmp/qwenlm-sandbox-escape.txt")


def test_writing_inside_its_folder_works_and_the_folder_is_removed(sandbox):
    code = "import os\nopen('data.txt', 'w').write('kept')\nprint(os.getcwd())\n"
    r = sandbox.run(code, keep_files=True)
    assert r.ok and r.files["data.txt"] == b"kept"
    assert not os.path.exists(r.stdout.strip())


def test_network_is_unreachable(sandbox):
    # A listener on this machine's loopback: the sandbox must not reach even that.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = threading.Event()

    def accept() -> None:
        server.settimeout(6)
        try:
            server.accept()
            accepted.set()
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    try:
        for code in (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
            "print('connected')",
            "import socket\n"
            "s = socket.create_connection(('1.1.1.1', 80), timeout=3)\n"
            "print('connected')",
        ):
            r = sandbox.run(code)
            assert r.status == "error" and "connected" not in r.stdout
            assert any(
                e in r.stderr
                for e in (
                    "PermissionError",
                    "Network is unreachable",
                    "Connection refused",
                    "OSError",
                )
            )
    finally:
        t.join()
        server.close()
    assert not accepted.is_set()


def test_environment_is_clean(sandbox, monkeypatch):
    monkeypatch.setenv("QWENLM_SECRET_TOKEN", "do-not-leak")
    r = sandbox.run("import os\nprint(sorted(os.environ))\n")
    assert r.ok and "QWENLM_SECRET_TOKEN" not in r.stdout


def test_output_flood_is_capped(sandbox):
    r = sandbox.run(
        "while True:\n    print('x' * 10000)\n",
        limits=Limits(cpu_seconds=5, wall_seconds=8.0, output_bytes=100_000),
    )
    assert r.status == "output_limit"
    assert len(r.stdout) <= 100_000


def test_each_layer_denies_on_its_own(sandbox):
    # With the guard on, it refuses first (its message); with it off, the kernel refuses.
    guarded = sandbox.guard
    r = sandbox.run("open('/etc/qwenlm-sandbox-test', 'w')")
    assert ("sandbox: writing outside" in r.stderr) == guarded
    assert ("Read-only file system" in r.stderr) != guarded
    r = sandbox.run("import socket\ns = socket.socket()\ns.connect(('10.0.0.1', 80))")
    assert ("sandbox: no network" in r.stderr) == guarded
    assert ("Network is unreachable" in r.stderr) != guarded


def test_root_without_namespaces_refuses_when_nobody_cannot_run_python(monkeypatch):
    import qwenlm.sandbox as sb

    monkeypatch.setattr(sb, "_namespaces_work", lambda: False)
    monkeypatch.setattr(sb.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sb, "_others_can_run", lambda python: False)
    with pytest.raises(SandboxError, match="nobody"):
        Sandbox(LIMITS)
    with pytest.raises(SandboxError, match="namespaces are not available"):
        Sandbox(LIMITS, isolation="namespaces")


def test_bad_limits_are_reported():
    with pytest.raises(SandboxError, match="cpu_seconds"):
        Limits(cpu_seconds=0)
    with pytest.raises(SandboxError, match="unknown isolation"):
        Sandbox(isolation="chroot")  # type: ignore[arg-type]


def test_parent_is_unharmed_after_everything(sandbox):
    # After the attacks above in this module, this process still works and can spawn.
    r = sandbox.run("print(sum(range(10)))")
    assert r.ok and r.stdout.strip() == "45"
