"""Tensor parallelism on two CPU processes (gloo) against one process.

The logits of a full forward pass and of the engine (prefill, ragged decode batches, forks,
trimmed drafts, a scheduler sampling n=2 choices with prompt-lookup speculation) equal the
one-process numbers to 1e-5 on tiny Qwen2, Qwen3 (bias on o_proj), replicated-KV, Qwen1-style
(dynamic NTK) and Qwen2-MoE configs. The only difference two ranks make is the order in which
partial sums are added (an all-reduce per block half), a few float32 ulps per layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_VOCAB, tiny_config
from safetensors.torch import load_file, save_file

from qwenlm.config import ModelConfig
from qwenlm.errors import QwenlmError
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.engine import Engine
from qwenlm.generation.scheduler import Request, Scheduler
from qwenlm.generation.speculative import Speculation
from qwenlm.models import model_class
from qwenlm.parallel import DistributedError, split_heads

CONFIGS = {
    "qwen2": tiny_config(),
    # o_proj with a bias (added once, after the sum), q/k norms; one KV head per rank
    "qwen3": tiny_config(model_type="qwen3", attention_bias=True),
    # one KV head for two ranks: replicated; an odd vocabulary: the last slice is padded
    "kv-replicated": tiny_config(num_key_value_heads=1, vocab_size=TINY_VOCAB - 3),
    # dynamic NTK's factor travels with each step; LogN scaling
    "qwen1-style": tiny_config(use_dynamic_ntk=True, use_logn_attn=True, seq_length=24),
    "qwen2-moe": tiny_config(
        model_type="qwen2_moe",
        num_hidden_layers=3,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=1,
        mlp_only_layers=(1,),
        tie_word_embeddings=True,
    ),
}
PROMPT = [(7 * i + 3) % 300 for i in range(40)]


def random_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_class(config)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def workload(engine: Engine) -> dict[str, torch.Tensor]:
    """Logits and tokens of everything the scheduler asks of an engine (same on any rank count)."""
    out = {}
    a = engine.new_sequence()
    out["prefill"] = engine.prefill(a, PROMPT, all_logits=True)
    b = engine.fork(a)
    # a ragged batch: two segments of different lengths, one sequence forked from the other
    la, lb = engine.forward([(a, [5, 6, 7]), (b, [9])], all_logits=[True, False])
    out["ragged_a"], out["ragged_b"] = la, lb
    a.trim(2)  # rejected drafts
    (out["after_trim"],) = engine.forward([(a, [11, 12])], all_logits=True)
    del b  # freed on the followers with the next step
    c = engine.new_sequence()
    out["second"] = engine.prefill(c, PROMPT[:17])
    tokens = []
    sched = Scheduler(engine, None, max_num_seqs=4)
    config = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=0, top_p=1.0, seed=3)
    requests = [
        Request(PROMPT[:30], config, tokens.append, n=2, speculation=Speculation(num_draft=3)),
        Request(PROMPT[5:25], config.replace(temperature=0.0), tokens.append),
    ]
    sched.run(requests)
    ids = sorted((o.index, o.token_ids) for o in tokens if o.token_ids)
    out["sampled"] = torch.tensor([t for _, ts in ids for t in ts])
    return out


def full_forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT]))[0]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from qwenlm.generation.mirror import parallel_engine
    from qwenlm.parallel import setup, tensor_parallel

    d = setup(device="cpu")
    for name, config in CONFIGS.items():
        model = tensor_parallel(random_model(config))
        results = {"full": full_forward(model)}
        engine = parallel_engine(model)
        if rank == 0:
            results.update(workload(engine))
            engine.close()
            save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/{name}.st")
        else:
            engine.follow()
    d.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_give_the_logits_of_one_process(two_ranks, name):
    model = random_model(CONFIGS[name])
    want = {"full": full_forward(model), **workload(Engine(model))}
    got = load_file(str(two_ranks / f"{name}.st"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "sampled":
            assert torch.equal(got[key], value), key
        else:
            assert value.shape[-1] == CONFIGS[name].vocab_size
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_head_split_rules():
    c = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    assert split_heads(c, 2) == (4, 1)  # split
    assert split_heads(c, 4) == (2, 1)  # replicated: each KV head on 2 ranks
    assert split_heads(c, 8) == (1, 1)
    with pytest.raises(DistributedError, match="divisor of the model's 8 attention heads"):
        split_heads(c, 3)
    c = dataclasses.replace(c, num_attention_heads=12, num_key_value_heads=4, hidden_size=96)
    with pytest.raises(DistributedError, match="neither split nor replicated"):
        split_heads(c, 6)


def test_tensor_parallel_without_torchrun_is_one_clear_error(tmp_path):
    import qwenlm

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    with pytest.raises(QwenlmError, match="needs 2 processes") as e:
        qwenlm.load(tmp_path, tensor_parallel=2)
    assert "torchrun --nproc-per-node 2" in e.value.hint
