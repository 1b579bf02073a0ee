"""Upcycling a dense model into a mixture of experts (the Qwen2 report's recipe)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    assert_float32_close,
    random_state_dict,
    tiny_config,
    write_tiny_hf_folder,
)

import qwenlm
from qwenlm.cli import main as cli_main
from qwenlm.errors import CheckpointError
from qwenlm.models import build_model
from qwenlm.models.qwen2_moe import SparseMoeBlock
from qwenlm.models.upcycle import UpcycleSpec, ffn_copies, upcycle_ffn, upcycle_tensors


def moe_of(spec: UpcycleSpec, config=None, sd=None):
    config = config or tiny_config()
    sd = sd if sd is not None else random_state_dict(config, std=0.1)
    moe, tensors = upcycle_tensors(config, sd.items(), spec)
    return moe, dict(tensors), sd


@pytest.mark.parametrize(
    "n, size, copies", [(8, 24, 2), (6, 32, 2), (5, 40, 3), (12, 96, 12), (3, 10, 1)]
)
def test_number_of_ffn_copies_follows_the_formula(n, size, copies):
    assert ffn_copies(n, size, 96) == copies == math.ceil(n * size / 96)
    spec = UpcycleSpec(num_experts=n, moe_intermediate_size=size, reinit_fraction=0.0)
    _moe, t, sd = moe_of(spec)
    dense = sd["model.layers.0.mlp.gate_proj.weight"]
    # every expert unit is a row of the dense FFN, and copy c holds each dense unit once
    rows = [t[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] for e in range(n)]
    units = torch.cat(rows)
    match = (units[:, None, :] == dense[None, :, :]).all(-1)  # (n * size, 96)
    assert bool((match.sum(1) == 1).all())
    which = match.float().argmax(1)
    for c in range(copies):
        part = which[c * 96 : (c + 1) * 96]
        if len(part) == 96:
            assert sorted(part.tolist()) == list(range(96))


def test_experts_are_permutation_consistent_slices_of_the_dense_ffn():
    spec = UpcycleSpec(num_experts=8, moe_intermediate_size=24, reinit_fraction=0.0, seed=3)
    _moe, t, sd = moe_of(spec)
    p = "model.layers.1.mlp."
    gate, up, down = (sd[p + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))

    def ffn(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor, dtype=torch.float32):
        g, u, d, h = (a.to(dtype) for a in (g, u, d, x))
        return torch.nn.functional.silu(h @ g.T) * (h @ u.T) @ d.T

    dense, exact = ffn(gate, up, down), ffn(gate, up, down, torch.float64)

    def expert(e: int) -> torch.Tensor:
        g, u, d = (t[p + f"experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        # gate/up rows and down columns come from the same dense units, in the same order
        idx = (g[:, None, :] == gate[None]).all(-1).float().argmax(1)
        assert torch.equal(u, up[idx]) and torch.equal(d, down[:, idx])
        return ffn(g, u, d)

    per_copy = 96 // 24
    for c in range(ffn_copies(8, 24, 96)):
        total = sum(expert(e) for e in range(c * per_copy, (c + 1) * per_copy))
        # the 96-unit sum split into 4 partial sums of 24: float32 reassociation only
        assert_float32_close(total, dense, exact)
    # shuffled: the copies are different permutations
    assert not torch.equal(t[p + "experts.0.gate_proj.weight"], t[p + "experts.4.gate_proj.weight"])
    # the shared expert is the whole dense FFN, shuffled
    s = [t[p + f"shared_expert.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")]
    assert_float32_close(ffn(*s), dense, exact)  # the units shuffled: reassociation only


def test_half_of_each_expert_is_reinitialised():
    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    sd = random_state_dict(config, std=0.1)
    g = torch.Generator().manual_seed(0)
    moe, _, _ = moe_of(UpcycleSpec(num_experts=4, moe_intermediate_size=64), config, sd)
    p = "model.layers.0.mlp."
    kept = upcycle_ffn(
        *(sd[p + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")),
        moe, UpcycleSpec(reinit_fraction=0.0, seed=5), torch.Generator().manual_seed(5),
    )  # fmt: skip
    fresh = upcycle_ffn(
        *(sd[p + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")),
        moe, UpcycleSpec(reinit_fraction=0.5, seed=5), torch.Generator().manual_seed(5),
    )  # fmt: skip
    del g
    for e in range(4):
        for n in ("gate_proj", "up_proj", "down_proj"):
            a, b = kept[f"experts.{e}.{n}.weight"], fresh[f"experts.{e}.{n}.weight"]
            N = a.numel()  # 64 x 128 = 8192
            frac = (a != b).float().mean().item()
            # binomial: sd = sqrt(0.25 / N) ~ 0.0055; allow 5 sd
            assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / N), (e, n, frac)
            # new values look like the dense matrix (same scale), not zeros
            assert 0.5 < b[a != b].std().item() / a.std().item() < 2


def test_upcycle_cli_model_loads_generates_and_trains(tmp_path):
    write_tiny_hf_folder(tmp_path / "dense", std=0.1)  # FFN width 96
    rc = cli_main(
        ["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"),
         "--experts", "8", "--top-k", "2", "--expert-size", "24", "--sparse-step", "1",
         "--seed", "1"]
    )  # fmt: skip
    assert rc == 0
    m = qwenlm.load(tmp_path / "moe", quant="none", device="cpu")
    assert m.config.model_type == "qwen2_moe" and m.config.num_experts == 8
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in m.model.model.layers)
    assert isinstance(m.generate("hello", max_new_tokens=5, temperature=0, ignore_eos=True), str)
    # the same seed gives the same model
    cli_main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe2"), "--experts", "8",
              "--top-k", "2", "--expert-size", "24", "--seed", "1"])  # fmt: skip
    m2 = qwenlm.load(tmp_path / "moe2", quant="none", device="cpu")
    assert torch.equal(m.logits([1, 2, 3]), m2.logits([1, 2, 3]))

    # it trains: full fine-tuning with the project's trainer lowers the loss
    from qwenlm.train import train
    from qwenlm.train.recipe import recipe_from_dict

    data = tmp_path / "text.txt"
    data.write_text("hello world hello world ing ing hello\n" * 200)
    r = recipe_from_dict(
        {
            "out": str(tmp_path / "run"),
            "model": str(tmp_path / "moe"),
            "task": "pretrain",
            "method": "full",
            "data": {"train": [str(data)], "max_seq_len": 32},
            "optim": {"lr": 3e-3},
            "schedule": {"warmup_steps": 0, "min_lr_ratio": 1.0},
            "train": {"steps": 12, "micro_batch_size": 4},
            "log": {"progress": False, "plot": False},
        }
    )
    result = train(r)
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x["loss"] for x in logs if x.get("kind") == "train"]
    assert steps[-1] < steps[0]
    assert result.step == 12
    trained = qwenlm.load(tmp_path / "run", quant="none", device="cpu")
    assert trained.config.model_type == "qwen2_moe"


def test_bad_upcycle_settings_are_one_clear_error():
    with pytest.raises(CheckpointError, match="reinit_fraction must be in"):
        UpcycleSpec(reinit_fraction=1.5)
    with pytest.raises(CheckpointError, match="experts per token"):
        UpcycleSpec(num_experts=2, num_experts_per_tok=3)
    moe, t, _ = moe_of(UpcycleSpec(num_experts=4))
    with pytest.raises(CheckpointError, match="already"):
        upcycle_tensors(moe, t.items(), UpcycleSpec())
    build_model(moe, t.items())  # builds with every tensor in place
