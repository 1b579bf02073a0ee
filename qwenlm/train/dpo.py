"""Direct Preference Optimization on (prompt, chosen, rejected) pairs.

The reference model is the policy with its LoRA adapters switched off (``lora_disabled``),
so DPO costs one extra no-grad forward pass and no second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qwenlm.chat.template import ChatTemplate
from qwenlm.lora import lora_disabled
from qwenlm.train.data import PairRow, PreferencePair, RenderStats, collate, render_pairs
from qwenlm.train.losses import dpo_loss, sequence_logprobs
from qwenlm.train.recipe import Recipe
from qwenlm.train.sft import render_and_split


class DPOTask:
    kind = "dpo"
    render_stats: RenderStats | None = None  # what rendering kept, truncated and dropped

    def __init__(
        self,
        train_rows: Sequence[PairRow],
        eval_rows: Sequence[PairRow],
        pad_id: int,
        *,
        beta: float,
        label_smoothing: float = 0.0,
    ) -> None:
        self.train_rows = train_rows
        self.eval_rows = eval_rows
        self.pad_id = pad_id
        self.beta = beta
        self.label_smoothing = label_smoothing

    def units(self, rows: Sequence[PairRow]) -> int:
        return len(rows)

    def forward(
        self, net: nn.Module, model: nn.Module, rows: Sequence[PairRow], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        n = len(rows)
        b = collate([r.chosen for r in rows] + [r.rejected for r in rows], self.pad_id).to(device)
        row_of = (b.targets != -100).nonzero()[:, 0]  # the row of each target token, row-major
        with torch.no_grad(), lora_disabled(model):
            ref = sequence_logprobs(
                net(b.input_ids, b.positions, b.attn_mask, b.targets), row_of, 2 * n
            )
        policy = sequence_logprobs(
            net(b.input_ids, b.positions, b.attn_mask, b.targets), row_of, 2 * n
        )
        terms = dpo_loss(
            policy[:n],
            policy[n:],
            ref[:n],
            ref[n:],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        return terms.loss_sum, {
            "loss": float(terms.loss_sum.detach()),
            "margin": float(terms.margin_sum),
            "reward_margin": float(terms.reward_margin_sum),
            "accuracy": float(terms.correct),
            "tokens": float(b.n_tokens),
        }

    @staticmethod
    def summarize(sums: dict[str, float], units: float) -> dict[str, float]:
        u = max(units, 1)
        return {k: sums[k] / u for k in ("loss", "margin", "reward_margin", "accuracy")}


def build_dpo(
    recipe: Recipe,
    pairs: list[PreferencePair],
    eval_pairs: list[PreferencePair],
    template: ChatTemplate,
    pad_id: int,
    say: Callable[[str], Any],
) -> DPOTask:
    train_rows, eval_rows, stats = render_and_split(
        render_pairs, pairs, eval_pairs, template, recipe, say, "pair"
    )
    task = DPOTask(
        train_rows,
        eval_rows,
        pad_id,
        beta=recipe.dpo.beta,
        label_smoothing=recipe.dpo.label_smoothing,
    )
    task.render_stats = stats
    return task
