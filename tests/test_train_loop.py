"""Training runs end to end on tiny models: pretraining, SFT, DPO, Q-LoRA, and no lost work."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_float32_close,
    float64_logits,
    write_tiny_hf_folder,
)

from qwenlm.train import train
from qwenlm.train.loop import TrainError, cosine_lr
from qwenlm.train.plot import read_log
from qwenlm.train.recipe import recipe_from_dict
from qwenlm.weights.safetensors import write_tensors

REPO = Path(__file__).resolve().parent.parent
QWENLM = [sys.executable, "-m", "qwenlm"]


def sft_data(path: Path, n: int = 24) -> Path:
    words = ["hello", "world", "hello world", "wor ld", "ing"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {words[i % 5]} {i}"},
                {"role": "assistant", "content": f"{words[i % 5]} {words[(i + 1) % 5]}"},
            ]
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def recipe(tmp: Path, out: str = "run", **sections):
    if not (tmp / "model").exists():
        write_tiny_hf_folder(tmp / "model")
    base = {
        "out": str(tmp / out),
        "model": str(tmp / "model"),
        "task": "sft",
        "method": "lora",
        "data": {"train": [str(sft_data(tmp / "sft.jsonl"))], "max_seq_len": 96},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "optim": {"lr": 5e-3},
        "schedule": {"warmup_steps": 0, "min_lr_ratio": 1.0},
        "train": {"steps": 25, "micro_batch_size": 2, "grad_accum": 2},
        "checkpoint": {"every": 5, "keep": 2},
        "log": {"progress": False, "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl") if r["kind"] == "train"}


def evals(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_log(out / "log.jsonl") if r["kind"] == "eval"}


def cli_train(data: dict, *args: str, tmp: Path) -> subprocess.Popen:
    import yaml

    path = tmp / f"recipe-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return subprocess.Popen(
        [*QWENLM, "train", str(path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cosine_schedule_warms_up_and_floors_at_ten_percent():
    lrs = [cosine_lr(s, total=100, peak=1e-3, warmup=10, min_ratio=0.1) for s in range(100)]
    # the schedule is float64 arithmetic: pytest.approx's default 1e-6
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-4)


# -- no lost work ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 25-step LoRA run (dropout on, so RNG state matters on resume).

    Run as the interrupted runs are, through the CLI in a fresh process: in this one, a test
    run earlier (pytest-randomly orders them) can leave torch's thread count or other global
    state changed, and the losses then differed from the CLI runs' in the 6th digit."""
    tmp = tmp_path_factory.mktemp("reference")
    data = recipe(tmp)
    proc = cli_train(data, tmp=tmp)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return tmp, data


def test_sigkill_then_resume_reproduces_the_losses_exactly(reference, tmp_path):
    _, ref_data = reference
    data = {
        **ref_data,
        "out": str(tmp_path / "killed"),
        "train": {**ref_data["train"], "steps": 100_000},
    }
    proc = cli_train(data, tmp=tmp_path)
    ckpt = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    resumed = cli_train({**data, "train": ref_data["train"]}, "--resume", tmp=tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err
    expected = losses(Path(ref_data["out"]))
    got = losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 26))
    assert got == expected  # exactly: same floats, step for step
    assert_same_adapter(tmp_path / "killed", Path(ref_data["out"]))  # and the same weights


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_inside_checkpoint_writes_never_leaves_a_partial_checkpoint(reference, tmp_path):
    """Checklist 10: killed at many moments, half of them while a checkpoint is being written,
    every step-N folder verifies; the resumed runs end with the uninterrupted run's weights."""
    import random

    from qwenlm.train.checkpoint import Checkpoints

    _, ref_data = reference
    out = tmp_path / "killed"
    data = {**ref_data, "out": str(out), "checkpoint": {"every": 1, "keep": 3}}
    ckpts = Checkpoints(out / "checkpoints")
    log = out / "log.jsonl"
    rng = random.Random(0)
    flags: tuple[str, ...] = ()
    kills = inside = 0
    for attempt in range(5):  # four kills, then a run left to finish
        proc = cli_train(data, *flags, tmp=tmp_path)
        flags = ("--resume",)
        logged = log.stat().st_size if log.exists() else 0
        kill_at = None
        deadline = time.monotonic() + 240
        while attempt < 4 and proc.poll() is None and time.monotonic() < deadline:
            saving = ckpts.root.is_dir() and any(
                p.name.endswith(".partial") for p in ckpts.root.iterdir()
            )
            if kill_at is None and log.exists() and log.stat().st_size > logged:
                kill_at = time.monotonic() + rng.uniform(0.0, 0.5)  # training: a random moment
            if (attempt % 2 == 0 and saving) or (
                attempt % 2 == 1 and kill_at and time.monotonic() > kill_at
            ):
                os.kill(proc.pid, signal.SIGKILL)
                kills, inside = kills + 1, inside + saving
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=240)
        if attempt == 4 or proc.returncode == 0:
            assert proc.returncode == 0, err
            break
        assert proc.returncode == -signal.SIGKILL, err
        for step in ckpts.steps():
            assert ckpts.verify(ckpts.path(step)) is None, step  # never a partial step-N
    assert kills == 4 and inside >= 2, (kills, inside)
    assert losses(out) == losses(Path(ref_data["out"]))
    assert_same_adapter(out, Path(ref_data["out"]))


class _Killed(BaseException):
    """Death at a given file-system call: no handler runs, as with SIGKILL."""


def test_death_at_every_file_operation_of_a_save_leaves_old_or_new_never_half(
    tmp_path, monkeypatch
):
    import shutil

    from qwenlm.train import checkpoint as ck
    from qwenlm.weights import safetensors as st

    def write(step):
        def fill(part):
            write_tensors(part / "weights.safetensors", {"w": torch.full((4,), float(step))})
            ck.write_json(part / "trainer.json", {"step": step})

        return fill

    # Deaths while pruning too: the third save deletes the first checkpoint (keep=2).
    real = {
        "replace": os.replace,
        "fsync": os.fsync,
        "save_file": st.save_file,
        "unlink": os.unlink,
        "rmdir": os.rmdir,
    }
    point = 0
    while True:
        point += 1
        root = tmp_path / f"run-{point}"
        ckpts = ck.Checkpoints(root, keep=2)
        ckpts.save(1, write(1))
        ckpts.save(2, write(2))
        calls = 0

        def dies(name, die_at=point):
            def op(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == die_at:
                    raise _Killed(name)
                return real[name](*args, **kwargs)

            return op

        for name in ("replace", "fsync", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, dies(name))
        monkeypatch.setattr(st, "save_file", dies("save_file"))
        try:
            ckpts.save(3, write(3))
            finished = True
        except _Killed:
            finished = False
        monkeypatch.undo()
        steps = ckpts.steps()
        assert all(ckpts.verify(ckpts.path(s)) is None for s in steps), (point, steps)
        assert ckpts.latest() == ckpts.path(3 if 3 in steps else 2)
        ckpts.clean_partials()
        assert sorted(p.name for p in root.iterdir()) == [f"step-{s:08d}" for s in sorted(steps)]
        shutil.rmtree(root)
        if finished:
            break
    assert point > 8  # every write, fsync and rename of a save was a place to die


def test_a_full_disk_during_a_save_stops_cleanly_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    import errno

    from qwenlm.train import checkpoint as ck
    from qwenlm.weights import safetensors as st

    data = recipe(tmp_path, train={"steps": 10}, checkpoint={"every": 5})
    real_save = st.save_file

    def save_file(tensors, path, metadata=None):
        if "step-00000010" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    with pytest.raises(ck.CheckpointWriteError) as e:
        train(recipe_from_dict(data))
    assert "could not save checkpoint step 10" in str(e.value)
    assert "No space left on device; checkpoint" in str(e.value)
    assert "step-00000005 is intact" in str(e.value) and "--resume" in str(e.value)
    root = Path(data["out"]) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]  # no half-written folder
    assert ck.Checkpoints(root).verify(root / "step-00000005") is None
    monkeypatch.undo()
    result = train(recipe_from_dict(data), resume=True)
    assert result.resumed_from == 5 and result.step == 10


def test_resume_refuses_other_data_or_another_recipe_unless_forced(reference, tmp_path):
    import shutil

    _, ref_data = reference
    out = tmp_path / "run"
    shutil.copytree(ref_data["out"], out)
    moved = tmp_path / "moved.jsonl"  # the same bytes elsewhere: fine
    shutil.copy(ref_data["data"]["train"][0], moved)
    same = {**ref_data, "out": str(out), "data": {**ref_data["data"], "train": [str(moved)]}}
    with moved.open("a") as f:
        f.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "new"},
                        {"role": "assistant", "content": "row"},
                    ]
                }
            )
            + "\n"
        )
    with pytest.raises(TrainError, match="trained with other data") as e:
        train(recipe_from_dict(same), resume=True)
    assert "--force-resume" in str(e.value)
    messages: list[str] = []
    result = train(recipe_from_dict(same), force_resume=True, say=messages.append)
    assert result.resumed_from == 25 and any("continuing anyway" in m for m in messages)
    shutil.rmtree(out)
    shutil.copytree(ref_data["out"], out)
    other = {**ref_data, "out": str(out), "optim": {"lr": 1e-3}}
    with pytest.raises(TrainError, match="trained with other recipe"):
        train(recipe_from_dict(other), resume=True)
    longer = {**ref_data, "out": str(out), "train": {**ref_data["train"], "steps": 27}}
    assert train(recipe_from_dict(longer), resume=True).step == 27  # more steps: allowed


def test_corrupt_newest_checkpoint_is_detected_and_the_one_before_used(reference, tmp_path):
    import shutil

    _, ref_data = reference
    out = tmp_path / "run"
    shutil.copytree(ref_data["out"], out)
    newest = out / "checkpoints" / "step-00000025"
    blob = bytearray((newest / "optimizer.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (newest / "optimizer.safetensors").write_bytes(bytes(blob))
    messages: list[str] = []
    result = train(
        recipe_from_dict({**ref_data, "out": str(out)}), resume=True, say=messages.append
    )
    assert result.resumed_from == 20
    assert any("step-00000025 is unusable" in m and "checksum" in m for m in messages), messages
    assert losses(out) == losses(Path(ref_data["out"]))  # steps 21-25 recomputed identically


def test_peft_loads_a_trained_adapter_with_the_same_logits(reference):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qwenlm.lora import load_adapter
    from qwenlm.models import build_model
    from qwenlm.weights import open_checkpoint

    _, ref_data = reference
    with open_checkpoint(ref_data["model"]) as ckpt:
        ours = build_model(ckpt.config, ckpt.tensors())
    load_adapter(ours, ref_data["out"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_data["model"], dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, ref_data["out"]).eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_float32_close(ours.eval()(ids), hf(ids).logits, float64_logits(hf, ids))


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path):
    data = recipe(tmp_path, train={"steps": 100_000}, checkpoint={"every": 0})
    proc = cli_train(data, tmp=tmp_path)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 240
    while (
        not log.exists() or len(log.read_text().splitlines()) < 3
    ) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    steps = [int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0] == max(losses(tmp_path / "run"))
    assert "continue with --resume" in err and "Traceback" not in err
    # and the run continues from there
    result = train(
        recipe_from_dict({**data, "train": {**data["train"], "steps": steps[0] + 2}}), resume=True
    )
    assert result.resumed_from == steps[0] and result.step == steps[0] + 2


def test_an_existing_run_is_not_overwritten_without_resume(reference):
    _, ref_data = reference
    with pytest.raises(TrainError, match="already holds a training run"):
        train(recipe_from_dict(ref_data))


# -- methods --------------------------------------------------------------------------------------
def test_pretraining_from_scratch_lowers_train_and_eval_loss_and_generates(tmp_path):
    data = {
        "out": str(tmp_path / "tiny-lm"),
        "task": "pretrain",
        "method": "full",
        "model": None,
        "scratch": {
            "tokenizer": "bytes",
            "config": {
                "hidden_size": 64,
                "intermediate_size": 192,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
                "rope_theta": 10000.0,
                "tie_word_embeddings": True,
            },
        },
        "data": {
            "train": [str(REPO / "data/train/pretrain/kjv-eval.txt")],
            "eval_fraction": 0.1,
            "max_seq_len": 64,
            "cache_dir": str(tmp_path / "tokens"),
        },
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 5},
        "train": {"steps": 60, "micro_batch_size": 8},
        "eval": {"every": 30},
        "checkpoint": {"every": 30},
        "log": {"progress": False, "plot": True},
    }
    result = train(recipe_from_dict(data))
    out = Path(data["out"])
    e = evals(out)
    assert sorted(e) == [0, 30, 60]
    assert e[0]["eval_loss"] > 5.0  # about ln(320): a uniform guess over the byte vocabulary
    assert e[60]["eval_loss"] < e[30]["eval_loss"] < e[0]["eval_loss"] - 2.0
    tl = losses(out)
    assert sum(tl[s] for s in range(56, 61)) < sum(tl[s] for s in range(1, 6)) - 10.0
    assert result.eval["eval_loss"] == e[60]["eval_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # a checkpoint is a model folder: the final one in `out` is checked by the full-FT test
    for model in (out / "checkpoints" / "step-00000030",):
        r = subprocess.run(
            [
                *QWENLM,
                "generate",
                "-m",
                str(model),
                "--raw",
                "And the LORD",
                "--greedy",
                "--max-new-tokens",
                "24",
                "--quant",
                "none",  # the checkpoint's own float weights
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        # 24 byte tokens: a model this small, this briefly trained, may well pick spaces
        assert len(r.stdout.removesuffix("\n")) > 0


def test_dpo_raises_the_chosen_minus_rejected_margin_on_held_out_pairs(tmp_path):
    def pairs(lo: int, hi: int) -> list[dict]:
        return [
            {"prompt": f"say {i}", "chosen": f"hello world {i}", "rejected": f"ing wor {i}"}
            for i in range(lo, hi)
        ]

    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in pairs(0, 24)))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(p) for p in pairs(100, 110)))
    data = recipe(
        tmp_path,
        task="dpo",
        data={"train": [str(tmp_path / "train.jsonl")], "eval": [str(tmp_path / "eval.jsonl")]},
        dpo={"beta": 0.1},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        optim={"lr": 1e-2},
        train={"steps": 20},
        checkpoint={"every": 0},
    )
    train(recipe_from_dict(data))
    e = evals(Path(data["out"]))
    before, after = e[0], e[20]
    # policy == reference (B = 0): the two log-ratios differ by float32 noise, ~1e-5 per token
    assert before["eval_reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval_margin"] > before["eval_margin"] + 5.0
    assert after["eval_accuracy"] == 1.0 and after["eval_loss"] < before["eval_loss"]


def test_qlora_trains_over_nf4_weights(tmp_path):
    data = recipe(
        tmp_path,
        method="qlora",
        qlora={"block_size": 64},
        train={"steps": 12},
        checkpoint={"every": 0},
    )
    train(recipe_from_dict(data))
    tl = losses(Path(data["out"]))
    assert tl[12] < 0.6 * tl[1]
    cfg = json.loads((Path(data["out"]) / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == data["model"]


def test_activation_checkpointing_keeps_the_math(tmp_path):
    runs = {}
    for name, checkpointed in (("plain", False), ("checkpointed", True)):
        data = recipe(
            tmp_path,
            out=name,
            method="full",
            train={"steps": 3, "activation_checkpointing": checkpointed},
            checkpoint={"every": 0},
        )
        train(recipe_from_dict(data))
        runs[name] = losses(tmp_path / name)
    # recomputation repeats the same float32 ops: equal up to a few ulps (1.2e-7) of the loss
    assert runs["plain"] == pytest.approx(runs["checkpointed"], rel=1e-6)


def test_export_round_trip_gives_equal_logits_in_a_fresh_process(tmp_path):
    """Checklist 30: fine-tuned weights, saved with their sha256, reload in a new process with
    the in-memory model's logits on 5 prompts; one flipped byte and the load is refused."""
    from helpers import tiny_model, tiny_tokenizer
    from safetensors.torch import load_file

    from qwenlm.errors import CheckpointError
    from qwenlm.weights.hf_writer import WEIGHTS, write_hf_folder

    model = tiny_model()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # a few steps of training, in memory
        x = torch.randint(0, 300, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    folder = write_hf_folder(
        tmp_path / "m",
        config=model.config,
        tensors=model.state_dict(),
        tokenizer=tiny_tokenizer(),
        chat_template=None,
    )
    prompts = [[(7 * i + j) % 300 for j in range(5 + 3 * i)] for i in range(5)]
    with torch.no_grad():
        expected = {str(i): model(torch.tensor([p]))[0] for i, p in enumerate(prompts)}
    exact = {str(i): float64_logits(model, torch.tensor([p]))[0] for i, p in enumerate(prompts)}
    script = (
        "import json, sys, torch, qwenlm\n"
        "from safetensors.torch import save_file\n"
        "m = qwenlm.load(sys.argv[1], dtype='float32', device='cpu', quant='none')\n"
        "prompts = json.loads(sys.argv[3])\n"
        "logits = {str(i): m.logits(p).contiguous() for i, p in enumerate(prompts)}\n"
        "save_file(logits, sys.argv[2])\n"
    )
    got_path = tmp_path / "logits.safetensors"
    r = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(got_path), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    got = load_file(str(got_path))
    assert got.keys() == expected.keys()
    for k in expected:
        # The same weights, but qwenlm.load fuses the projections for inference: other matmul
        # shapes sum in other orders (CPU-dependent), so float32 noise, not bit for bit.
        assert_float32_close(got[k], expected[k], exact[k])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(index["metadata"]["sha256"][WEIGHTS]) == 64
    blob = bytearray((folder / WEIGHTS).read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit, deep in the tensor data
    (folder / WEIGHTS).write_bytes(bytes(blob))
    import qwenlm

    with pytest.raises(CheckpointError, match="does not match the sha256"):
        qwenlm.load(folder, quant="none")


def test_full_finetune_writes_a_model_folder_that_loads(tmp_path):
    import qwenlm

    data = recipe(
        tmp_path, method="full", data={"packing": True}, train={"steps": 4}, checkpoint={"every": 2}
    )
    train(recipe_from_dict(data))
    out = Path(data["out"])
    final, ckpt, base = (
        qwenlm.load(p) for p in (out, out / "checkpoints" / "step-00000004", data["model"])
    )
    ids = final.encode_chat([{"role": "user", "content": "say hello"}])
    # the last checkpoint holds the final weights: the same logits; training moved them by far
    # more than float32 noise (1e-3 is ~100x)
    torch.testing.assert_close(final.logits(ids), ckpt.logits(ids), rtol=0, atol=0)
    assert not torch.allclose(final.logits(ids), base.logits(ids), atol=1e-3)
    assert final.encode_chat([{"role": "user", "content": "hi"}]) == base.encode_chat(
        [{"role": "user", "content": "hi"}]
    )
