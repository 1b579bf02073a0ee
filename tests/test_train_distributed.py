"""Two processes on gloo (torchrun, DDP and FSDP2) follow the one-process loss trajectory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_tiny_hf_folder
from safetensors.torch import load_file

from qwenlm.train import train
from qwenlm.train.plot import read_log
from qwenlm.train.recipe import recipe_from_dict

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    model = tmp / "model"
    write_tiny_hf_folder(model)
    rows = [
        {
            "conversations": [
                {"from": "user", "value": f"hello {i}" * (1 + i % 4)},
                {"from": "assistant", "value": "world " * (1 + i % 3)},
            ]
        }
        for i in range(20)
    ]
    (tmp / "sft.json").write_text(json.dumps(rows))
    return tmp


def recipe(
    tmp: Path, out: str, method: str, *, processes: int, steps: int = STEPS, strategy: str = "ddp"
) -> dict:
    # The same global batch of 4 rows: 2 x 2 accumulated on one process, 2 x 1 on each of two.
    return {
        "out": str(tmp / out),
        "model": str(tmp / "model"),
        "method": method,
        "data": {"train": [str(tmp / "sft.json")], "max_seq_len": 96, "eval_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 0, "min_lr_ratio": 1.0},  # constant: a resume may extend steps
        "train": {"steps": steps, "micro_batch_size": 2, "grad_accum": 4 // (2 * processes)},
        "eval": {"every": 4},
        "checkpoint": {"every": 4, "keep": 1},
        "log": {"progress": False, "plot": False},
        "distributed": {"strategy": strategy},
    }


def torchrun(data: dict, tmp: Path, *args: str) -> None:
    path = tmp / f"{Path(data['out']).name}.yaml"
    path.write_text(yaml.safe_dump(data))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "qwenlm",
            "train",
            str(path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def trajectory(out: Path) -> tuple[dict, dict]:
    log = read_log(out / "log.jsonl")
    train_losses = {r["step"]: r["loss"] for r in log if r["kind"] == "train"}
    eval_losses = {r["step"]: r["eval_loss"] for r in log if r["kind"] == "eval"}
    return train_losses, eval_losses


@pytest.fixture(scope="module")
def single(setup):
    runs = {}
    for method in ("lora", "full"):
        train(recipe_from_dict(recipe(setup, f"single-{method}", method, processes=1)))
        runs[method] = setup / f"single-{method}"
    return runs


@pytest.mark.parametrize(
    "method, strategy, resume_at",
    [("lora", "ddp", None), ("lora", "fsdp", None), ("full", "fsdp", 4)],
)
def test_two_processes_match_one_process(setup, single, method, strategy, resume_at):
    out = f"two-{method}-{strategy}"
    if resume_at:
        # stop after `resume_at` steps, then continue: sharded state is saved and reloaded
        torchrun(recipe(setup, out, method, processes=2, steps=resume_at, strategy=strategy), setup)
        torchrun(recipe(setup, out, method, processes=2, strategy=strategy), setup, "--resume")
    else:
        torchrun(recipe(setup, out, method, processes=2, strategy=strategy), setup)
    want_train, want_eval = trajectory(single[method])
    got_train, got_eval = trajectory(setup / out)
    assert sorted(got_train) == list(range(1, STEPS + 1))
    # Two ranks reduce gradients in another order: float32 noise (~1e-7 relative) that a few
    # Adam steps amplify but keep far below what a lost shard or a skipped step would change
    # (the loss's third digit); rel=1e-5 sits between the two.
    assert got_train == pytest.approx(want_train, rel=1e-5)
    assert got_eval == pytest.approx(want_eval, rel=1e-5) and len(got_eval) >= 3
    assert want_train[STEPS] < 0.8 * want_train[1]  # and it did learn
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(str(single[method] / weights)), load_file(str(setup / out / weights))
    assert a.keys() == b.keys()
    for k in a:
        # the same noise per weight; Adam divides by sqrt(v), so tiny gradients can differ
        # relatively more: rtol 1e-4, with atol 1e-5 for weights near zero
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
