"""Scoring prompts: the scheduler's prompt_logprobs requests and /v1/completions ``echo``, plus
vLLM's /tokenize, /detokenize and /tokenizer_info, on a tiny random model.

A prompt's token logprobs must be the log-softmax of the logits ``Qwen.logits`` gives for the
same ids (the same prefill), laid out as lm-evaluation-harness's ``local-completions`` reads
them: ``tokens``, ``token_logprobs`` (the first null), ``top_logprobs``, ``text_offset``.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")

import httpx
import torch
from helpers import tiny_config, tiny_model, tiny_template, tiny_tokenizer
from serve_helpers import LiveServer

from qwenlm.api import Qwen
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.scheduler import Output, Request, Scheduler
from qwenlm.serve import ServeConfig

KEY = "sk-scoring"


@pytest.fixture(scope="module")
def qwen():
    model = tiny_model(tiny_config(num_hidden_layers=2), std=0.1).eval()
    return Qwen(model, tiny_tokenizer(), tiny_template(), name="tiny")


@pytest.fixture(scope="module")
def server(qwen):
    with LiveServer(qwen, ServeConfig(api_key=KEY, prefill_chunk=32)) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def reference(qwen, ids, top=0):
    """(logprob of each token after the first, top alternatives) from Qwen.logits."""
    lp = torch.log_softmax(qwen.logits(ids)[:-1], -1)
    chosen = [float(lp[i, t]) for i, t in enumerate(ids[1:])]
    tops = [torch.topk(row, top) for row in lp] if top else []
    return chosen, tops


def test_scheduler_scores_a_prompt_across_prefill_pieces(qwen):
    engine = qwen.engine
    engine.prefill_chunk = 32
    ids = qwen.tokenizer.encode("hello world, hello worlds; in the beginning " * 4)
    assert len(ids) > 64  # three prefill pieces
    want, tops = reference(qwen, ids, top=3)
    outs: list[Output] = []
    req = Request(
        ids, GenerationConfig(max_new_tokens=1), outs.append, n=2, prompt_logprobs=3, generate=False
    )
    Scheduler(engine, qwen.tokenizer).run([req])
    assert [o.index for o in outs] == [0, 1] and all(o.finish_reason == "length" for o in outs)
    got = outs[0].prompt_logprobs
    assert [lp.token for lp in got] == ids[1:]
    assert [lp.logprob for lp in got] == want  # the same prefill: the same numbers
    for lp, (values, idx) in zip(got, tops, strict=True):
        assert [t for t, _ in lp.top] == idx.tolist()
        assert [v for _, v in lp.top] == values.tolist()


def test_scoring_then_generating_continues_from_the_prompt(qwen):
    ids = qwen.tokenizer.encode("hello world")
    config = GenerationConfig(max_new_tokens=5, temperature=0, ignore_eos=True)
    outs: list[Output] = []
    Scheduler(qwen.engine, qwen.tokenizer).run(
        [Request(ids, config, outs.append, prompt_logprobs=0)]
    )
    assert outs[0].prompt_logprobs is not None and outs[0].finish_reason is None
    tokens = [t for o in outs for t in o.token_ids]
    plain = qwen.generate(ids, max_new_tokens=5, temperature=0, ignore_eos=True)
    assert len(tokens) == 5 and qwen.tokenizer.decode(tokens) == plain


def test_echo_logprobs_max_tokens_0_as_lm_eval_reads_them(client, qwen):
    text = "hello world in the world"
    ids = qwen.tokenizer.encode(text)
    want, _ = reference(qwen, ids, top=2)
    body = {"model": "tiny", "prompt": text, "echo": True, "logprobs": 2, "max_tokens": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == [qwen.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-6)
    for top, value in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True):
        # two alternatives (fewer when they read alike), the likeliest first
        assert 1 <= len(top) <= 2 and max(top.values()) >= value - 1e-6
    assert lp["text_offset"] == [len(qwen.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_a_generated_token_and_token_id_prompts(client, qwen):
    ids = qwen.tokenizer.encode("hello world")
    # lm-eval's own request: the prompt as ids, echo, one generated token, logprobs 1
    body = {
        "model": "tiny",
        "prompt": [ids, ids[:2]],
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0,
    }
    choices = client.post("/v1/completions", json=body).json()["choices"]
    for choice, p in zip(choices, [ids, ids[:2]], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(p) + 1
        assert choice["text"].startswith(qwen.tokenizer.decode(p))
        assert lp["token_logprobs"][1 : len(p)] == pytest.approx(reference(qwen, p)[0], abs=1e-6)
        assert max(lp["top_logprobs"][-1].values()) == pytest.approx(lp["token_logprobs"][-1])


def test_echo_streams_the_prompt_first(client):
    body = {
        "model": "tiny",
        "prompt": "hello",
        "echo": True,
        "max_tokens": 3,
        "temperature": 0,
        "ignore_eos": True,
    }
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
    assert chunks[0].startswith("hello") and "".join(chunks) == plain


def test_echo_without_logprobs_and_limits(client):
    r = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hi", "echo": True, "max_tokens": 0}
    )
    assert r.json()["choices"][0]["text"] == "hi" and r.json()["choices"][0]["logprobs"] is None
    bad = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": "yes"}, "echo"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
    ]
    for extra, param in bad:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    ok = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "hi", "logprobs": 20, "max_tokens": 1}
    )
    assert 5 < len(ok.json()["choices"][0]["logprobs"]["top_logprobs"][0]) <= 20  # vLLM's limit


def test_tokenizer_routes(client, qwen, server):
    r = client.post("/tokenize", json={"prompt": "hello <|im_end|>", "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert ids == qwen.tokenizer.encode("hello <|im_end|>")  # text stays text
    assert r.json()["count"] == len(ids) and r.json()["max_model_len"] == 512
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.json() == {"prompt": "hello <|im_end|>"}
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["tokens"] == qwen.encode_chat([{"role": "user", "content": "hi"}])
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "im_start" in info["chat_template"]
    for path, body in [
        ("/tokenize", {}),
        ("/detokenize", {"tokens": [10**6]}),
        ("/tokenize", {"prompt": "a", "model": "nope"}),
    ]:
        assert client.post(path, json=body).status_code in (400, 404)
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # the key, as everywhere
