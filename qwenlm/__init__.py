"""qwenlm: an independent implementation of the Qwen language-model system on PyTorch.

import qwenlm
model = qwenlm.load("qwen2.5-coder-0.5b-instruct")
response, history = model.chat("你好", history=None)
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# torch's OpenMP workers spin for a while after each parallel op (a softmax over the vocabulary
# is one) while our kernels' own threads want the same cores: on a 2-core machine a decode
# step's pool worker then lost its core in most layers (~50 us late each time, 15-20% of the
# step). Passive waiting hands the core back at once. Only where the user chose nothing, and
# only if torch is not loaded yet (OpenMP reads the setting once, when it loads).
if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# Loaded on first use so that `qwenlm list` and `qwenlm pull` do not pay for importing torch.
_LAZY = {
    "load": "qwenlm.api",
    "export_gguf": "qwenlm.cli.export",
    "Qwen": "qwenlm.api",
    "GenerationConfig": "qwenlm.generation.generate",
    "ModelConfig": "qwenlm.config",
    "Tokenizer": "qwenlm.tokenizer",
    "ChatTemplate": "qwenlm.chat.template",
    "QwenlmError": "qwenlm.errors",
}

if TYPE_CHECKING:
    from qwenlm.api import Qwen, load
    from qwenlm.chat.template import ChatTemplate
    from qwenlm.cli.export import export_gguf
    from qwenlm.config import ModelConfig
    from qwenlm.errors import QwenlmError
    from qwenlm.generation.generate import GenerationConfig
    from qwenlm.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "GenerationConfig",
    "ModelConfig",
    "Qwen",
    "QwenlmError",
    "Tokenizer",
    "__version__",
    "export_gguf",
    "load",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenlm' has no attribute {name!r}")
