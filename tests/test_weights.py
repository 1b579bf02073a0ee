"""Loading GGUF files and Hugging Face folders, and refusing malformed ones cleanly."""

from __future__ import annotations

import dataclasses
import json
import random
import struct

import numpy as np
import pytest
import torch
from helpers import (
    random_state_dict,
    tiny_config,
    tiny_specials,
    write_hf_tokenizer,
    write_tiny_gguf,
)
from safetensors.torch import save_file

import qwenlm
from qwenlm.errors import CheckpointError, ModelNotFoundError, QwenlmError
from qwenlm.models import build_model
from qwenlm.weights import open_checkpoint
from qwenlm.weights.gguf import GGUFFile


def logits_of(model, n=24):
    x = torch.arange(n).view(1, -1) % 300
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q5_0"])
def test_gguf_loads_to_the_same_model(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    written = write_tiny_gguf(path, qtype=qtype)
    config = tiny_config()
    reference = build_model(config, written.items())
    m = qwenlm.load(path, quant="none")
    assert dataclasses.replace(
        m.config, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None
    ) == dataclasses.replace(config, bos_token_id=None, eos_token_id=None)
    # the same dequantized float32 weights (test_weights_quants: bit-exact) through the same code
    torch.testing.assert_close(logits_of(m.model), logits_of(reference), rtol=0, atol=0)
    assert m.tokenizer.eos_token_id == tiny_specials()["<|im_end|>"]
    assert m.template.render([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_gguf_metadata_and_tensor_directory_match_ggufs_reader(gguf_path):
    from gguf import GGUFReader

    ref = GGUFReader(str(gguf_path))
    with GGUFFile(gguf_path) as gf:
        assert set(gf.tensors) == {t.name for t in ref.tensors}
        for t in ref.tensors:
            info = gf.tensors[t.name]
            assert info.shape == tuple(reversed(t.shape.tolist()))
            assert (info.offset, info.nbytes, info.ggml_type) == (
                t.data_offset,
                t.n_bytes,
                int(t.tensor_type),
            )
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            ours = gf.metadata[key]
            theirs = field.contents()
            if isinstance(ours, np.ndarray):
                assert ours.tolist() == list(theirs)
            else:
                # float32 fields that one side may widen to float64: approx's default 1e-6
                assert ours == pytest.approx(theirs) if isinstance(ours, float) else ours == theirs


def test_untied_gguf_without_output_weight_ties_to_embedding(tmp_path):
    path = tmp_path / "m.gguf"
    written = write_tiny_gguf(path, drop=("lm_head.weight",))
    m = qwenlm.load(path, quant="none")
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight
    torch.testing.assert_close(
        m.model.lm_head.weight, written["model.embed_tokens.weight"], rtol=0, atol=0
    )  # F32 tensors: read back bit for bit


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_gguf_missing_tensor(tmp_path, quant):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, drop=("model.layers.1.self_attn.k_proj.bias",))
    with pytest.raises(
        CheckpointError, match=r"missing .*model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        qwenlm.load(path, quant=quant)


def test_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, arch="mamba")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'mamba'"):
        open_checkpoint(path)


def test_gguf_wrong_magic(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFFile(path)
    with pytest.raises(ModelNotFoundError, match="not a GGUF file"):
        qwenlm.load(path)  # resolve() checks the magic before anything is parsed


def test_gguf_truncated_anywhere_fails_cleanly(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    rng = random.Random(0)
    points = sorted({*range(0, 64), *(rng.randrange(len(data)) for _ in range(60)), len(data) - 1})
    for n in points:
        cut.write_bytes(data[:n])
        with pytest.raises(QwenlmError), open_checkpoint(cut) as ck:
            build_model(ck.config, ck.tensors())


def test_gguf_tensor_offset_out_of_range(gguf_path, tmp_path):
    data = bytearray(gguf_path.read_bytes())
    with GGUFFile(gguf_path) as gf:
        last = max(gf.tensors.values(), key=lambda t: t.offset)
    # Find the tensor's directory entry by its name and push its offset past the end of the file.
    name = next(k for k, v in _dir_names(gguf_path).items() if v == last.name)
    pos = name + 8 + len(last.name.encode())
    n_dims = struct.unpack_from("<I", data, pos)[0]
    off_pos = pos + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, off_pos, len(data) * 4 // 32 * 32)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="lies outside the file"):
        GGUFFile(bad)


def _dir_names(path) -> dict[int, str]:
    """Byte positions of tensor-name strings (length-prefixed) in the header."""
    data = path.read_bytes()
    with GGUFFile(path) as gf:
        names = list(gf.tensors)
    out = {}
    for n in names:
        enc = n.encode()
        pos = data.find(struct.pack("<Q", len(enc)) + enc)
        assert pos > 0
        out[pos] = n
    return out


def test_gguf_shape_inconsistent_with_config(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, config=tiny_config(intermediate_size=96))
    data = bytearray(path.read_bytes())
    # Claim a different FFN size in the metadata: the tensors no longer fit the config.
    key = b"qwen2.feed_forward_length"
    pos = data.find(key) + len(key) + 4
    struct.pack_into("<I", data, pos, 128)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="has shape"):
        qwenlm.load(path)


@pytest.mark.parametrize(
    "patch",
    [
        ("tensor count", 8, struct.pack("<Q", 1 << 60)),
        ("kv count", 16, struct.pack("<Q", 1 << 60)),
        ("first key length", 24, struct.pack("<Q", 1 << 62)),
        ("version", 4, struct.pack("<I", 7)),
    ],
)
def test_gguf_absurd_header_counts(gguf_path, tmp_path, patch):
    _, pos, value = patch
    data = bytearray(gguf_path.read_bytes())
    data[pos : pos + len(value)] = value
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        GGUFFile(bad)


def test_gguf_huge_array_count(gguf_path, tmp_path):
    data = bytearray(gguf_path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    pos = data.find(key) + len(key) + 4 + 4  # value type, element type
    struct.pack_into("<Q", data, pos, 1 << 61)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="more than the file holds"):
        GGUFFile(bad)


def test_gguf_random_corruption_never_escapes_as_other_errors(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    rng = random.Random(1)
    bad = tmp_path / "fuzz.gguf"
    header = 4096  # mutate where the structure lives
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(header, len(buf)))
            buf[i] = rng.randrange(256)
        bad.write_bytes(bytes(buf))
        try:
            with open_checkpoint(bad) as ck:
                build_model(ck.config, ck.tensors())
        except QwenlmError:
            pass


# -- Hugging Face folders ------------------------------------------------------------------


def write_hf_folder(folder, *, shards: int = 1, index: bool = True, tie: bool = False):
    config = tiny_config(tie_word_embeddings=tie)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**config.to_hf(), "torch_dtype": "float32", "unknown_future_key": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    write_hf_tokenizer(folder)
    sd = random_state_dict(config)
    names = sorted(sd)
    weight_map = {}
    for s in range(shards):
        part = {n: sd[n].contiguous() for n in names[s::shards]}
        fname = (
            f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        )
        save_file(part, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    if shards > 1 and index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.3, "top_k": 5, "eos_token_id": [1, 2]})
    )
    return config, sd


@pytest.mark.parametrize("shards, index", [(1, False), (3, True), (2, False)])
def test_hf_folder_loads(tmp_path, shards, index):
    config, sd = write_hf_folder(tmp_path / "m", shards=shards, index=index)
    m = qwenlm.load(tmp_path / "m", quant="none")
    # the same float32 weights through the same code
    torch.testing.assert_close(
        logits_of(m.model), logits_of(build_model(config, sd.items())), rtol=0, atol=0
    )
    assert m.generation_config().temperature == 0.3
    assert m.generation_config().top_k == 5
    assert m.generation_config().stop_token_ids == (1, 2)
    assert m.template.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>system")


def test_hf_folder_tied_and_bfloat16(tmp_path):
    write_hf_folder(tmp_path / "m", tie=True)
    m = qwenlm.load(tmp_path / "m", dtype="bfloat16", quant="none")
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight
    assert m.model.lm_head.weight.dtype == torch.bfloat16


def test_hf_folder_with_only_pickles_is_refused(tmp_path):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
    with pytest.raises(CheckpointError, match="only pickle files"):
        qwenlm.load(folder)


def test_hf_index_pointing_outside_the_folder(tmp_path):
    folder = tmp_path / "m"
    write_hf_folder(folder, shards=2)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../etc/passwd"}})
    )
    with pytest.raises(CheckpointError, match="invalid shard file"):
        qwenlm.load(folder)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[: len(b) // 2],  # truncated data
        lambda b: b[:5],  # truncated header length
        lambda b: struct.pack("<Q", 1 << 40) + b[8:],  # absurd header length
        lambda b: b[:8] + b"{not json" + b[17:],  # broken header JSON
        lambda b: b.replace(
            b'"data_offsets":[0,', b'"data_offsets":[9,', 1
        ),  # offsets that overlap
    ],
)
def test_malformed_safetensors(tmp_path, mutate):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    f = folder / "model.safetensors"
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(CheckpointError, match="malformed safetensors file"):
        qwenlm.load(folder)


def test_bad_config_json(tmp_path):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read"):
        qwenlm.load(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": -4}))
    with pytest.raises(CheckpointError, match="hidden_size must be a positive integer"):
        qwenlm.load(folder)


# -- crafted weights (checklist 23; issue 14, point 7) ----------------------------------------
def craft(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CRAFTED = {
    "header length past the file": (
        struct.pack("<Q", 10_000) + b"{}",
        "a header of 10,000 bytes in a file of 10",
    ),
    "not a JSON object": (craft(b"[1, 2]"), "does not start with '{'"),
    "invalid UTF-8": (craft(b'{"\xff": 1}'), "not UTF-8"),
    "invalid JSON": (craft(b'{"a": '), "not valid JSON"),
    "NaN in the header": (craft(b'{"a": NaN}'), "not valid JSON"),
    "duplicate names": (
        craft(
            b'{"x": ' + json.dumps(F32x2).encode() + b', "x": ' + json.dumps(F32x2).encode() + b"}",
            bytes(8),
        ),
        "names 'x' twice",
    ),
    "negative shape": (
        craft({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
        "not a list of sizes >= 0",
    ),
    "overflowing shape": (
        craft({"x": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 8]}}, bytes(8)),
        "needs 73,786,976,294,838,206,464 bytes, has 8",
    ),
    "end before begin": (
        craft({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
        "outside the 8-byte data",
    ),
    "offsets past the file": (
        craft({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
        "outside the 8-byte data",
    ),
    "overlapping offsets": (
        craft(
            {"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)
        ),
        "'y' overlaps the tensor before it",
    ),
    "dtype and byte count disagree": (
        craft({"x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "needs 4 bytes, has 8",
    ),
    "unknown dtype": (
        craft({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "unsupported dtype 'Q4'",
    ),
    "bytes no tensor claims": (craft({"x": F32x2}, bytes(16)), "cover 8 of the 16 data bytes"),
}


@pytest.mark.parametrize("content, match", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_safetensors_are_refused_by_the_header_check(tmp_path, content, match):
    import tracemalloc

    folder = tmp_path / "m"
    write_hf_folder(folder)
    (folder / "model.safetensors").write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="malformed safetensors file") as e:
            qwenlm.load(folder, quant="none")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert match in str(e.value)
    assert peak < 16 << 20  # the header check reads the header, nothing the header claims


def test_a_header_over_100_mb_is_refused_unread(tmp_path):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", 150 << 20) + b"{")
        f.truncate(151 << 20)  # sparse: as large as the header claims, without the bytes
    with pytest.raises(CheckpointError, match="a header of 157,286,400 bytes"):
        qwenlm.load(folder, quant="none")


def test_unknown_tensors_are_refused_but_old_rotary_buffers_are_not(tmp_path):
    folder = tmp_path / "m"
    _, sd = write_hf_folder(folder)
    extra = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / "model.safetensors"))
    qwenlm.load(folder, quant="none")  # an HF rotary buffer is recomputed, not loaded
    extra["model.layers.0.mlp.secret_proj.weight"] = torch.ones(2, 2)
    save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"1 tensor.* this model does not use: model.layers.0.mlp.secret_proj"
    ):
        qwenlm.load(folder, quant="none")


def test_a_missing_head_is_not_tied_when_the_config_says_untied(tmp_path):
    folder = tmp_path / "m"
    _, sd = write_hf_folder(folder, tie=False)
    del sd["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"no lm_head.weight, and its config says tie_word_embeddings: false"
    ):
        qwenlm.load(folder, quant="none")


@pytest.mark.parametrize(
    "where, value",
    [
        ("config.json", {"eos_token_id": 5000}),
        ("config.json", {"eos_token_id": [3, -1]}),
        ("generation_config.json", {"eos_token_id": 320}),
    ],
)
def test_an_eos_id_outside_the_vocabulary_is_refused(tmp_path, where, value):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    path = folder / where
    path.write_text(json.dumps({**json.loads(path.read_text()), **value}))
    with pytest.raises(
        CheckpointError, match=r"eos_token_id .* is outside the vocabulary \(0\.\.319\)"
    ):
        open_checkpoint(folder)


def test_a_gguf_eos_id_outside_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.eos_token_id"
    pos = data.find(key) + len(key) + 4  # the value type, then a uint32
    struct.pack_into("<I", data, pos, 151645)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="eos_token_id 151645 is outside the vocabulary"):
        open_checkpoint(path)


def test_a_hostile_chat_template_is_a_load_error(tmp_path):
    folder = tmp_path / "m"
    write_hf_folder(folder)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    (folder / "chat_template.jinja").write_text(loop)
    # whichever bound trips first on this CPU: time, loop count or output size
    unusable = r"chat template in this checkpoint is unusable: .*(ran past|loops ran|output passed)"
    with pytest.raises(CheckpointError, match=unusable):
        open_checkpoint(folder)
    (folder / "chat_template.jinja").write_text("{{ 'a' * 10**10 }}")
    with pytest.raises(CheckpointError, match="would build a value of 10,000,000,000"):
        qwenlm.load(folder)


class _Payload:
    """Unpickling this creates the sentinel file: proof that a pickle was run."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_a_pickle_payload_is_never_run(tmp_path, name):
    import pickle

    folder = tmp_path / "m"
    write_hf_folder(folder)
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(sentinel))
    (folder / name).write_bytes(payload)
    qwenlm.load(folder, quant="none")  # the safetensors weights load; the pickle is ignored
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"only pickle files .* which qwenlm never loads"):
        qwenlm.load(folder)
    with pytest.raises(QwenlmError):
        qwenlm.load(folder / name)  # named directly: not a GGUF, refused by its magic
    assert not sentinel.exists()
