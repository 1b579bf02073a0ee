"""Long-context evaluation commands on a tiny model: perplexity by length, needle grid."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_float32_close,
    float64_logits,
    tiny_config,
    write_tiny_hf_folder,
)

import qwenlm
from qwenlm.cli import main as cli_main
from qwenlm.eval.longcontext import (
    QUESTION,
    LongContextError,
    default_variants,
    greedy,
    needle_prompt,
    parse_lengths,
    perplexity_by_length,
    ppl_table,
    variant,
    window_nll,
)

TEXT = "hello world, hello wor ld in ing. " * 400


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "m"
    write_tiny_hf_folder(f, tiny_config(max_position_embeddings=64), std=0.1)
    (tmp_path / "text.txt").write_text(TEXT)
    return f


def test_parse_lengths():
    assert parse_lengths("1k, 2k,4096,0.5k") == [1024, 2048, 4096, 512]
    with pytest.raises(LongContextError, match="bad length"):
        parse_lengths("lots")


def test_window_nll_and_variants(folder):
    m = qwenlm.load(folder, quant="none", device="cpu")
    ids = m.tokenizer.encode(TEXT)[:100]
    nll = window_nll(m.model, ids, head_rows=7)

    def nll_of(logits: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    want, exact = nll_of(m.logits(ids)), nll_of(float64_logits(m.model, torch.tensor([ids]))[0])
    # the head in slices of 7 rows: float32 noise of the full forward against float64
    assert_float32_close(nll, want, exact)
    v = default_variants(m.config)
    yarn = variant(m.model, v["yarn"])
    assert yarn.config.rope_scaling["original_max_position_embeddings"] == 64
    assert yarn.model.embed_tokens.weight.data_ptr() == m.model.model.embed_tokens.weight.data_ptr()
    rows = perplexity_by_length(m.model, ids, [16, 50], v, score_last=8, windows=2, progress=False)
    assert [(r.variant, r.length) for r in rows] == [
        (a, n) for a in ("base", "yarn", "dca") for n in (16, 50)
    ]
    assert all(r.ppl > 1 and r.tokens == 16 for r in rows)
    # length 16 scores tokens 42..49 and 50..57 with 16-token windows ending at 50 and 58
    base = {r.length: r for r in rows if r.variant == "base"}
    both = torch.cat([window_nll(m.model, ids[34:50])[-8:], window_nll(m.model, ids[42:58])[-8:]])
    # the same windows batched otherwise: float32 noise in the nll (~1e-6 at std 0.1 weights)
    assert base[16].ppl == pytest.approx(float(both.mean().exp()), rel=1e-5)
    both = torch.cat([window_nll(m.model, ids[0:50])[-8:], window_nll(m.model, ids[8:58])[-8:]])
    assert base[50].ppl == pytest.approx(float(both.mean().exp()), rel=1e-5)
    assert "| 50 |" in ppl_table(rows)
    with pytest.raises(LongContextError, match="too few"):
        perplexity_by_length(m.model, ids, [80], v, windows=40, progress=False, score_last=8)
    with pytest.raises(LongContextError, match="exceed score_last"):
        perplexity_by_length(m.model, ids, [8], v, score_last=8, progress=False)


def test_greedy_through_plain_cache_equals_full_forwards(folder):
    m = qwenlm.load(folder, quant="none", device="cpu")
    ids = m.tokenizer.encode("hello world")
    out = greedy(m.model, ids, 10, stop=())
    ref = list(ids)
    for _ in range(10):
        ref.append(int(m.logits(ref)[-1].argmax()))
    assert out == ref[len(ids) :]


def test_needle_prompt_places_the_needle(folder):
    m = qwenlm.load(folder, quant="none", device="cpu")
    hay = m.tokenizer.encode(TEXT)
    for depth in (0.0, 0.5, 1.0):
        ids = needle_prompt(
            m.encode_chat, m.tokenizer.encode, m.tokenizer.decode, hay, 300, depth, "12345"
        )
        text = m.tokenizer.decode(ids)
        assert abs(len(ids) - 300) < 12
        start, end = text.index("user\n") + 5, text.index(QUESTION)
        needle = " The secret passcode is 12345. Remember it: 12345. "
        at = (text.index(needle) - start) / (end - start - len(needle) - 2)
        assert abs(at - depth) < 0.1


def test_longppl_and_needle_commands(folder, tmp_path, capsys):
    data = str(tmp_path / "text.txt")
    rc = cli_main(["longppl", str(folder), "--data", data, "--lengths", "32,96",
                   "--score-last", "16", "--output", str(tmp_path / "ppl.json"),
                   "--no-progress"])  # fmt: skip
    assert rc == 0
    table = capsys.readouterr().out
    assert "| tokens | base | yarn | dca |" in table and "| 96 |" in table
    saved = json.loads((tmp_path / "ppl.json").read_text())
    assert len(saved["rows"]) == 6
    rc = cli_main(["needle", str(folder), "--data", data, "--lengths", "80,120",
                   "--depths", "0,0.5,1", "--variants", "base,dca",
                   "--output", str(tmp_path / "nd"), "--no-progress"])  # fmt: skip
    assert rc == 0
    cells = json.loads((tmp_path / "nd" / "needle.json").read_text())["cells"]
    assert len(cells) == 2 * 2 * 3
    png = (tmp_path / "nd" / "needle.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["longppl", str(folder), "--data", data, "--variants", "rope9"]) == 1
