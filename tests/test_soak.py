"""benchmarks/soak.py for one minute on the tiny model: mixed traffic against a real `qwenlm
serve` process ends with no hung request, no unexpected answer, the server idle, and its memory
level (the 30-minute run on the real model is in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from helpers import tiny_config, write_tiny_gguf

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_one_minute_soak_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from soak import BAD, MIX

    model, report = tmp_path / "tiny.gguf", tmp_path / "soak.json"
    write_tiny_gguf(model, tiny_config(max_position_embeddings=1024))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--model", str(model)]
    cmd += ["--minutes", "1", "--window", "15", "--clients", "4", "--timeout", "60"]
    cmd += ["--out", str(report)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(report.read_text())
    assert set(result["outcomes"]) <= {"ok", "cancelled", "refused"}
    kinds = {k.split(":")[0] for k in result["by_kind"]}
    assert kinds == set(MIX)
    assert {k.split(":")[1] for k in result["by_kind"] if k.startswith("bad:")} == set(BAD)
    assert len(result["windows"]) >= 4 and result["rss_growth_first_to_last_window"] <= 0.05
    assert (
        result["idle_at_end"]["running"] == 0 and result["fds"]["end"] <= result["fds"]["start"] + 2
    )
