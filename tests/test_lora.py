"""LoRA as a transform, PEFT's adapter format (checked against PEFT itself), NF4, merging."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import (
    F32_EPS,
    assert_float32_close,
    float64_logits,
    random_ids,
    random_state_dict,
    tiny_config,
    tiny_model,
    write_tiny_gguf,
)
from torch import nn

from qwenlm.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoRALinear,
    adapter_config,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from qwenlm.models import build_model
from qwenlm.quant.nf4 import NF4_CODE, NF4Linear, dequantize_nf4, quantize_model_nf4, quantize_nf4

TARGETS = ("q_proj", "v_proj", "down_proj")


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    # B starts at zero, which would make any parity check trivially true.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_A.weight.copy_(0.3 * torch.randn(m.lora_A.weight.shape, generator=g))
            m.lora_B.weight.copy_(0.3 * torch.randn(m.lora_B.weight.shape, generator=g))


def adapted(seed: int = 0, **kw):
    model = tiny_model()
    names = apply_lora(model, target_modules=TARGETS, r=4, alpha=8, **kw)
    randomize_lora(model, seed)
    return model.eval(), names


def test_new_adapter_leaves_the_model_unchanged_and_only_lora_trains():
    base = tiny_model()
    model = tiny_model()
    names = apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
    assert len(names) == 3 * 2  # two layers
    x = random_ids(20)
    with torch.no_grad():
        # B starts at zero: the adapter adds exact zeros
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)


def test_merge_equals_adapter_and_disable_equals_base():
    base = tiny_model()
    model, _ = adapted()
    x = random_ids(24, seed=3)
    with torch.no_grad():
        with_adapter = model(x)
        exact = float64_logits(model, x)
        with lora_disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # the same float ops
        assert not torch.allclose(with_adapter, base(x), atol=1e-3)  # ~100x float32 noise
        merge_lora(model)
        assert not list(lora_layers(model))
        # W + s*B@A rounds once more than the adapter's two products: float32 noise
        assert_float32_close(model(x), with_adapter, exact)


def test_target_modules_that_match_nothing_are_an_error():
    with pytest.raises(AdapterError, match="match no linear layer") as e:
        apply_lora(tiny_model(), target_modules=["c_attn"])
    assert "q_proj" in e.value.hint


def test_save_and_load_round_trip_in_peft_layout(tmp_path):
    model, _ = adapted(seed=1)
    save_adapter(tmp_path, adapter_config(model, base_model="tiny"), lora_state_dict(model))
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    from safetensors import safe_open

    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    fresh = tiny_model()
    load_adapter(fresh, tmp_path)
    x = random_ids(16)
    with torch.no_grad():
        # the same float32 weights through the same code
        torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_adapter_for_another_model_is_rejected(tmp_path):
    model, _ = adapted()
    save_adapter(tmp_path, adapter_config(model), lora_state_dict(model))
    wider = build_model(
        tiny_config(hidden_size=96), random_state_dict(tiny_config(hidden_size=96)).items()
    )
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(wider, tmp_path)
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        load_adapter(tiny_model(), tmp_path / "nowhere")
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**adapter_config(model), "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(tiny_model(), tmp_path)


def test_peft_loads_our_adapter_and_computes_the_same_logits(tmp_path):
    """Our adapter file in PEFT + transformers gives our logits, adapter on and off."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = tiny_config(num_hidden_layers=2)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if "norm" in name else 0.0))
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    ours = build_model(config, base_state.items())  # the names line up one to one
    apply_lora(ours, target_modules=list(TARGETS), r=4, alpha=12, dropout=0.1)
    randomize_lora(ours, seed=7)
    ours.eval()
    save_adapter(tmp_path, adapter_config(ours), lora_state_dict(ours))

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = random_ids(32, seed=2)
    with torch.no_grad():
        expected, exact = peft_model(x).logits, float64_logits(peft_model, x)
        got = ours(x)
        assert_float32_close(got, expected, exact)
        with peft_model.disable_adapter(), lora_disabled(ours):
            assert_float32_close(ours(x), peft_model(x).logits, float64_logits(peft_model, x))
    # and PEFT's own save loads back into qwenlm with the same result
    peft_dir = tmp_path / "peft-saved"
    peft_model.save_pretrained(str(peft_dir))
    again = build_model(config, base_state.items())
    load_adapter(again, peft_dir)
    with torch.no_grad():
        # PEFT saves the same float32 values: the same logits exactly
        torch.testing.assert_close(again.eval()(x), got, rtol=0, atol=0)


# -- NF4 -----------------------------------------------------------------------------------------
def test_nf4_codebook_values_round_trip_exactly():
    code = torch.tensor(NF4_CODE)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (8, 64), generator=g)
    idx[:, 0] = 15  # every block holds +1 so its absmax is the scale itself
    scale = torch.rand(8, generator=g) + 0.5
    w = code[idx] * scale[:, None]
    packed, absmax = quantize_nf4(w, 64)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2
    # code * scale is recomputed from the same two float32 numbers: bit-exact
    torch.testing.assert_close(dequantize_nf4(packed, absmax, 64).view(8, 64), w, rtol=0, atol=0)


def test_nf4_linear_error_is_small_and_gradients_reach_only_the_input():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    for dq in (False, True):
        q = NF4Linear.from_linear(lin, 64, double_quant=dq)
        w = q.dequantize()
        rel = (w - lin.weight).norm() / lin.weight.norm()
        assert rel < 0.12, rel  # NF4's error on normal-ish weights is about 10%
        x = torch.randn(3, 128, requires_grad=True)
        q(x).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in q.parameters())
    plain, double = NF4Linear.from_linear(lin), NF4Linear.from_linear(lin, double_quant=True)
    # double quantization stores one byte per block scale instead of four, at almost no cost:
    # the same codes (|code| <= 1) times a scale off by at most half an int8 step
    assert double.absmax_q.element_size() == 1
    half_step = (plain.absmax - plain.absmax.mean()).abs().max() / 127 / 2
    rounding = 4 * F32_EPS * plain.absmax.max()  # scale * q + mean in float32
    assert (double.dequantize() - plain.dequantize()).abs().max() <= half_step + rounding


def test_nf4_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32, bias=True)
    for dq in (False, True):
        q = NF4Linear.from_linear(lin, 32, double_quant=dq)
        q.save(tmp_path / "w.safetensors")
        back = NF4Linear.load(tmp_path / "w.safetensors")
        assert (back.in_features, back.out_features, back.block_size) == (64, 32, 32)
        x = torch.randn(2, 64)
        torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)  # the same bytes and code


def test_lora_over_nf4_trains_and_fuses():
    torch.manual_seed(0)
    model = tiny_model()
    quantize_model_nf4(model)
    apply_lora(model, target_modules=TARGETS, r=4, alpha=8)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, NF4Linear)  # quantized, not adapted
    x = random_ids(12)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        before, exact = model(x), float64_logits(model, x)
        merge_lora(model)
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
        # the merged weight is dequantize(W) + s*B@A rounded once: float32 noise
        assert_float32_close(model(x), before, exact)


# -- using adapters: qwenlm.load, the CLI, qwenlm merge --------------------------------------------
@pytest.fixture
def gguf_and_adapter(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    import qwenlm

    base = qwenlm.load(path, quant="none")  # LoRA trains plain float layers
    apply_lora(base.model, target_modules=TARGETS, r=4, alpha=8)
    randomize_lora(base.model, seed=3)
    save_adapter(
        tmp_path / "adapter",
        adapter_config(base.model, base_model=str(path)),
        lora_state_dict(base.model),
    )
    return path, tmp_path / "adapter", base.model.eval()


def build_from(path) -> nn.Module:
    from qwenlm.weights import open_checkpoint

    with open_checkpoint(path) as ckpt:
        return build_model(ckpt.config, ckpt.tensors()).eval()


def test_load_with_adapter_and_merge_command(gguf_and_adapter, tmp_path):
    import qwenlm

    path, adapter, reference = gguf_and_adapter
    x = list(range(5, 40))
    with torch.no_grad():
        expected = reference(torch.tensor([x]))[0]
    exact = float64_logits(reference, torch.tensor([x]))[0]
    merged = tmp_path / "merged"
    r = subprocess.run(
        [sys.executable, "-m", "qwenlm", "merge", "--adapter", str(adapter), "--out", str(merged)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    # The merged folder holds base + adapter: equal to the adapted model up to float rounding.
    with torch.no_grad():
        got = build_from(merged)(torch.tensor([x]))[0]
    assert_float32_close(got, expected, exact)
    # qwenlm.load(adapter=...) folds the adapter in the same way
    loaded, again, base = (
        qwenlm.load(path, adapter=adapter, quant="none"),
        qwenlm.load(merged, quant="none"),
        qwenlm.load(path, quant="none"),
    )
    assert_float32_close(loaded.logits(x), expected, exact)
    assert_float32_close(again.logits(x), expected, exact)
    assert not torch.allclose(loaded.logits(x), base.logits(x), atol=1e-2)  # 1000x float32 noise
    assert again.tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world")
    assert again.encode_chat([{"role": "user", "content": "hi"}]) == loaded.encode_chat(
        [{"role": "user", "content": "hi"}]
    )
    # the merged folder's tokenizer.json is a standard one: the tokenizers library reads it alike
    tokenizers = pytest.importorskip("tokenizers")
    hf_tok = tokenizers.Tokenizer.from_file(str(merged / "tokenizer.json"))
    text = "hello world, 你好 helloing\n\n  wor ld"
    assert hf_tok.encode(text, add_special_tokens=False).ids == again.tokenizer.encode(text)


def test_generate_command_takes_adapter(gguf_and_adapter):
    path, adapter, _ = gguf_and_adapter
    common = ["generate", "hello", "-m", str(path), "--greedy", "--max-new-tokens", "8", "--raw"]
    runs = [
        subprocess.run(
            [sys.executable, "-m", "qwenlm", *common, *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        for extra in ([], ["--adapter", str(adapter)], ["--adapter", str(path.parent / "none")])
    ]
    assert runs[0].returncode == 0 and runs[1].returncode == 0, runs[1].stderr
    assert runs[0].stdout != runs[1].stdout  # the adapter changes what the model says
    assert runs[2].returncode == 1 and "is not a LoRA adapter" in runs[2].stderr
    assert "Traceback" not in runs[2].stderr
