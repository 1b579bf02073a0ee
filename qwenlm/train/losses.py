"""Losses as small functions over per-token log-probabilities.

Every loss returns a *sum* over its units (target tokens, or preference pairs) rather than a
mean: the training loop divides by the number of units in the whole global batch, so gradient
accumulation and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of ``logits`` (N, vocab) and ``targets`` (N,), in float32."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def lm_loss_sum(logprobs: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the target tokens."""
    return -logprobs.sum()


def sequence_logprobs(logprobs: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row sums (n_rows,) of token log-probs whose row index is ``rows`` (N,)."""
    out = torch.zeros(n_rows, dtype=logprobs.dtype, device=logprobs.device)
    return out.index_add(0, rows, logprobs)


@dataclass
class DPOTerms:
    loss_sum: torch.Tensor  # summed over pairs
    margin_sum: torch.Tensor  # policy log p(chosen) - log p(rejected), summed
    reward_margin_sum: torch.Tensor  # beta * (policy - reference) margins, summed
    correct: torch.Tensor  # pairs whose implicit reward prefers chosen


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOTerms:
    """Direct Preference Optimization (Rafailov et al. 2023) on sequence log-probs (pairs,).

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr))); with ``label_smoothing`` e, the
    conservative variant (1 - e) * that + e * (the same with chosen and rejected swapped).
    """
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return DPOTerms(
        loss_sum=losses.sum(),
        margin_sum=(policy_chosen - policy_rejected).detach().sum(),
        reward_margin_sum=logits.detach().sum(),
        correct=(logits.detach() > 0).sum().float(),
    )


class TargetLogprobs(nn.Module):
    """The module that DDP / FSDP wrap: the causal LM plus the choice of target positions.

    Returns log p(target) for every position whose target is not -100, in row-major order.
    The output head runs on those positions only: in fine-tuning most tokens are prompt, and
    the head (vocab x hidden) is the largest matrix of a small model.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        h = self.lm.model(input_ids, None, positions, attn_mask)  # (B, T, hidden)
        sel = targets != -100
        logits = self.lm.lm_head(h[sel])  # (N, vocab)
        return token_logprobs(logits, targets[sel])
