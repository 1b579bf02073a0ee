"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B):
the Qwen2 / Qwen3 decoder with mixture-of-experts MLPs.

Attention, norms and rotary embedding are Qwen2's (imported from qwen2.py, with Qwen3's q/k
norms where the config has them); what differs is the MLP of sparse layers: a softmax router
picks ``num_experts_per_tok`` of ``num_experts`` fine-grained experts per token (weights
renormalised when ``norm_topk_prob``), and, in Qwen2-MoE only, a shared expert, scaled by a
sigmoid gate, sees every token. Layer ``i`` is sparse unless it is in
``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``. Parameter names are Hugging
Face's (``mlp.gate``, ``mlp.experts.N.gate_proj``, ``mlp.shared_expert``,
``mlp.shared_expert_gate``).

In training mode the load-balancing loss (Switch Transformer, as transformers computes it)
times ``router_aux_loss_coef`` is added to the gradient through :class:`AddAuxLoss`, so any
training loop that back-propagates the language-model loss trains the router to balance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.models.attention import AttentionPlan, LayerCache
from qwenlm.models.qwen2 import MLP, Attention, Qwen2ForCausalLM, Qwen2Model, RMSNorm


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int):
    """Switch Transformer's auxiliary loss: E * sum_e (fraction of routings to e) * (mean p_e).

    ``router_logits`` holds one (tokens, num_experts) tensor per sparse layer; the fractions
    and mean probabilities are taken over all of them together, as transformers does.
    """
    counts = torch.zeros(num_experts, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        probs = logits.float().softmax(-1)  # (N, E)
        _, chosen = probs.topk(top_k, dim=-1)
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


class AddAuxLoss(torch.autograd.Function):
    """Returns ``x`` unchanged; in the backward pass ``loss`` receives gradient 1."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.dtype, ctx.shape = loss.dtype, loss.shape
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, torch.ones(ctx.shape, dtype=ctx.dtype, device=grad.device)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.aux_coef = float(config.router_aux_loss_coef or 0.0)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        # Qwen3-MoE has no shared expert (its config leaves the size unset).
        self.shared_expert: MLP | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), and each token's chosen experts and weights (N, top_k)."""
        logits = self.gate(h)
        probs = logits.float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, chosen, weights.to(h.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = x.reshape(B * T, d)  # (N, hidden)
        logits, chosen, weights = self.route(h)
        # Sort the N * top_k (token, expert) routings by expert: each expert then runs once, on
        # exactly the rows routed to it.
        flat = chosen.reshape(-1)  # (N * top_k,)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = order // self.top_k  # token of each sorted routing
        w = weights.reshape(-1)[order, None]  # (N * top_k, 1)
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(counts):
            if n:
                sel = slice(start, start + n)
                out.index_add_(0, rows[sel], self.experts[e](h[rows[sel]]) * w[sel])
                start += n
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if self.training and self.aux_coef > 0 and torch.is_grad_enabled():
            aux = load_balancing_loss([logits], self.num_experts, self.top_k)
            out = AddAuxLoss.apply(out, aux * self.aux_coef)
        return out.view(B, T, d)

    def fuse(self) -> None:
        for expert in [*self.experts, self.shared_expert]:
            if expert is not None:
                expert.fuse()


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, i: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config) if config.is_sparse_layer(i) else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        plan: AttentionPlan,
        cache: LayerCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2MoeModel(Qwen2Model):
    """Qwen2's decoder stack (embedding, rotary, masks, cache) with MoE decoder layers."""

    def make_layer(self, config: ModelConfig, i: int) -> nn.Module:
        return DecoderLayer(config, i)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """The Qwen2-MoE / Qwen3-MoE language model: token ids in, next-token logits out."""

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def router_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each sparse layer's router logits (B*T, num_experts) for ``input_ids`` (B, T)."""
        found: list[torch.Tensor] = []
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda _m, _i, out: found.append(out))
            for layer in self.model.layers
            if isinstance(layer.mlp, SparseMoeBlock)
        ]
        try:
            self.model(input_ids)
        finally:
            for hook in hooks:
                hook.remove()
        return found
