"""One process or many: torch.distributed set up from torchrun's environment.

``torchrun --nproc-per-node N -m qwenlm train RECIPE`` (add ``--nnodes``/``--rdzv-endpoint``
for several machines) sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` joins the process
group (NCCL on CUDA, gloo on CPU). Data parallel is DDP; ``fsdp`` shards parameters, gradients
and optimizer state with FSDP2 (``fully_shard`` per decoder layer, then the whole model). A
plain run needs none of it and gets a ``Dist`` of world size 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from qwenlm.errors import QwenlmError


class DistributedError(QwenlmError):
    """A distributed setting that cannot work."""


@dataclass
class Dist:
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
            raise DistributedError("train.device is cuda, but no CUDA device is available")
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def setup(*, device: str = "auto", backend: str = "auto", timeout_s: float = 1800) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
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


def wrap(module: nn.Module, layers: list[nn.Module], d: Dist, strategy: str) -> nn.Module:
    """Wrap the training module for data parallelism (``ddp``) or sharding (``fsdp``).

    ``layers`` (the decoder blocks) become FSDP2's units: each is gathered just before it runs
    and freed after, so one block's full weights are in memory at a time.
    """
    if not d.active:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module, device_ids=[d.device.index] if d.device.type == "cuda" else None
    )
