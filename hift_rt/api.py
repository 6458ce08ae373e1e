"""hift_rt.wrap: the one call that turns a model into a HiFT set-up, choosing the optimizer for
how the model is laid out: HiFTOptimizer for a model on one device (data parallel through
process_group=), hift_rt.fsdp.FSDPHiFTOptimizer for a model sharded by FSDP2.

Owns wrap. May call hift_rt.config, hift_rt.optimizer, hift_rt.fsdp, hift_rt.wrappers.
"""
from __future__ import annotations

from typing import Union

from torch import nn

from .config import HiFTConfig
from .fsdp import FSDPHiFTOptimizer
from .optimizer import HiFTOptimizer
from .wrappers import is_fully_sharded


def wrap(model: nn.Module, optim: Union[str, type] = "adamw", **arguments) -> HiFTOptimizer:
    """Turn `model` into a HiFT fine-tuning set-up; returns its optimizer.

    Call it after the model is on its device and dtype. The model stays a plain nn.Module. A model
    sharded by FSDP2 (fully_shard: its parameters are DTensors) gets hift_rt.fsdp's optimizer,
    which works on each rank's local shards.

    optim: "adamw", "adam", "adagrad", "sgd" (fused kernels), or a torch.optim.Optimizer subclass
        run per group over the group's flat tensor (its state offloaded like ours).
    lr (required): the learning rate (param_groups[0]["lr"], which schedulers drive).
    strategy: "bottom_up" (default), "top_down" or "random" (a fresh permutation per cycle, from `seed`).
    units_per_group: consecutive units (input side, each block, output side) per group (default 1).
    groups: lists of parameter-name prefixes, one list per group, bottom to top (overrides units).
    offload: "auto" (state of inactive groups in pinned host memory when on CUDA), True, False.
    lr_policy: "step" (default: every step applies the scheduled lr) or "cycle" (HiFT's per-cycle
        lr: a cycle holds the largest lr scheduled so far in it, i.e. its first value while the
        schedule decays and the schedule itself while it rises, as in a warmup from 0).
    max_grad_norm: clip the active group's gradient to this norm (computed on the device).
    no_decay: parameter-name substrings that get no weight decay, e.g. ("bias", "norm"), or a
        function name -> bool.
    master_weights: for bf16/fp16 parameters, "fp32" (an fp32 master copy; True and "auto" mean
        it too), "kahan" (a compensation buffer in the parameters' dtype: parameter +
        compensation tracks the fp32 trajectory closely at 2 bytes per parameter) or False (plain
        low-precision updates: lossy). fp32 parameters are their own master.
    state_dtype: how the fused optimizers store their moments: "fp32" (default), "bf16", or
        "int8" (blockwise 8-bit dynamic code, one fp32 absmax per 128 elements).
    seed: the random order's seed.
    state_window: with offload, the device bytes an offloaded group's state streams through:
        "auto" (see HiFTConfig.window_bytes), None (the whole largest group's state on the
        device, as one slot), or a byte count. A torch.optim class keeps whole groups.
    Any other keyword is the optimizer's own option, with torch's names and defaults (betas, eps,
    weight_decay, momentum, ...). See HiFTConfig.
    """
    config = HiFTConfig.from_arguments(optim, **arguments)
    if isinstance(model, nn.Module) and is_fully_sharded(model):
        return FSDPHiFTOptimizer(model, config)
    return HiFTOptimizer(model, config)
