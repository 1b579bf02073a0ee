"""Tensor and data parallelism on two CPU processes (gloo) against one process.

The logits of a full forward pass and of the engine (prefill, ragged decode batches, forks,
trimmed drafts, a scheduler sampling n=2 choices with prompt-lookup speculation) equal the
one-process numbers to 1e-5 on tiny Qwen2, Qwen3 (bias on o_proj), replicated-KV, Qwen1-style
(dynamic NTK) and Qwen2-MoE configs. The only difference two ranks make is the order in which
partial sums are added (an all-reduce per block half), a few float32 ulps per layer.

Under torchrun: ``qwenlm eval`` (tensor- and data-parallel, resumed across process counts)
writes the records of one process, ``qwenlm serve --tensor-parallel 2`` answers the openai
client with one process's text, and ``qwenlm generate`` on the real 0.5B gives its greedy
tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_VOCAB, random_state_dict, tiny_config, write_hf_tokenizer
from safetensors.torch import load_file, save_file
from serve_helpers import free_port

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
    # one KV head for two ranks: replicated; an odd vocabulary: the last slice is padded; an
    # odd MLP size: unequal slices
    "kv-replicated": tiny_config(
        num_key_value_heads=1, vocab_size=TINY_VOCAB - 3, intermediate_size=95
    ),
    # dynamic NTK's factor travels with each step; LogN scaling
    "qwen1-style": tiny_config(use_dynamic_ntk=True, use_logn_attn=True, seq_length=24),
    "qwen2-moe": tiny_config(
        model_type="qwen2_moe",
        num_hidden_layers=3,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=47,
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
    # hidden states instead of logits (embeddings): no output head on any rank
    (out["hidden"],) = engine.forward([(c, [1, 2, 3])], all_logits=True, hidden=True)
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
            c = CONFIGS[name]
            assert value.shape[-1] == (c.hidden_size if key == "hidden" else c.vocab_size)
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


# -- the command line under torchrun ----------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [*TORCHRUN, "-m", "qwenlm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(max_position_embeddings=1024)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    save_file(random_state_dict(cfg, std=0.1), str(folder / "model.safetensors"))
    write_hf_tokenizer(folder)
    return folder


def test_eval_over_two_processes_gives_the_records_of_one(tiny_folder, tmp_path):
    rows = [
        {"question": f"What is {i} plus {i + 1}?", "answer": f"#### {2 * i + 1}"} for i in range(23)
    ]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--task", "gsm8k", "--data", str(data), "--shots", "0", "--max-new-tokens", "6"]
    common += ["--quant", "none"]
    common += ["--batch-size", "3", "--no-progress", "--json", str(tiny_folder)]

    def records(out: Path) -> list[dict]:
        lines = (out / "records.jsonl").read_text().splitlines()
        return sorted((json.loads(line) for line in lines), key=lambda r: int(r["id"]))

    from qwenlm.cli import main

    assert main(["eval", *common, "--limit", "20", "-o", str(tmp_path / "one")]) == 0
    want = records(tmp_path / "one")
    assert len(want) == 20
    # tensor parallel, stopped after 7 samples: rank 0 evaluates, rank 1 mirrors its passes
    out = tmp_path / "two"
    torchrun("eval", *common, "--limit", "7", "--tensor-parallel", "2", "-o", str(out))
    assert records(out) == want[:7]
    # data parallel, resuming that run: 13 samples left, shared 7 / 6 over the ranks
    r = torchrun("eval", *common, "--limit", "20", "-o", str(out))
    assert records(out) == want
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert summary["samples"] == 20
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((out / "summary.json").read_text())
    assert two["metrics"] == one["metrics"]


def test_serve_tensor_parallel_answers_the_openai_client(tiny_folder, tmp_path):
    import openai

    import qwenlm

    port = free_port()
    log = tmp_path / "serve.log"
    options = ["--tensor-parallel", "2", "--quant", "none", "--port", str(port)]
    with log.open("w") as f:
        proc = subprocess.Popen(
            [*TORCHRUN, "-m", "qwenlm", "serve", str(tiny_folder), *options],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120
        )
        deadline = time.monotonic() + 240
        while True:
            try:
                name = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(1)
        messages = [{"role": "user", "content": "hello world"}]
        r = client.chat.completions.create(
            model=name, messages=messages, max_tokens=10, temperature=0
        )
        stream = client.chat.completions.create(
            model=name, messages=messages, max_tokens=10, temperature=0, n=2, stream=True
        )
        texts = ["", ""]
        for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    one = qwenlm.load(tiny_folder, quant="none")
    want = "".join(c.text for c in one.chat_chunks(messages, max_new_tokens=10, temperature=0))
    assert r.choices[0].message.content == want and r.usage.completion_tokens == 10
    assert texts == [want, want]


@pytest.mark.real_model
def test_real_model_greedy_tokens_equal_one_process(real_model, real_model_path):
    # quant none (float32 PyTorch layers) on both sides: the same kernels (one process never
    # takes the fused native decode layer here), so only the all-reduce order differs
    prompt = "Write a Python function that checks whether a number is prime."
    want = real_model.generate(
        real_model.encode_chat([{"role": "user", "content": prompt}]),
        max_new_tokens=32,
        temperature=0,
        repetition_penalty=1.0,
        ignore_eos=True,
    )
    r = torchrun(
        "generate", prompt, "-m", str(real_model_path), "--tensor-parallel", "2",
        "--quant", "none", "--dtype", "float32", "--greedy", "--max-new-tokens", "32",
        "--ignore-eos", "--repetition-penalty", "1.0",
        timeout=900,
    )  # fmt: skip
    assert r.stdout == want + "\n"


def test_commands_refuse_what_cannot_run_split(tiny_folder, monkeypatch, capsys):
    from qwenlm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: one process would do it all twice
    assert main(["generate", "hi", "-m", str(tiny_folder), "--quant", "none"]) == 1
    err = capsys.readouterr().err
    assert "torchrun started 2" in err and "add --tensor-parallel 2" in err
    ppl = ROOT / "tests" / "data" / "eval" / "ppl.txt"
    args = ["eval", str(tiny_folder), "--task", "perplexity", "--data", str(ppl)]
    assert main([*args, "--tensor-parallel", "2"]) == 1
    assert "perplexity scores with the model outside the engine" in capsys.readouterr().err
    args = ["generate", "hi", "-m", str(tiny_folder), "--draft", str(tiny_folder)]
    assert main([*args, "--tensor-parallel", "2"]) == 1
    assert "--draft does not combine with --tensor-parallel" in capsys.readouterr().err
