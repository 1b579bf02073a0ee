"""Training: pretraining from scratch, supervised fine-tuning and DPO; full, LoRA and Q-LoRA.

    from qwenlm.train import load_recipe, train
    result = train(load_recipe("recipes/identity-lora.yaml", overrides=["--train.steps", "40"]))

A recipe (YAML) names the model, data, method and every hyper-parameter; ``train`` runs it on
one process or under torchrun (DDP or FSDP2), writes atomic checkpoints it can resume from,
a JSONL log and a loss plot, and leaves a PEFT adapter or a Hugging Face model folder in
``recipe.out``. The pieces: ``recipe`` (config), ``data`` (records to token rows), ``losses``,
``checkpoint``, ``distributed``, ``pretrain`` / ``sft`` / ``dpo`` (tasks), ``loop``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwenlm.train.loop import TrainResult, train
    from qwenlm.train.recipe import Recipe, load_recipe

__all__ = ["Recipe", "TrainResult", "load_recipe", "train"]

_LAZY = {
    "train": "qwenlm.train.loop",
    "TrainResult": "qwenlm.train.loop",
    "Recipe": "qwenlm.train.recipe",
    "load_recipe": "qwenlm.train.recipe",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenlm.train' has no attribute {name!r}")
