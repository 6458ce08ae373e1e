"""What other libraries did to a model before hift_rt.wrap sees it: parameters sharded by FSDP2
(DTensors: hift_rt.fsdp takes those), or modules wrapped in DistributedDataParallel or FSDP1,
which are refused.

Owns is_fully_sharded and check_not_wrapped. May call torch.distributed only; hift_rt.optimizer
and hift_rt.fsdp both read it (so neither imports the other to ask).
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

if dist.is_available():
    from torch.distributed.tensor import DTensor
else:  # a torch built without distributed: nothing can be sharded
    DTensor = None


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether some parameter of `model` is a DTensor, as FSDP2's sharded parameters are."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def check_not_wrapped(model: nn.Module) -> None:
    """Refuse a model (or a submodule) wrapped in DistributedDataParallel or in FSDP1
    (FullyShardedDataParallel): their hooks and flat parameters work against hift_rt's."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, DistributedDataParallel):
            what = "DistributedDataParallel"
        elif isinstance(module, FullyShardedDataParallel):
            what = "FSDP1's FullyShardedDataParallel"
        else:
            continue
        where = f"module '{name}' is" if name else "the model is"
        raise ValueError(
            f"hift_rt.wrap: {where} wrapped in {what}, which synchronizes gradients (and flattens "
            "parameters) in ways hift_rt cannot work under. Pass the plain model: for data parallelism "
            "hift_rt exchanges the active group itself (process_group= picks the group; by default the "
            "one torch.distributed was initialized with); for a model whose weights do not fit one GPU, "
            "shard it with FSDP2's fully_shard (torch.distributed.fsdp.fully_shard, each block and then "
            "the root) and wrap the sharded model")
