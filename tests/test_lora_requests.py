"""LoRA adapters chosen per request (lora.AdapterRouter, the server's --lora) on a tiny model.

Two PEFT adapters (different ranks and target modules) served beside the base: a request naming
one gets the logits of the model with that adapter merged, within float rounding (merged
weights W + s*B@A against W x + s*B(A x): 1e-4 on logits of size ~1); rows of different
adapters share forward passes; base rows stay bit for bit those of the model with no adapter
loaded (they keep the native decode path); the prefix cache never hands one adapter's keys to
another. Through the server: /v1/models lists the adapters, requests for each (in one batch)
equal a server started with ``--adapter`` alone, and adapters load and unload at run time.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_model, tiny_template, tiny_tokenizer

from qwenlm.api import Qwen
from qwenlm.generation.config import GenerationConfig
from qwenlm.generation.fastpath import accelerate
from qwenlm.generation.scheduler import Output, Request, Scheduler
from qwenlm.lora import (
    AdapterError,
    AdapterLinear,
    adapter_config,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from qwenlm.quant import quantize

TOL = 1e-4
TOK = tiny_tokenizer()


def base_float():
    return tiny_model(tiny_config(intermediate_size=128, num_hidden_layers=2), std=0.1).eval()


def served(model) -> Qwen:
    """As `qwenlm.load` prepares a model for the CPU: f32 kernels, fused, native layers."""
    model = quantize(model, "f32")
    model.fuse_projections()
    accelerate(model)
    return Qwen(model, TOK, tiny_template(), name="tiny")


def write_adapter(folder: Path, targets, r: int, seed: int) -> Path:
    model = base_float()
    apply_lora(model, target_modules=targets, r=r, alpha=2.0 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return save_adapter(folder, adapter_config(model), lora_state_dict(model))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": write_adapter(
            root / "alpha",
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            4,
            1,
        ),
        "beta": write_adapter(root / "beta", ("q_proj", "v_proj", "down_proj"), 2, 2),
    }


def merged(folder: Path) -> Qwen:
    model = base_float()
    load_adapter(model, folder)
    return served(merge_lora(model))


@pytest.fixture(scope="module")
def multi(adapters):
    qwen = served(base_float())
    router = qwen.enable_adapters()
    loaded = {name: router.load(name, path) for name, path in adapters.items()}
    return qwen, loaded


def run(qwen, jobs, prefill_chunk=512):
    """Greedy completions with logprobs, all submitted together: {label: (tokens, logprobs)}."""
    qwen.engine.prefill_chunk = prefill_chunk
    outs: dict[str, list[Output]] = {label: [] for label, _, _ in jobs}
    config = GenerationConfig(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=True)
    requests = [
        Request(TOK.encode(prompt), config, outs[label].append, adapter=adapter)
        for label, prompt, adapter in jobs
    ]
    Scheduler(qwen.engine, TOK).run(requests)
    return {
        label: (
            [t for o in out for t in o.token_ids],
            [lp.logprob for o in out for lp in o.logprobs or []],
        )
        for label, out in outs.items()
    }


def test_each_request_gets_its_adapter_and_base_rows_stay_exact(multi, adapters):
    qwen, loaded = multi
    prompt = "hello world in the world"
    seen: list[set[str | None]] = []
    layer = next(m for m in qwen.model.modules() if isinstance(m, AdapterLinear))
    router = qwen.engine.adapters

    def spy(module, args):
        rows = args[0].reshape(-1, module.in_features).shape[0]
        covered = sum(len(r) for _, r in router.groups)
        assert covered in (0, rows)  # a forward is all base rows or all adapter rows
        seen.append({a.name for a, _ in router.groups})

    hook = layer.register_forward_pre_hook(spy)
    try:
        got = run(
            qwen,
            [
                ("base", prompt, None),
                ("alpha", prompt, loaded["alpha"]),
                ("beta", prompt, loaded["beta"]),
            ],
        )
    finally:
        hook.remove()
    assert {"alpha", "beta"} in seen  # two adapters in one forward pass
    plain = run(served(base_float()), [("base", prompt, None)])["base"]
    assert got["base"] == plain  # bit for bit: tokens and logprobs
    for name in ("alpha", "beta"):
        want = run(merged(adapters[name]), [(name, prompt, None)])[name]
        assert got[name][0] == want[0]
        assert got[name][1] == pytest.approx(want[1], abs=TOL)
        assert got[name][1] != pytest.approx(plain[1], abs=1e-2)  # the adapter does something


def test_prompt_scoring_with_an_adapter_matches_the_merged_model(multi, adapters):
    qwen, loaded = multi
    ids = TOK.encode("in the beginning hello world " * 3)
    outs: list[Output] = []
    req = Request(
        ids,
        GenerationConfig(),
        outs.append,
        prompt_logprobs=0,
        generate=False,
        adapter=loaded["beta"],
    )
    Scheduler(qwen.engine, TOK).run([req])
    want = torch.log_softmax(merged(adapters["beta"]).logits(ids)[:-1], -1)
    want = [float(want[i, t]) for i, t in enumerate(ids[1:])]
    assert [lp.logprob for lp in outs[0].prompt_logprobs] == pytest.approx(want, abs=TOL)


def test_prefix_cache_is_kept_apart_per_adapter(multi, adapters):
    qwen, loaded = multi
    prompt = "hello world, in the beginning " * 4  # > 2 prefill pieces of 32
    scheduler_runs = [("alpha", prompt, loaded["alpha"]), ("beta", prompt, loaded["beta"])]
    qwen.engine.prefill_chunk = 32
    outs: dict[str, list[Output]] = {"alpha": [], "beta": []}
    scheduler = Scheduler(qwen.engine, TOK)
    config = GenerationConfig(max_new_tokens=4, temperature=0, ignore_eos=True, logprobs=True)
    for label, text, adapter in scheduler_runs:  # one after the other: alpha's sequence is cached
        scheduler.run([Request(TOK.encode(text), config, outs[label].append, adapter=adapter)])
    assert scheduler.metrics.prefix_cached_tokens == 0
    scheduler.run(
        [Request(TOK.encode(prompt), config, outs["beta"].append, adapter=loaded["beta"])]
    )
    assert scheduler.metrics.prefix_cached_tokens > 0  # the same adapter does reuse it
    want = run(merged(adapters["beta"]), [("beta", prompt, None)], prefill_chunk=32)["beta"]
    lps = [lp.logprob for o in outs["beta"] for lp in o.logprobs or []]
    assert lps[:4] == pytest.approx(want[1][:4], abs=TOL) and lps[4:] == pytest.approx(
        want[1][:4], abs=TOL
    )


def test_bad_adapters_are_clear_errors(multi, tmp_path, adapters):
    qwen, _ = multi
    router = qwen.engine.adapters
    model = base_float()
    apply_lora(model, target_modules=["lm_head"], r=2)
    head = save_adapter(tmp_path / "head", adapter_config(model), lora_state_dict(model))
    with pytest.raises(AdapterError, match="matches no linear layer"):
        router.load("head", head)
    other = tiny_model(
        tiny_config(hidden_size=32, num_attention_heads=2, intermediate_size=64), std=0.1
    )
    apply_lora(other, target_modules=["q_proj"], r=2)
    wrong = save_adapter(tmp_path / "wrong", adapter_config(other), lora_state_dict(other))
    with pytest.raises(AdapterError, match="different base model"):
        router.load("wrong", wrong)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        (adapters["beta"] / "adapter_config.json").read_text()
    )
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="pickle"):
        router.load("pickled", pickled)


# -- through the server -----------------------------------------------------------------------
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")


def complete(url: str, model: str, key: str | None = None) -> tuple[str, list[float]]:
    body = {
        "model": model,
        "prompt": "hello world",
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def test_server_serves_two_adapters_in_one_batch_like_adapter_alone(adapters, tmp_path):
    from serve_helpers import LiveServer

    from qwenlm.serve import ServeConfig

    key = "sk-lora"
    lora = {name: str(path) for name, path in adapters.items()}
    config = ServeConfig(api_key=key, lora=lora, max_loras=4)
    with LiveServer(served(base_float()), config) as s:
        models = httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "alpha", "beta"]
        assert models["data"][1]["parent"] == "tiny"
        results: dict[str, tuple[str, list[float]]] = {}
        threads = [
            threading.Thread(target=lambda m=m: results.__setitem__(m, complete(s.url, m, key)))
            for m in ("alpha", "beta", "tiny")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # run time: load a third adapter, use it, unload it
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(
            s.url + "/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": lora["beta"]}
        )
        assert r.status_code == 401  # the key, like every route
        r = httpx.post(
            s.url + "/v1/load_lora_adapter",
            json={"lora_name": "gamma", "lora_path": lora["beta"]},
            headers=auth,
        )
        assert r.status_code == 200, r.text
        gamma = complete(s.url, "gamma", key)  # the same files as beta: beta's reply
        assert gamma[0] == results["beta"][0]
        assert gamma[1] == pytest.approx(results["beta"][1], abs=TOL)
        bad = [
            ({"lora_name": "gamma", "lora_path": lora["beta"]}, "already been loaded"),
            ({"lora_name": "delta", "lora_path": str(tmp_path / "missing")}, "not a folder"),
            ({"lora_name": "delta", "lora_path": str(tmp_path)}, "adapter_config.json"),
            ({"lora_name": "delta"}, "lora_path"),
            ({"lora_name": "tiny", "lora_path": lora["beta"]}, "differ from the base"),
            ({"lora_name": "delta", "lora_path": lora["alpha"]}, None),  # the fourth: fine
            ({"lora_name": "epsilon", "lora_path": lora["alpha"]}, "at most 4"),
        ]
        for body, why in bad:
            r = httpx.post(s.url + "/v1/load_lora_adapter", json=body, headers=auth)
            if why is None:
                assert r.status_code == 200, r.text
                continue
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=auth)
        assert r.status_code == 200
        r = httpx.post(
            s.url + "/v1/completions", json={"model": "gamma", "prompt": "x"}, headers=auth
        )
        assert r.status_code == 404
        r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=auth)
        assert r.status_code == 404
    for name in ("alpha", "beta"):  # each as `qwenlm serve --adapter PATH` serves it
        with LiveServer(merged(adapters[name]), ServeConfig()) as s:
            text, lps = complete(s.url, "tiny")
        assert results[name][0] == text
        assert results[name][1] == pytest.approx(lps, abs=TOL)
    with LiveServer(served(base_float()), ServeConfig()) as s:
        assert complete(s.url, "tiny") == results["tiny"]  # the base, exactly


def test_runtime_loading_is_off_unless_enabled(adapters):
    from serve_helpers import LiveServer

    from qwenlm.serve import ServeConfig

    with LiveServer(served(base_float()), ServeConfig()) as s:
        r = httpx.post(
            s.url + "/v1/load_lora_adapter",
            json={"lora_name": "a", "lora_path": str(adapters["beta"])},
        )
        assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
