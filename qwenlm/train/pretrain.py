"""Pretraining: a Qwen model built from a config and initialised, trained on plain text.

The recipe of the Qwen reports (AdamW with beta2 0.95 and eps 1e-6, cosine decay to 10% of the
peak learning rate after warmup, weight decay 0.1, gradient clipping at 1.0, bfloat16 autocast)
is the default of ``Recipe``; this module supplies the model, the tokenizer and the text rows.
Text is tokenized once into a memory-mapped token file and cut into windows of
``data.max_seq_len`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenlm import registry
from qwenlm.config import ModelConfig
from qwenlm.models import model_class
from qwenlm.models.qwen2 import RMSNorm
from qwenlm.tokenizer import Tokenizer
from qwenlm.train.data import DataError, TokenWindows, tokenize_corpus
from qwenlm.train.recipe import Recipe, RecipeError, ScratchConfig
from qwenlm.train.sft import LMTask

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens plus ChatML's control tokens: a tokenizer for tiny models."""
    specials = {t: 256 + i for i, t in enumerate(CHATML_SPECIALS)}
    eot = specials["<|endoftext|>"]
    return Tokenizer(
        {bytes([b]): b for b in range(256)},
        specials,
        eos_token_id=eot,
        pad_token_id=eot,
        name="bytes",
    )


def truncated_tokenizer(tok: Tokenizer, limit: int) -> Tokenizer:
    """``tok`` keeping its first ``limit`` ordinary tokens, special tokens renumbered after.

    In a rank-ordered BPE vocabulary every token is a merge of lower-ranked ones, so any prefix
    of the ranks is itself a complete BPE vocabulary: Qwen's tokenization, at a smaller size.
    """
    ranks = {
        tok.id_to_bytes(i): i for i in range(min(limit, tok.vocab_size)) if not tok.is_special(i)
    }
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise RecipeError(f"scratch.vocab_limit {limit} cuts into the 256 byte tokens")
    first = max(ranks.values()) + 1
    old = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    specials = {text: first + k for k, (text, _) in enumerate(old)}
    renumber = {i: specials[text] for text, i in old}

    def remap(i: int | None) -> int | None:
        return renumber.get(i) if i is not None else None

    return Tokenizer(
        ranks,
        specials,
        eos_token_id=remap(tok.eos_token_id),
        bos_token_id=remap(tok.bos_token_id),
        pad_token_id=remap(tok.pad_token_id),
        normalization=tok.normalization,
    )


def scratch_tokenizer(spec: ScratchConfig) -> tuple[Tokenizer, str | None]:
    """(tokenizer, chat template source) for a model trained from scratch."""
    if spec.tokenizer == "bytes":
        tok = byte_tokenizer()
        return tok, None
    from qwenlm.weights import open_checkpoint

    with open_checkpoint(registry.resolve(spec.tokenizer)) as ckpt:
        tok, template = ckpt.tokenizer, ckpt.chat_template
    if spec.vocab_limit is not None:
        tok = truncated_tokenizer(tok, spec.vocab_limit)
    return tok, template


def scratch_config(spec: ScratchConfig, tok: Tokenizer) -> ModelConfig:
    values: dict[str, Any] = dict(spec.config)
    # Round the embedding table up to a multiple of 64, as Qwen does, for friendlier matmuls.
    vocab = values.setdefault("vocab_size", -(-tok.vocab_size // 64) * 64)
    if not isinstance(vocab, int) or vocab < tok.vocab_size:
        raise RecipeError(
            f"scratch.config.vocab_size {vocab} is smaller than the tokenizer's {tok.vocab_size}"
        )
    values.setdefault("bos_token_id", tok.bos_token_id)
    values.setdefault("eos_token_id", tok.eos_token_id)
    config = ModelConfig.from_hf(values)
    # from_hf reads None as "not given" and takes Qwen's ids, which lie outside a small
    # vocabulary (and would be refused at load); here None means the tokenizer has none.
    unset = {k: None for k in ("bos_token_id", "eos_token_id") if values[k] is None}
    return dataclasses.replace(config, **unset)


def init_weights(model: nn.Module, std: float) -> None:
    """Normal(0, std) weights, zero biases, unit norms; the residual-output projections get
    std / sqrt(2 * layers) so the residual stream does not grow with depth (GPT-2)."""
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(m.weight, 0.0, s)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)


def build_scratch_model(config: ModelConfig, std: float, seed: int) -> nn.Module:
    """A freshly initialised model, the same on every process (seeded)."""
    torch.manual_seed(seed)
    model = model_class(config)(config)
    init_weights(model, std)
    return model


def build_pretrain(
    recipe: Recipe, tok: Tokenizer, say: Callable[[str], Any], cache_dir: Path
) -> LMTask:
    data = recipe.data
    L = data.max_seq_len
    tokens = tokenize_corpus(data.train, tok, cache_dir, log=say)
    total = TokenWindows.total(tokens, L)
    if data.eval:
        eval_tokens = tokenize_corpus(data.eval, tok, cache_dir, log=say)
        train_rows, eval_rows = TokenWindows(tokens, L), TokenWindows(eval_tokens, L)
    else:
        # The held-out windows are the end of the corpus: contiguous, so no text is in both.
        n_eval = round(total * data.eval_fraction) if data.eval_fraction > 0 else 0
        if data.eval_fraction > 0 and total > 1:
            n_eval = max(1, min(total - 1, n_eval))
        train_rows = TokenWindows(tokens, L, 0, total - n_eval)
        eval_rows = TokenWindows(tokens, L, total - n_eval, n_eval)
    if len(train_rows) == 0:
        raise DataError(
            [f"the corpus has {len(tokens)} tokens, fewer than one row of {L} + 1"],
            hint="lower data.max_seq_len or add text",
        )
    say(
        f"corpus: {len(tokens):,} tokens; {len(train_rows)} training rows and {len(eval_rows)} "
        f"held-out rows of {L} tokens"
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return LMTask(train_rows, eval_rows, pad)
