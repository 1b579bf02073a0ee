"""The decode thread governor: all threads on a quiet machine, fewer while other processes hold
the cores, all again once they leave; and the run-delay reading it acts on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_tiny_gguf

import qwenlm
from qwenlm import kernels
from qwenlm.kernels import ThreadGovernor, cpu_kernels, decode_threads

SCHEDSTAT = Path("/proc/thread-self/schedstat")


class Machine:
    """A fake clock and run-delay counter: ``wait(seconds, waited)`` lets time pass while the
    governor's threads wait ``waited`` CPU-seconds a second."""

    def __init__(self) -> None:
        self.now, self.delay_ns = 100.0, 0

    def wait(self, seconds: float, waited: float) -> None:
        self.now += seconds
        self.delay_ns += int(seconds * waited * 1e9)


def run(gov: ThreadGovernor, m: Machine, seconds: float, waited, most: int = 2) -> list[int]:
    """Steps of 20 ms for ``seconds``; ``waited(n)``: the wait a second with n threads."""
    used = []
    for _ in range(round(seconds / 0.02)):
        n = gov.threads(most)
        used.append(n)
        m.wait(0.02, waited(n))
    return used


def test_governor_keeps_all_threads_on_a_quiet_machine():
    m = Machine()
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=2)
    assert set(run(gov, m, 10, lambda n: 0.05)) == {2}


def test_governor_drops_a_thread_beside_a_busy_process_and_probes_back():
    m = Machine()
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=2)
    # One busy process beside two threads on two cores: each gets 2/3 of a CPU (measured:
    # ~0.9 CPU-seconds waited a second between the two); one thread waits for nothing.
    busy = run(gov, m, 10, lambda n: 0.9 if n == 2 else 0.02)
    assert busy[:12] == [2] * 12  # the first window is measured with all threads
    assert busy.count(1) > 0.8 * len(busy)  # then mostly one, with short probes of two
    assert 2 in busy[-150:]  # probes continue
    # The busy process leaves: the next probe finds no wait, and all threads stay.
    quiet = run(gov, m, 10, lambda n: 0.02)
    assert quiet[-300:] == [2] * 300


def test_governor_ignores_the_wait_between_steps_of_a_pause():
    # A prefill (or an idle spell) between two decode steps: the process's own threads wait
    # for each other there (PyTorch's and the kernels'), which says nothing of other
    # processes. Measured on the 2-core Xeon: 0.66 CPU-seconds waited in a 1.65 s prefill,
    # after which decode ran on one thread at 27 tokens/s instead of 42.
    m = Machine()
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=2)
    run(gov, m, 1, lambda n: 0.02)
    m.wait(1.65, 0.4)  # the prefill
    assert set(run(gov, m, 3, lambda n: 0.02)) == {2}
    # A short pause is still part of decoding: a busy neighbour seen across it counts.
    busy = run(gov, m, 3, lambda n: 0.9 if n == 2 else 0.02)
    assert busy.count(1) > 0.8 * len(busy)


def test_governor_leaves_the_cores_others_do_not_hold():
    m = Machine()
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=8)
    # 8 threads and 2 busy processes on 8 cores: each thread gets 8/10 of a CPU.
    used = run(gov, m, 1, lambda n: n * (1 - 8 / (n + 2)) if n > 6 else 0.0, most=8)
    assert used[-1] == 6


def test_governor_stays_out_of_the_way_where_it_cannot_see(monkeypatch):
    m = Machine()
    gov = ThreadGovernor(lambda: -1, clock=lambda: m.now, cores=2)
    assert set(run(gov, m, 3, lambda n: 2.0)) == {2}  # no schedstat: all threads
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=2)
    assert set(run(gov, m, 3, lambda n: 2.0, most=1)) == {1}  # --threads 1 stays 1
    # --threads changed mid-run: the new count, measured afresh
    gov = ThreadGovernor(lambda: m.delay_ns, clock=lambda: m.now, cores=4)
    run(gov, m, 1, lambda n: 0.0, most=2)
    assert gov.threads(4) == 4
    monkeypatch.setenv("QWENLM_ADAPT_THREADS", "0")
    assert decode_threads(2) == 2


def busy_loops(n: int) -> list[subprocess.Popen]:
    loop = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def kernels_lib():
    lib = cpu_kernels()
    if lib is None:
        pytest.skip("native kernels unavailable")
    if not SCHEDSTAT.exists():
        pytest.skip("this kernel keeps no per-thread schedstat")
    return lib


def test_run_delay_counts_the_time_a_thread_waits_for_a_cpu(kernels_lib):
    before = kernels_lib.qlm_run_delay_ns()
    assert before >= 0
    cores = len(os.sched_getaffinity(0))
    procs = busy_loops(cores + 1)  # more runnable threads than cores: this one waits too
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        waited = kernels_lib.qlm_run_delay_ns() - before
    finally:
        stop(procs)
    assert waited > 0.05e9  # spinning beside cores + 1 others, it waited ~half the time


def test_decode_uses_fewer_threads_beside_busy_processes(kernels_lib, tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_config(intermediate_size=128, num_hidden_layers=3), qtype="Q5_0")
    engine = qwenlm.load(path, quant="gguf").engine
    monkeypatch.setattr(ThreadGovernor, "window_s", 0.05)
    monkeypatch.setattr(kernels, "_GOVERNORS", type(kernels._GOVERNORS)())
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def decode(seconds: float) -> list[int]:
        seq = engine.new_sequence()
        engine.prefill(seq, [3, 4, 5])
        end, used = time.monotonic() + seconds, []
        while time.monotonic() < end:
            for _ in range(50):
                engine.forward([(seq, [7])])
                used.append(kernels._GOVERNORS.gov.n)
            seq = engine.new_sequence()
            engine.prefill(seq, [3, 4, 5])
        return used

    try:
        torch.set_num_threads(3)  # a third worker, then not needed: it must not get in the way
        decode(0.1)
        torch.set_num_threads(2)
        quiet = decode(0.2)
        procs = busy_loops(len(os.sched_getaffinity(0)))
        try:
            busy = decode(1.5)
        finally:
            stop(procs)
    finally:
        torch.set_num_threads(before)
    assert quiet.count(2) > 0.5 * len(quiet)
    assert 1 in busy
