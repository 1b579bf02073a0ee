"""Embeddings: the pooling against a plain forward pass, batching, the engine-thread calls, and
``/v1/embeddings`` and ``/api/embed`` on a tiny model (the real model's quality check is in
tests/test_serve_real.py).
"""

from __future__ import annotations

import base64
import struct
import threading

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")

import httpx
import torch
from helpers import (
    assert_float32_close,
    float64_logits,
    tiny_config,
    tiny_model,
    tiny_template,
    tiny_tokenizer,
)
from serve_helpers import LiveServer, serving_qwen

from qwenlm.api import Qwen
from qwenlm.errors import GenerationError
from qwenlm.generation.embed import Embedder
from qwenlm.generation.engine import Engine
from qwenlm.generation.scheduler import EngineFailed, Scheduler
from qwenlm.serve import ServeConfig

TEXTS = ["hello world", "the cat sat on the mat", "a", "x = 1\nprint(x)" * 9]


def test_pooling_is_the_mean_of_the_final_hidden_states():
    model = tiny_model(tiny_config(num_hidden_layers=2))
    qwen = Qwen(model, tiny_tokenizer(), tiny_template())
    qwen.engine.prefill_chunk = 32  # the long text crosses two piece boundaries
    tok = qwen.tokenizer
    assert len(tok.encode(TEXTS[3])) > 64
    got = qwen.embed(TEXTS)
    assert got.shape == (len(TEXTS), model.config.hidden_size) and got.dtype == torch.float32
    for text, row in zip(TEXTS, got, strict=True):
        with torch.no_grad():
            h = model.model(torch.tensor([tok.encode(text)]))[0]  # (T, hidden), one plain pass
        want = torch.nn.functional.normalize(h.mean(0), dim=0)
        # pieces of 32 tokens sum in another order than one pass: float32 noise vs float64
        h64 = float64_logits(model.model, torch.tensor([tok.encode(text)]))[0]
        assert_float32_close(row, want, torch.nn.functional.normalize(h64.mean(0), dim=0))
    # unit vectors, up to float32 rounding of the norm (allclose's rtol 1e-5 is ~80 ulps)
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)))


def test_batched_equals_one_by_one_and_repeats_exactly():
    qwen = serving_qwen()  # int8 kernels: up to 16 rows per pass take another path than more
    batch = qwen.embed(TEXTS)
    assert torch.equal(batch, qwen.embed(TEXTS))
    alone = torch.cat([qwen.embed(t) for t in TEXTS])
    assert torch.equal(batch, alone)
    ids = [qwen.tokenizer.encode(t) for t in TEXTS]
    assert torch.equal(qwen.embed(ids), batch)  # token ids or text: the same


def test_embedder_runs_many_inputs_in_few_passes_and_checks_its_inputs():
    qwen = serving_qwen()
    embedder = qwen.embedder(["a b"] * 40)  # 3 tokens each
    steps = 1
    while not embedder.step():
        steps += 1
    assert steps == 8  # five per pass: at most 16 rows, each computed on its own
    with pytest.raises(GenerationError, match="empty"):
        Embedder(qwen.engine, [[1], []])
    with pytest.raises(GenerationError, match="context"):
        Embedder(qwen.engine, [[1] * 600])
    with pytest.raises(GenerationError, match="token ids"):
        Embedder(qwen.engine, [[10**6]])


def test_scheduler_calls_run_on_the_engine_thread_between_steps():
    qwen = serving_qwen()
    scheduler = Scheduler(Engine(qwen.model), qwen.tokenizer)
    scheduler.start()
    try:
        assert scheduler.call(lambda: threading.current_thread().name).result(30) == (
            "qwenlm-engine"
        )
        failing = scheduler.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(30)
        assert scheduler.alive  # the caller's error, not the engine's
    finally:
        scheduler.stop()
    waiting = scheduler.call(lambda: 1)  # no loop runs it any more
    scheduler._fail_all("stopped")
    with pytest.raises(EngineFailed):
        waiting.result(1)


# -- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with (
        LiveServer(serving_qwen(), ServeConfig(prefill_chunk=32, max_model_len=256)) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        yield c


def vectors(client, **body):
    r = client.post("/v1/embeddings", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_v1_embeddings_shape_formats_and_usage(client):
    tok = tiny_tokenizer()
    body = vectors(client, input=TEXTS)
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    n = sum(len(tok.encode(t)) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    floats = [d["embedding"] for d in body["data"]]
    for v in floats:
        assert len(v) == 64 and abs(sum(x * x for x in v) - 1) < 1e-5
    b64 = vectors(client, input=TEXTS, encoding_format="base64")["data"]
    for d, v in zip(b64, floats, strict=True):
        raw = base64.b64decode(d["embedding"])
        # the same float32 values, one set through JSON text: within a float32 ulp (6e-8 at 1)
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(v, abs=1e-7)
    assert vectors(client, input=TEXTS)["data"] == body["data"]  # deterministic
    one = vectors(client, input=TEXTS[1])["data"][0]["embedding"]
    # alone or in a batch of four: float32 noise of a unit vector's entries, well under 1e-5
    assert one == pytest.approx(floats[1], abs=1e-5)
    ids = [tok.encode(t) for t in TEXTS[:2]]
    assert vectors(client, input=ids)["data"] == vectors(client, input=TEXTS[:2])["data"]
    assert vectors(client, input=ids[0])["data"][0] == body["data"][0]
    assert vectors(client, input=TEXTS[0], dimensions=64)["data"][0] == body["data"][0]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [[1, 2], [10**6]]}, "input[1]"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "a", "dimensions": 32}, "dimensions"),
        ({"input": "a " * 300}, "input"),  # past --max-model-len 256
        ({"input": ["a"] * 2049}, "input"),
        ({}, "input"),
    ],
)
def test_v1_embeddings_errors(client, body, param):
    r = client.post("/v1/embeddings", json={"model": "tiny", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404(client):
    r = client.post("/v1/embeddings", json={"model": "gpt", "input": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_ollama_embed_routes(client):
    want = vectors(client, input=TEXTS[:2])["data"]
    r = client.post("/api/embed", json={"model": "tiny", "input": TEXTS[:2]}).json()
    assert r["embeddings"] == [d["embedding"] for d in want] and r["prompt_eval_count"] > 0
    r = client.post("/api/embeddings", json={"model": "tiny", "prompt": TEXTS[0]}).json()
    assert r["embedding"] == want[0]["embedding"]
    assert client.post("/api/embed", json={"model": "tiny", "input": []}).json() == {
        "model": "tiny",
        "embeddings": [],
    }
    # Ollama truncates at the context by default; truncate: false refuses instead
    long = "a " * 300
    cut = client.post("/api/embed", json={"model": "tiny", "input": long})
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] == 256
    r = client.post("/api/embed", json={"model": "tiny", "input": long, "truncate": False})
    assert r.status_code == 400 and "context length" in r.json()["error"]


def test_embeddings_run_beside_a_stream(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True, "ignore_eos": True}
    ) as stream:
        vectors(client, input=TEXTS * 10)  # while the stream decodes
        text = "".join(stream.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
