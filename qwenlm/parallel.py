"""Many processes: torch.distributed from torchrun's environment, and tensor parallelism as a
transform on a built model.

``torchrun --nproc-per-node N ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` joins
the process group (NCCL on CUDA, gloo on CPU), or returns a :class:`Dist` of world size 1 for a
plain run. Training wraps models in DDP / FSDP2 (``qwenlm.train.distributed``); the evaluator
shards samples over ranks; inference splits one model over ranks with :func:`tensor_parallel`.

Tensor parallelism (Megatron-LM's layout): each rank holds 1/N of every decoder layer.

- Attention: the query heads and the key/value heads are split; ``q_proj``/``k_proj``/``v_proj``
  keep their heads' output rows (column-parallel), ``o_proj`` the matching input columns
  (row-parallel), and the partial outputs are summed across ranks: one all-reduce per
  attention. Each rank's KV cache holds its own heads. With more ranks than key/value heads
  (the 0.5B has 2), each key/value head is replicated on the ranks whose query heads use it.
- MLP: ``gate_proj``/``up_proj`` keep 1/N of the intermediate rows, ``down_proj`` the matching
  columns; one all-reduce. A mixture of experts splits every expert (and the shared expert) the
  same way, routes on every rank identically (the router is replicated and sees the same
  hidden state), and sums the whole block's output once.
- Embedding and output head: split along the vocabulary. A token's row lives on one rank, the
  others contribute zeros to an all-reduce; each rank computes its slice of the logits and an
  all-gather gives every rank all of them.

So a rank holds ~1/N of the weights (norms, the router and the rotary tables are replicated)
and a forward pass costs 2 all-reduces per layer plus two for the ends. The transform is for
inference: the collectives are not autograd-aware.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qwenlm.config import ModelConfig
from qwenlm.errors import QwenlmError
from qwenlm.models.qwen2_moe import SparseMoeBlock


class DistributedError(QwenlmError):
    """A distributed setting that cannot work."""


@dataclass
class Dist:
    """This process's place among the processes torchrun started (world size 1 alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` (same shape everywhere) from every process, in rank order."""
        if not self.active:
            return [t]
        t = t.to(self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [x.cpu() for x in out]

    def broadcast_ints(self, values: list[int] | None) -> list[int]:
        """Rank 0's ``values`` on every process (the others pass None)."""
        if not self.active:
            return list(values or [])
        n = torch.tensor([len(values) if self.is_main else 0], device=self._comm_device)
        dist.broadcast(n, src=0)
        t = (
            torch.tensor(values, dtype=torch.int64, device=self._comm_device)
            if self.is_main
            else torch.empty(int(n.item()), dtype=torch.int64, device=self._comm_device)
        )
        dist.broadcast(t, src=0)
        return t.tolist()

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """``data`` from every process, in rank order (any lengths; e.g. JSON text)."""
        if not self.active:
            return [data]
        sizes = [int(t.item()) for t in self.gather(torch.tensor([len(data)]))]
        buf = torch.zeros(max(sizes), dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return [t[:n].numpy().tobytes() for t, n in zip(self.gather(buf), sizes, strict=True)]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("the device is cuda, but no CUDA device is available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def setup(*, device: str = "auto", backend: str = "auto", timeout_s: float = 1800) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone.

    Each process gets its own GPU (``cuda:LOCAL_RANK``) when ``device`` is ``auto`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return Dist(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedError(
            "the nccl backend needs CUDA devices", hint="use backend gloo on CPU"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev, backend=backend)


class StepChannel:
    """Rank 0 sends lists of integers to every other rank, in order.

    It runs on a CPU (gloo) group of its own whatever the compute backend: a rank waiting for
    the next message blocks in a CPU call, not in a GPU kernel spinning on NCCL, and may wait
    as long as a server stays idle (the group's deadline is a year). Every rank must create it
    at the same point (creating a group is collective).
    """

    IDLE = datetime.timedelta(days=365)

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo", timeout=self.IDLE)
        self.rank = dist.get_rank()

    def send(self, values: list[int]) -> None:
        """Rank 0 only: ``values`` to every other rank."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(torch.tensor([t.numel()]), src=0, group=self.group)
        dist.broadcast(t, src=0, group=self.group)

    def receive(self) -> list[int]:
        """The other ranks: the next list rank 0 sends."""
        n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, src=0, group=self.group)
        t = torch.empty(int(n.item()), dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.group)
        return t.tolist()


# -- tensor parallelism -------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """What a tensor-parallel model holds on this rank (``model.shard``)."""

    rank: int
    world: int
    heads: int  # query heads on this rank
    kv_heads: int  # key/value heads on this rank: its part of the KV cache
    group: Any = None  # the process group (None: the default one)


def split_heads(config: ModelConfig, world: int) -> tuple[int, int]:
    """Query and key/value heads per rank for ``world`` ranks.

    Key/value heads are split when ``world`` divides their number, and replicated (one per
    rank, shared by the ranks of its query group) when their number divides ``world``.
    """
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    if H % world:
        raise DistributedError(
            f"tensor parallelism over {world} ranks needs a divisor of the model's {H} "
            "attention heads",
            hint=f"use a rank count that divides {H}",
        )
    if Hkv % world == 0:
        return H // world, Hkv // world
    if world % Hkv == 0:
        return H // world, 1
    raise DistributedError(
        f"tensor parallelism over {world} ranks: the model's {Hkv} key/value heads can be "
        "neither split nor replicated evenly",
        hint=f"use a rank count that divides {Hkv} or is a multiple of it (and divides {H})",
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` around existing tensors (nothing allocated twice)."""
    with torch.device("meta"):
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    m.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias, requires_grad=False)
    return m


def _rows(m: nn.Linear, a: int, b: int) -> nn.Linear:
    """Column-parallel: output rows a..b (a copy, so the full matrix can be freed)."""
    bias = None if m.bias is None else m.bias.detach()[a:b].clone()
    return _linear(m.weight.detach()[a:b].clone(), bias)


def _columns(m: nn.Linear, a: int, b: int) -> nn.Linear:
    """Row-parallel: input columns a..b, without the bias (added once, after the sum)."""
    return _linear(m.weight.detach()[:, a:b].contiguous(), None)


def _check_plain(m: nn.Module, what: str) -> None:
    if type(m) is not nn.Linear:
        raise DistributedError(
            f"tensor_parallel needs plain nn.Linear layers, but {what} is {type(m).__name__}",
            hint="apply it to the float model, before quantize() and fuse_projections()",
        )


class RowParallelLinear(nn.Module):
    """A linear layer holding some input columns; the ranks' partial outputs are summed."""

    def __init__(self, linear: nn.Module, bias: torch.Tensor | None, group: Any) -> None:
        super().__init__()
        self.linear = linear  # plain or quantized: quantize() may swap it
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x).contiguous()
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int, int]:
    """(first row, end, rows per rank): equal parts, the last padded with zero rows."""
    per = -(-vocab // world)
    return min(rank * per, vocab), min((rank + 1) * per, vocab), per


def _vocab_rows(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    a, b, per = _vocab_range(weight.shape[0], rank, world)
    out = weight.new_zeros(per, weight.shape[1])
    out[: b - a] = weight[a:b]
    return out


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table; other ranks' tokens look up zeros here, and an
    all-reduce gives every rank every token's row (exactly: one term is non-zero)."""

    def __init__(self, embedding: nn.Module, start: int, stop: int, group: Any) -> None:
        super().__init__()
        self.embedding = embedding  # plain or quantized (Int8Embedding)
        self.start, self.stop = start, stop
        self.group = group

    @property
    def weight(self) -> torch.Tensor:
        """This rank's rows (for dtype and device checks)."""
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.stop)
        x = self.embedding(torch.where(inside, ids - self.start, 0))
        x = x.masked_fill(~inside[..., None], 0).contiguous()
        dist.all_reduce(x, group=self.group)
        return x


class VocabParallelHead(nn.Module):
    """The output head's rows for this rank's vocabulary slice; logits are all-gathered."""

    def __init__(self, linear: nn.Module, vocab_size: int, world: int, group: Any) -> None:
        super().__init__()
        self.linear = linear
        self.vocab_size = vocab_size
        self.world = world
        self.group = group

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.linear(h).contiguous()  # (..., vocab / world)
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def _sum_over_ranks(group: Any):
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.contiguous()
        dist.all_reduce(out, group=group)
        return out

    return hook


def _split_mlp(mlp: nn.Module, rank: int, world: int, group: Any, *, reduce: bool) -> None:
    """gate/up keep this rank's intermediate rows, down the matching columns; with ``reduce``
    the down projection sums over ranks, else its output is this rank's partial sum."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        _check_plain(getattr(mlp, name), name)
    size = mlp.gate_proj.out_features
    a, b = rank * size // world, (rank + 1) * size // world  # the sum needs no equal parts
    mlp.gate_proj = _rows(mlp.gate_proj, a, b)
    mlp.up_proj = _rows(mlp.up_proj, a, b)
    down = mlp.down_proj
    local = _columns(down, a, b)
    bias = None if down.bias is None else down.bias.detach().clone()
    mlp.down_proj = RowParallelLinear(local, bias, group) if reduce else local


def _split_attention(
    attn: nn.Module, rank: int, world: int, heads: int, kv_heads: int, group: Any
) -> None:
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _check_plain(getattr(attn, name, None), f"self_attn.{name}")
    D = attn.head_dim
    ranks_per_kv = max(1, world // attn.n_kv_heads)  # > 1: key/value heads are replicated
    q0 = rank * heads
    kv0 = (rank // ranks_per_kv) * kv_heads
    attn.q_proj = _rows(attn.q_proj, q0 * D, (q0 + heads) * D)
    attn.k_proj = _rows(attn.k_proj, kv0 * D, (kv0 + kv_heads) * D)
    attn.v_proj = _rows(attn.v_proj, kv0 * D, (kv0 + kv_heads) * D)
    o = attn.o_proj
    bias = None if o.bias is None else o.bias.detach().clone()
    attn.o_proj = RowParallelLinear(_columns(o, q0 * D, (q0 + heads) * D), bias, group)
    attn.n_heads, attn.n_kv_heads = heads, kv_heads


def tensor_parallel(model: nn.Module, group: Any = None) -> nn.Module:
    """Keep this rank's part of every layer of a built (float, unfused) model, in place.

    Every rank of ``group`` (default: the whole world) calls it on the same model and then runs
    every forward pass together with the others; each gets the full logits. Apply it before
    quantization and fusing, which then work on the shards. Sets ``model.shard``
    (:class:`Shard`). Returns the model, in eval mode.
    """
    if getattr(model, "shard", None) is not None:
        raise DistributedError("the model is already split over ranks")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config: ModelConfig = model.config
    heads, kv_heads = split_heads(config, world)
    inner = model.model
    for layer in inner.layers:
        if hasattr(layer, "layer"):  # a decode fast-path wrapper
            raise DistributedError("apply tensor_parallel before accelerating the model")
        _split_attention(layer.self_attn, rank, world, heads, kv_heads, group)
        mlp = layer.mlp
        if isinstance(mlp, SparseMoeBlock):
            for expert in [*mlp.experts, mlp.shared_expert]:
                if expert is not None:
                    _split_mlp(expert, rank, world, group, reduce=False)
            # Routing and the weighted sum of experts are linear in the experts' partial
            # outputs, so the whole block is summed over ranks once.
            mlp.register_forward_hook(_sum_over_ranks(group))
        else:
            _split_mlp(mlp, rank, world, group, reduce=True)
    emb = inner.embed_tokens
    if type(emb) is not nn.Embedding:
        raise DistributedError(
            f"tensor_parallel needs a plain embedding, but it is {type(emb).__name__}",
            hint="apply it to the float model, before quantize()",
        )
    _check_plain(model.lm_head, "lm_head")
    tied = model.lm_head.weight is emb.weight
    start, stop, _ = _vocab_range(config.vocab_size, rank, world)
    table = nn.Parameter(_vocab_rows(emb.weight.detach(), rank, world), requires_grad=False)
    inner.embed_tokens = VocabParallelEmbedding(
        nn.Embedding(table.shape[0], table.shape[1], _weight=table, _freeze=True),
        start,
        stop,
        group,
    )
    head = _linear(table if tied else _vocab_rows(model.lm_head.weight.detach(), rank, world), None)
    if tied:
        head.weight = table  # one tensor for both, as in the unsplit model
    model.lm_head = VocabParallelHead(head, config.vocab_size, world, group)
    model.shard = Shard(rank, world, heads, kv_heads, group)
    return model.eval()
