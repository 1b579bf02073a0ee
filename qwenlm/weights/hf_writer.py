"""Writing a Hugging Face model folder: config.json, model.safetensors, tokenizer files.

What training and ``qwenlm merge`` save reloads through the same loader as any downloaded
model (``qwenlm.load(folder)``), and the tokenizer files are the standard byte-level BPE
``tokenizer.json`` (vocabulary, merges, Qwen's split pattern), so transformers reads them too.
The index records the weights' sha256 (``metadata.sha256``), which the loader checks: a
changed byte is refused rather than served.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch

from qwenlm.config import ModelConfig
from qwenlm.fsutil import sha256_file, write_json
from qwenlm.tokenizer import QWEN_PATTERN, Tokenizer, byte_decoder
from qwenlm.weights.safetensors import write_tensors

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@cache
def _byte_encoder() -> dict[int, str]:
    return {v: k for k, v in byte_decoder().items()}


def _bytelevel(b: bytes) -> str:
    enc = _byte_encoder()  # built once: a 150k-token vocabulary calls this 450k times
    return "".join(enc[x] for x in b)


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a rank-ordered byte-level BPE vocabulary.

    Token t of rank r is the merge of the two parts that BPE over t's bytes reaches using only
    tokens ranked below r (which is how tiktoken, merging lowest rank first, builds it).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2 and all(ranks.get(p, rank) < rank for p in parts):
            merges.append((parts[0], parts[1]))
    return merges


def tokenizer_files(
    tok: Tokenizer, *, chat_template: str | None, model_max_length: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer.json, tokenizer_config.json) contents for ``tok``."""
    ranks = {}
    for i in range(tok.vocab_size):
        b = tok.id_to_bytes(i)
        if b and not tok.is_special(i):
            ranks[b] = i
    vocab = {_bytelevel(b): i for b, i in ranks.items()}
    merges = [f"{_bytelevel(a)} {_bytelevel(b)}" for a, b in bpe_merges(ranks)]
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    added = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, i in specials
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": tok.normalization} if tok.normalization else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }

    def name(i: int | None) -> str | None:
        return tok.id_to_bytes(i).decode("utf-8") if i is not None else None

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": {
            str(i): {k: v for k, v in a.items() if k != "id"}
            for a, (_, i) in zip(added, specials, strict=True)
        },
        "eos_token": name(tok.eos_token_id),
        "pad_token": name(tok.pad_token_id),
        "bos_token": name(tok.bos_token_id),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    return tokenizer_json, config


def write_hf_folder(
    folder: str | os.PathLike[str],
    *,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    tokenizer: Tokenizer,
    chat_template: str | None,
    dtype: torch.dtype = torch.float32,
    generation: Mapping[str, Any] | None = None,
) -> Path:
    """A model folder that ``qwenlm.load`` and transformers both read. Files are atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in tensors.items()
        # A tied output head is the embedding; safetensors stores a tensor once.
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    write_tensors(folder / WEIGHTS, weights, metadata={"format": "pt"})
    # The index names the weight file, so other *.safetensors in the folder (a checkpoint's
    # optimizer state) are never taken for weights, and holds its checksum.
    metadata = {
        "total_size": (folder / WEIGHTS).stat().st_size,
        "sha256": {WEIGHTS: sha256_file(folder / WEIGHTS)},
    }
    write_json(
        folder / INDEX,
        {"metadata": metadata, "weight_map": dict.fromkeys(sorted(weights), WEIGHTS)},
    )
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json(folder / "config.json", hf)
    tj, tc = tokenizer_files(
        tokenizer, chat_template=chat_template, model_max_length=config.max_position_embeddings
    )
    write_json(folder / "tokenizer.json", tj)
    write_json(folder / "tokenizer_config.json", tc)
    if generation:
        write_json(folder / "generation_config.json", dict(generation))
    return folder
