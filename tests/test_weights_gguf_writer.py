"""GGUF export (``qwenlm export`` / ``qwenlm.export_gguf``), checked against llama.cpp itself.

- llama.cpp (llama-cpp-python, or the ik-llama-cpp-python binary wheel) loads the f16 export of
  a tiny model saved as our safetensors folder, alone and with a LoRA adapter merged, and of a
  tiny Qwen2-MoE; it tokenizes 3 prompts like qwenlm and greedy-decodes the same tokens as
  qwenlm on the same file, with logits within float16 activation rounding;
- qwenlm re-loads the export: f32 bit-exact, f16 equal to the source with its matrices rounded
  to float16, q8_0 within the format's per-block error bound;
- the real Qwen vocabulary, merges, token types and chat template round-trip exactly, and
  llama.cpp tokenizes text with them like qwenlm (real_model);
- bad input is a one-line error; a failed export leaves neither the output nor a temporary file.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from helpers import QWEN_TEMPLATE, tiny_config, tiny_model, tiny_tokenizer

from qwenlm.cli import main as cli_main
from qwenlm.cli.export import export_gguf
from qwenlm.errors import QwenlmError
from qwenlm.lora import adapter_config, apply_lora, lora_layers, lora_state_dict, save_adapter
from qwenlm.models import build_model
from qwenlm.weights import gguf_writer, open_checkpoint
from qwenlm.weights.gguf import GGUFFile
from qwenlm.weights.gguf_writer import ExportError
from qwenlm.weights.hf_writer import write_hf_folder

PROMPTS = ("hello world", "in the world, hell", "你好 helloing")
NEW_TOKENS = 12
BINDINGS = [b for b in ("llama_cpp", "ik_llama_cpp") if importlib.util.find_spec(b)]


# -- llama.cpp ------------------------------------------------------------------------------------
class LlamaCpp:
    """One GGUF file in llama.cpp through whichever binding is installed: tokenize and greedy."""

    # One thread: ggml's worker threads spin while they wait for each other, which on a busy
    # machine costs far more than a second thread gains on these small models.
    def __init__(self, binding: str, path) -> None:
        self.binding = binding
        if binding == "llama_cpp":
            import llama_cpp

            # logits_all: llama-cpp-python keeps logits (in .scores) only with it.
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False
            )
        else:
            # ik-llama-cpp-python's high-level class samples in Python and stops at end-of-text;
            # its model/context wrappers give the raw logits.
            from ik_llama_cpp._internals import IkContext, IkModel

            self.model = IkModel(str(path))
            self.ctx = IkContext(self.model, n_ctx=128, n_threads=1, flash_attn=False)

    def tokenize(self, text: str) -> list[int]:
        if self.binding == "llama_cpp":
            return self.llm.tokenize(text.encode(), add_bos=False, special=False)
        return self.model.tokenize(text, add_bos=False, special=False)

    def _eval(self, ids: list[int], start: int) -> np.ndarray:
        """Feed ``ids`` at positions start..; the next-token logits after the last one."""
        if self.binding == "llama_cpp":
            self.llm.eval(ids)
            return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
        from ik_llama_cpp import _ctypes_api as C
        from ik_llama_cpp._internals import make_batch_range

        batch = make_batch_range(ids, pos_start=start)
        try:
            assert self.ctx.decode(batch) == 0
        finally:
            C.llama_batch_free(batch)
        return np.ctypeslib.as_array(self.ctx.get_logits(-1), shape=(self.model.n_vocab,)).copy()

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
        """``n`` greedy tokens after ``ids`` (never stopping early) and the logits at each step."""
        if self.binding == "llama_cpp":
            self.llm.reset()
        else:
            self.ctx.kv_cache_clear()
        logits = [self._eval(list(ids), 0)]
        out: list[int] = []
        for _ in range(n):
            out.append(int(logits[-1].argmax()))
            if len(out) < n:
                logits.append(self._eval([out[-1]], len(ids) + len(out) - 1))
        return out, np.stack(logits)

    def close(self) -> None:
        if self.binding == "llama_cpp":
            self.llm.close()
        else:
            self.ctx.close()
            self.model.close()


def qwenlm_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by full forward passes: no cache, nothing shared with the engine."""
    seq, logits = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([seq]))[0, -1].float()
            logits.append(row.numpy())
            seq.append(int(row.argmax()))
    return seq[len(ids) :], np.stack(logits)


def load_export(path) -> torch.nn.Module:
    """The model in a GGUF file (or a model folder), as qwenlm builds it."""
    with open_checkpoint(path) as ckpt:
        return build_model(ckpt.config, ckpt.tensors()).eval()


# -- sources --------------------------------------------------------------------------------------
def save_folder(folder, model, config=None, tokenizer=None, template=QWEN_TEMPLATE):
    """A model folder as ``qwenlm train`` / ``qwenlm merge`` write them."""
    return write_hf_folder(
        folder,
        config=config or tiny_config(),
        tensors=dict(model.state_dict()),
        tokenizer=tokenizer or tiny_tokenizer(),
        chat_template=template,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    # std 0.1: logits spread over a few units, so greedy choices are decided by margins far
    # larger than float16 rounding (checked below, not assumed).
    model = tiny_model(std=0.1)
    return save_folder(root / "model", model), model


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory):
    folder, _ = tiny_folder
    model = tiny_model(std=0.1)  # the same weights as the saved folder (same seed)
    apply_lora(model, target_modules=("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B starts at zero, which would make the adapter a no-op
        for _, m in lora_layers(model):
            m.lora_A.weight.copy_(0.2 * torch.randn(m.lora_A.weight.shape, generator=g))
            m.lora_B.weight.copy_(0.2 * torch.randn(m.lora_B.weight.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(path, adapter_config(model, base_model=str(folder)), lora_state_dict(model))
    return path, model.eval()


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A tiny Qwen2-MoE saved by transformers: a Hugging Face folder, as downloaded ones are."""
    transformers = pytest.importorskip("transformers")
    from helpers import write_hf_tokenizer

    config = tiny_config(
        model_type="qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        decoder_sparse_step=1,
        norm_topk_prob=False,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**config.to_hf()))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 0.5 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 0.1
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p)
            )
    folder = tmp_path_factory.mktemp("moe") / "model"
    hf.eval().save_pretrained(folder)
    write_hf_tokenizer(folder)
    return folder


# -- llama.cpp runs the export like qwenlm --------------------------------------------------------
# float16 keeps 11 significant bits (relative rounding 4.9e-4). llama.cpp rounds the activations
# entering each of the ~8 f16 matrix products on a token's path, and the K/V cache, to float16,
# where qwenlm computes in float32 from the same weights: on these logits (|x| < 3.5) that can
# add up to ~8 * 3 * 4.9e-4 = 1e-2. Measured: at most 5.3e-3 (llama-cpp-python 0.3.36) and
# 3.1e-3 (ik-llama-cpp-python 0.1.5). A misplaced tensor, a wrong rope base or norm epsilon
# moves logits by far more (order 1).
LLAMA_ATOL = 1e-2


def check_llama_cpp_matches_qwenlm(binding, path, tokenizer, reference=None) -> None:
    """llama.cpp on the GGUF file ``path`` tokenizes PROMPTS like qwenlm and greedy-decodes the
    same tokens as qwenlm on ``reference`` (default: the same file), with logits within
    LLAMA_ATOL. The greedy margins of these prompts are >= 9e-3 (measured), so equal tokens
    are what a correct export gives, deterministically."""
    reference = reference if reference is not None else load_export(path)
    llama = LlamaCpp(binding, path)
    try:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            assert llama.tokenize(prompt) == ids, prompt
            expected, expected_logits = qwenlm_greedy(reference, ids, NEW_TOKENS)
            got, got_logits = llama.greedy(ids, NEW_TOKENS)
            assert got == expected, prompt
            np.testing.assert_allclose(got_logits, expected_logits, rtol=0, atol=LLAMA_ATOL)
    finally:
        llama.close()


needs_llama_cpp = pytest.mark.skipif(
    not BINDINGS,
    reason="neither llama-cpp-python nor ik-llama-cpp-python is installed (pip install "
    "ik-llama-cpp-python, a binary wheel, or llama-cpp-python)",
)
binding = pytest.mark.parametrize("binding", BINDINGS or ["none"])


@needs_llama_cpp
@binding
def test_llama_cpp_runs_the_export_like_qwenlm(binding, tiny_folder, tmp_path):
    folder, _ = tiny_folder
    out = export_gguf(folder, tmp_path / "tiny.gguf", type="f16")
    check_llama_cpp_matches_qwenlm(binding, out, tiny_tokenizer())


@needs_llama_cpp
@binding
def test_llama_cpp_runs_the_export_with_an_adapter_merged(binding, tiny_folder, adapter, tmp_path):
    folder, base = tiny_folder
    adapter_path, adapted = adapter
    out = export_gguf(folder, tmp_path / "merged.gguf", type="f16", adapter=adapter_path)
    # The export holds base + adapter: qwenlm's logits on it are the adapted model's (up to
    # float16 weights), and differ from the base model's.
    x = torch.tensor([tiny_tokenizer().encode(PROMPTS[0])])
    with torch.no_grad():
        got, want, plain = load_export(out)(x), adapted(x), base(x)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert (got - plain).abs().max() > 0.1
    check_llama_cpp_matches_qwenlm(binding, out, tiny_tokenizer())


@needs_llama_cpp
@binding
def test_llama_cpp_runs_an_exported_moe(binding, moe_folder, tmp_path):
    out = export_gguf(moe_folder, tmp_path / "moe.gguf", type="f16")
    with GGUFFile(out) as gf:
        assert gf.architecture == "qwen2moe"
        assert gf.tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 32, 64)
        assert gf.tensors["blk.1.ffn_gate_inp.weight"].type_name == "F32"
        assert gf.metadata["qwen2moe.expert_used_count"] == 2
    # qwenlm's GGUF reader runs dense models only: the reference is the source folder, in
    # float32 (the f16 weights' rounding stays within LLAMA_ATOL here: measured 3.7e-3).
    check_llama_cpp_matches_qwenlm(binding, out, tiny_tokenizer(), load_export(moe_folder))


# -- qwenlm re-loads the export -------------------------------------------------------------------
def logits_of(model, ids=(5, 260, 17, 300, 42, 99, 271, 3)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0]


def test_f32_export_reloads_bit_exact(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = export_gguf(folder, tmp_path / "m.gguf", type="f32")
    assert torch.equal(logits_of(load_export(out)), logits_of(model))


def test_f16_export_is_the_source_rounded_to_float16(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = export_gguf(folder, tmp_path / "m.gguf", type="f16")
    with GGUFFile(out) as gf:
        types = {name: info.type_name for name, info in gf.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_q.bias"] == "F32"
    assert types["output_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"
    # Matrices rounded to nearest float16, vectors kept: then qwenlm computes exactly the same.
    rounded = {n: t.half().float() if t.dim() > 1 else t for n, t in model.state_dict().items()}
    reference = build_model(model.config, rounded.items())
    assert torch.equal(logits_of(load_export(out)), logits_of(reference))


def test_q8_0_export_is_within_the_formats_block_error(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = export_gguf(folder, tmp_path / "m.gguf", type="q8_0")
    with open_checkpoint(out) as ckpt:
        assert ckpt._gguf.tensors["blk.1.ffn_down.weight"].type_name == "Q8_0"
        weights = dict(ckpt.tensors())
    for name, w in model.state_dict().items():
        got = weights[name]
        if w.dim() == 1:
            assert torch.equal(got, w), name  # vectors stay f32
            continue
        # Q8_0: per 32 values d = max|x| / 127, stored as float16, and q = round(x / d). So
        # |x - q d16| <= d/2 + 127 |d - d16| <= d (1/2 + 127 * 2^-11).
        blocks, err = w.reshape(-1, 32), (got - w).reshape(-1, 32).abs()
        bound = blocks.abs().amax(dim=1, keepdim=True) / 127 * (0.5 + 127 * 2.0**-11) + 1e-7
        assert (err <= bound).all(), name
        assert err.max() > 0, name
    # Rounding to d = max|x| / 127 leaves ~0.5% rms relative error per matrix (d / sqrt(12),
    # max|x| ~ 2 sigma over 32 values); about ten matrices lie on a token's path, adding up
    # to ~1.6% of the logits' spread (measured: 2.3%). 5% passes a correct file; a wrong scale
    # or block order errs by the logits' whole spread.
    got, want = logits_of(load_export(out)), logits_of(model)
    assert 0 < (got - want).pow(2).mean().sqrt() < 0.05 * want.std()


# -- the real Qwen vocabulary ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_vocab_export(real_model_path, tmp_path_factory):
    """A tiny random network (hidden 64, 2 layers, tied head) with Qwen's real tokenizer."""
    with open_checkpoint(real_model_path) as ckpt:
        tokenizer, template = ckpt.tokenizer, ckpt.chat_template
    config = tiny_config(vocab_size=151936, tie_word_embeddings=True)
    model = tiny_model(config, std=0.1)
    out = tmp_path_factory.mktemp("real-vocab") / "model.gguf"
    params = dict(model.named_parameters())  # the tied head appears once, as the embedding
    gguf_writer.write_gguf(
        out,
        config=config,
        tokenizer=tokenizer,
        chat_template=template,
        shapes={n: tuple(p.shape) for n, p in params.items()},
        read=lambda n: params[n].detach(),
        type="f16",
    )
    return out, tokenizer, template


@pytest.mark.real_model
def test_real_vocabulary_merges_types_and_template_round_trip(real_vocab_export, real_model_path):
    out, _, _ = real_vocab_export
    with GGUFFile(real_model_path) as ref, GGUFFile(out) as got:
        for key in (
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template",
        ):
            assert got.metadata[key] == ref.metadata[key], key
        assert got.metadata["tokenizer.ggml.token_type"].tolist() == (
            ref.metadata["tokenizer.ggml.token_type"].tolist()
        )
        assert "output.weight" not in got.tensors  # tied: llama.cpp uses token_embd


@pytest.mark.real_model
@needs_llama_cpp
@binding
def test_llama_cpp_tokenizes_and_decodes_with_the_real_vocabulary(binding, real_vocab_export):
    from qwenlm.chat.template import ChatTemplate

    out, tokenizer, template = real_vocab_export
    texts = [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "你好，世界！こんにちは 안녕하세요",
        "Prices: 12345.67 or 1e-5; IDs 000123\r\n\ttabs   and  spaces",
        "emoji 🤖🎉 and accents café naïve",
        "<|im_start|>user spelled in text stays text<|im_end|>",
    ]
    llama = LlamaCpp(binding, out)
    try:
        for text in texts:
            assert llama.tokenize(text) == tokenizer.encode(text), text
        # The chat template's control tokens are parsed the same way.
        chat = ChatTemplate(template, tokenizer)
        messages = [{"role": "user", "content": "Write hello world in Python."}]
        if binding == "llama_cpp":
            rendered = llama.llm.tokenize(
                chat.render(messages).encode(), add_bos=False, special=True
            )
        else:
            rendered = llama.model.tokenize(chat.render(messages), add_bos=False, special=True)
        assert rendered == chat.encode(messages)
    finally:
        llama.close()
    check_llama_cpp_matches_qwenlm(binding, out, tokenizer)


@pytest.fixture(scope="module")
def real_model_export(real_model_path, tmp_path_factory):
    """The default model (a Q4_K_M GGUF) exported to f16, and qwenlm's greedy replies on that
    file to 3 chat prompts: (prompt ids, 16 reply ids) each."""
    import qwenlm

    out = export_gguf(real_model_path, tmp_path_factory.mktemp("real") / "qwen.gguf")
    model = qwenlm.load(out, quant="none", dtype="float32", device="cpu")
    replies = []
    for question in (
        "Write a Python function that reverses a string.",
        "Explain what a hash map is.",
        "用一句话介绍你自己。",
    ):
        ids = model.encode_chat([{"role": "user", "content": question}])
        chunks = model.stream(ids, temperature=0, repetition_penalty=1.0, max_new_tokens=16)
        replies.append((ids, [t for chunk in chunks for t in chunk.token_ids]))
    return out, replies


@pytest.mark.real_model
@pytest.mark.slow
@needs_llama_cpp
@binding
def test_the_exported_default_model_answers_alike_in_llama_cpp(binding, real_model_export):
    out, replies = real_model_export
    llama = LlamaCpp(binding, out)
    try:
        for ids, expected in replies:
            assert len(expected) == 16  # no early stop: every token is compared
            assert llama.greedy(ids, len(expected))[0] == expected
    finally:
        llama.close()


# -- errors and atomic writes ---------------------------------------------------------------------
def test_cli_exports_and_refuses_to_overwrite(tiny_folder, tmp_path, capsys):
    folder, _ = tiny_folder
    out = tmp_path / "m.gguf"
    assert cli_main(["export", str(folder), "--gguf", str(out), "--type", "q8_0"]) == 0
    with GGUFFile(out) as gf:
        assert gf.tensors["blk.0.attn_q.weight"].type_name == "Q8_0"
        assert gf.metadata["general.file_type"] == 7  # MOSTLY_Q8_0
        assert gf.metadata["tokenizer.chat_template"] == QWEN_TEMPLATE
    before = out.read_bytes()
    capsys.readouterr()
    assert cli_main(["export", str(folder), "--gguf", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert out.read_bytes() == before
    assert cli_main(["export", str(folder), "--gguf", str(out), "--force"]) == 0
    assert out.read_bytes() != before  # f16 now


def write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file"),
        ("llama", "unsupported model_type 'llama'"),
        ("window", "sliding-window attention"),
        ("type", "unknown GGUF type 'q4_0'"),
        ("no-folder", "does not exist"),
        ("folder", "is a folder"),
    ],
)
def test_bad_input_is_a_one_line_error(case, message, tiny_folder, tmp_path):
    folder, model = tiny_folder
    source, out, kind = folder, tmp_path / "out.gguf", "f16"
    if case == "missing":
        source = tmp_path / "nothing-here"
    elif case in ("llama", "window"):
        source = save_folder(tmp_path / "src", model)
        changes = (
            {"model_type": "llama"}
            if case == "llama"
            else {
                "use_sliding_window": True,
                "sliding_window": 64,
                "max_window_layers": 0,
            }
        )
        write_config(source, **changes)
    elif case == "type":
        kind = "q4_0"
    elif case == "no-folder":
        out = tmp_path / "missing" / "out.gguf"
    elif case == "folder":
        out = tmp_path
    with pytest.raises(QwenlmError) as e:
        export_gguf(source, out, type=kind)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out.gguf").exists()


def test_unwritable_output_is_an_error(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    # /proc takes no new files: users are told so up front ("is not writable"); root, whom
    # access() lets through, when the write fails ("cannot write").
    with pytest.raises(ExportError, match="/proc") as e:
        export_gguf(folder, "/proc/qwenlm-export-test.gguf")
    assert "writ" in str(e.value) and "\n" not in str(e.value)


def test_failed_export_leaves_nothing_behind(tiny_folder, tmp_path, monkeypatch):
    folder, _ = tiny_folder
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous file")
    calls = []

    def failing_encode(t, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_encode(t, kind)

    real_encode = gguf_writer._encode
    monkeypatch.setattr(gguf_writer, "_encode", failing_encode)
    with pytest.raises(ExportError, match="No space left"):
        export_gguf(folder, out, force=True)
    assert len(calls) == 5  # it failed in the middle of the tensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file
    assert out.read_bytes() == b"the previous file"  # the old file is untouched
    monkeypatch.setattr(gguf_writer, "_encode", real_encode)
    export_gguf(folder, tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "new.gguf"]


def test_verification_catches_a_file_that_differs_from_its_plan(tiny_folder, tmp_path):
    folder, model = tiny_folder
    out = export_gguf(folder, tmp_path / "m.gguf", type="f16")
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    plan = gguf_writer.plan_tensors(model.config, shapes, "f16")
    gguf_writer._verify(out, "qwen2", plan, model.config.vocab_size)  # as written: passes
    with pytest.raises(ExportError, match="differs from what was planned"):
        gguf_writer._verify(
            out, "qwen2", gguf_writer.plan_tensors(model.config, shapes, "f32"), 320
        )
    with pytest.raises(ExportError, match="differs from what was planned"):
        gguf_writer._verify(out, "qwen2", plan[1:], model.config.vocab_size)
