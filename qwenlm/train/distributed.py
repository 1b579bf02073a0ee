"""Training on many processes: DDP or FSDP2 over the process group torchrun starts.

``torchrun --nproc-per-node N -m qwenlm train RECIPE`` (add ``--nnodes``/``--rdzv-endpoint``
for several machines) sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`setup` (from
:mod:`qwenlm.parallel`) joins the process group (NCCL on CUDA, gloo on CPU). Data parallel is
DDP; ``fsdp`` shards parameters, gradients and optimizer state with FSDP2 (``fully_shard`` per
decoder layer, then the whole model). A plain run needs none of it and gets a ``Dist`` of world
size 1.
"""

from __future__ import annotations

from torch import nn

from qwenlm.parallel import Dist, DistributedError, setup

__all__ = ["Dist", "DistributedError", "setup", "wrap"]


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
