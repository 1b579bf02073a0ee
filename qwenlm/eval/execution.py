"""Running model-written programs against their tests, in the sandbox (never in this process)."""

from __future__ import annotations

from dataclasses import dataclass

from qwenlm.sandbox import Limits, Sandbox

# Enough for every HumanEval/MBPP reference solution with a wide margin on a slow machine.
TEST_LIMITS = Limits(cpu_seconds=10, wall_seconds=20.0, memory_bytes=2 << 30, processes=16)


@dataclass
class TestOutcome:
    passed: bool
    status: str  # "passed", "failed", "timeout", "cpu_limit", ...
    detail: str  # the last line of stderr, for the records


def run_tests(program: str, *, sandbox: Sandbox | None = None) -> TestOutcome:
    """Run ``program`` (solution plus its asserts) in the sandbox; passed = exit status 0."""
    sandbox = sandbox or Sandbox(TEST_LIMITS)
    r = sandbox.run(program)
    if r.ok:
        return TestOutcome(True, "passed", "")
    lines = r.stderr.strip().splitlines()
    status = "failed" if r.status == "error" else r.status
    return TestOutcome(False, status, lines[-1][:300] if lines else "")
