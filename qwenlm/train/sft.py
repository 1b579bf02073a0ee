"""Supervised fine-tuning: conversations, loss on the assistant's tokens only.

Also home of ``LMTask``, the next-token objective that pretraining shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from qwenlm.chat.template import ChatTemplate
from qwenlm.train.data import (
    Conversation,
    DataError,
    RenderStats,
    Row,
    collate,
    pack,
    render_conversations,
    split_eval,
)
from qwenlm.train.losses import lm_loss_sum
from qwenlm.train.recipe import Recipe


class LMTask:
    """Cross-entropy of the target tokens of token rows (summed; the loop normalises)."""

    kind = "lm"
    render_stats: RenderStats | None = None  # what rendering kept, truncated and dropped

    def __init__(self, train_rows: Sequence[Row], eval_rows: Sequence[Row], pad_id: int) -> None:
        self.train_rows = train_rows
        self.eval_rows = eval_rows
        self.pad_id = pad_id

    def units(self, rows: Sequence[Row]) -> int:
        """What the loss is averaged over: target tokens."""
        return sum(r.n_targets for r in rows)

    def forward(
        self, net: nn.Module, model: nn.Module, rows: Sequence[Row], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float]]:
        b = collate(rows, self.pad_id).to(device)
        logprobs = net(b.input_ids, b.positions, b.attn_mask, b.targets)
        loss = lm_loss_sum(logprobs)
        return loss, {"loss": float(loss.detach()), "tokens": float(b.n_tokens)}

    @staticmethod
    def summarize(sums: dict[str, float], units: float) -> dict[str, float]:
        return {"loss": sums["loss"] / max(units, 1)}


def build_sft(
    recipe: Recipe,
    records: list[Conversation],
    eval_records: list[Conversation],
    template: ChatTemplate,
    pad_id: int,
    say: Callable[[str], Any],
) -> LMTask:
    """Render conversations into rows (packed when ``data.packing``) and hold out eval rows."""
    data = recipe.data
    train_rows, eval_rows, stats = render_and_split(
        render_conversations, records, eval_records, template, recipe, say, "example"
    )
    if data.packing:
        # Packing order is fixed by the seed, so a resumed run packs the same rows.
        order = torch.randperm(
            len(train_rows), generator=torch.Generator().manual_seed(recipe.train.seed)
        )
        train_rows = pack([train_rows[i] for i in order.tolist()], data.max_seq_len)
        eval_rows = pack(eval_rows, data.max_seq_len)
        say(f"packed into {len(train_rows)} rows of up to {data.max_seq_len} tokens")
    task = LMTask(train_rows, eval_rows, pad_id)
    task.render_stats = stats
    return task


def render_and_split(
    render: Callable[[Any, ChatTemplate, int], tuple[list[Any], RenderStats]],
    records: Sequence[Any],
    eval_records: Sequence[Any],
    template: ChatTemplate,
    recipe: Recipe,
    say: Callable[[str], Any],
    what: str,
) -> tuple[list[Any], list[Any], RenderStats]:
    """(train rows, eval rows, render stats): ``render`` both sets, or hold out
    ``data.eval_fraction`` of the training rows.

    Reports what rendering kept, and refuses a training set that truncation emptied (``what``
    names one record in that message: "example", "pair").
    """
    data = recipe.data
    train_rows, stats = render(records, template, data.max_seq_len)
    if eval_records:
        eval_rows, _ = render(eval_records, template, data.max_seq_len)
    else:
        train_rows, eval_rows = split_eval(train_rows, data.eval_fraction, recipe.train.seed)
    report(stats, say)
    if not train_rows:
        raise DataError(
            [f"no {what} keeps a supervised token after truncation"],
            hint=f"raise data.max_seq_len (now {data.max_seq_len})",
        )
    return train_rows, eval_rows, stats


def report(stats: RenderStats, say: Callable[[str], Any]) -> None:
    say(
        f"{stats.examples} examples, {stats.tokens} tokens ({stats.targets} supervised)"
        + (f"; {stats.truncated} truncated" if stats.truncated else "")
        + (
            f"; {stats.dropped} dropped: no supervised token left after truncation"
            if stats.dropped
            else ""
        )
    )
