"""Data parallelism for HiFT over torch.distributed (NCCL on GPUs, gloo on CPUs; launched with
torchrun). Only the active group has gradients, so each step exchanges one group's bytes:

- every rank holds the whole model and runs its own micro-batch;
- at step(), the active group's flat gradient is reduce-scattered (averaged, as DDP averages):
  rank r gets the r-th of R equal contiguous shards of the group's flat buffer;
- rank r updates its shard with the optimizer state of its shard of every group (host memory per
  rank is 1/R of the state), then the updated shards are all-gathered into the flat buffer;
- global quantities agree: the clip norm is one all-reduced scalar (on the device), inf/NaN skipping
  and which parameters have gradients are all-reduced too, and the random order is the same on
  every rank (the seed is checked at wrap, with the model and the grouping).

Traffic per step: about 2 x (the active group's bytes) (reduce-scatter + all-gather), against DDP's
2 x (the model's bytes); `counters()` has the bytes each collective moved. Collectives that carry
host-side metadata (flags, checkpoints) run on a gloo group (the process group itself when it is
gloo), so they never synchronize the device. Every collective is torch.distributed's, under the
process group's timeout: a rank that dies makes the others raise after that timeout (set it with
`torch.distributed.init_process_group(timeout=...)`), never hang.

Owns Communicator; may call torch.distributed only.
"""
from __future__ import annotations

import pickle
from collections import Counter
from typing import List, Optional

import torch
import torch.distributed as dist


# torch 2.13 renamed the two collectives HiFT's step needs (the old names warn); older torch has
# only the old ones.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve(process_group) -> Optional["Communicator"]:
    """process_group=None: the default group when torch.distributed is initialized with more than
    one rank (None otherwise: nothing to communicate); False: none; a ProcessGroup: that one, even
    of one rank (the collectives then run, trivially: how a single GPU exercises the NCCL path)."""
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        process_group = dist.group.WORLD
    return Communicator(process_group)


class _Released:
    """Stands for the process group a closed Communicator let go of: torch refuses it by name in
    any collective (None would silently mean the default group)."""

    def __repr__(self) -> str:
        return "<process group released by a closed hift_rt optimizer>"


_RELEASED = _Released()


class Communicator:
    """The collectives of one process group, with byte counters."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # Host-side metadata travels over gloo: CPU tensors, no device synchronization. Only the
        # group's members call wrap, so the new group is built by them alone (without
        # use_local_synchronization every rank of the world would have to enter new_group).
        self._own_host_group = backend != "gloo"
        self.host_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                         use_local_synchronization=True) if self._own_host_group else group
        self._bytes: Counter = Counter()

    def close(self) -> None:
        """Destroy the gloo group this communicator built, and let go of the caller's group (which
        stays). A closed optimizer kept alive by the training script must not keep the group
        alive past destroy_process_group: its gloo threads would then run into the interpreter's
        teardown, and one that drops a finished collective's tensors there aborts the process."""
        if self._own_host_group:
            dist.destroy_process_group(self.host_group)
            self._own_host_group = False
        self.group = self.host_group = _RELEASED

    def shard(self, n: int):
        """[lo, hi): this rank's contiguous share of n elements (n a multiple of the world size)."""
        size = n // self.world
        return self.rank * size, (self.rank + 1) * size

    # -- the step ----------------------------------------------------------------------------
    def reduce_scatter_mean(self, shard: torch.Tensor, full: torch.Tensor) -> None:
        """shard (n / R,) = this rank's part of the mean over ranks of full (n,)."""
        _reduce_scatter(shard, full, group=self.group)
        shard.div_(self.world)
        self._bytes["reduce_scatter"] += full.numel() * full.element_size()

    def all_gather_in_place(self, full: torch.Tensor) -> None:
        """full (n,): every rank's shard from its owner."""
        lo, hi = self.shard(full.numel())
        _all_gather(full, full[lo:hi], group=self.group)
        self._bytes["all_gather"] += full.numel() * full.element_size()

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """In place, on the device: clip norms, found_inf, replicated gradients."""
        dist.all_reduce(tensor, op=op, group=self.group)
        self._bytes["all_reduce"] += tensor.numel() * tensor.element_size()

    def any(self, flags: List[bool]) -> List[bool]:
        """Element-wise OR of host-side flags over ranks (e.g. which parameters got a gradient)."""
        t = torch.tensor(flags, dtype=torch.uint8)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return [bool(x) for x in t.tolist()]

    # -- wrap and checkpoints ----------------------------------------------------------------
    def check_same(self, description: dict) -> None:
        """Raise on every rank, naming the first difference, unless every rank's `description`
        (the model's parameters, the grouping and the settings) equals rank 0's."""
        descriptions: List[Optional[dict]] = [None] * self.world
        dist.all_gather_object(descriptions, description, group=self.host_group)
        for rank, other in enumerate(descriptions):
            difference = _first_difference(descriptions[0], other)
            if difference:
                raise ValueError(f"hift_rt.wrap under torch.distributed: rank {rank} differs from rank 0 in "
                                 f"{difference}; every rank must wrap the same model with the same settings")

    def gather_to_first(self, shard: torch.Tensor) -> Optional[torch.Tensor]:
        """Rank 0: the concatenation of every rank's `shard` (equal sizes), on the CPU; others None."""
        local = shard.detach().to("cpu")
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(local, parts, dst=dist.get_global_rank(self.host_group, 0), group=self.host_group)
        return torch.cat(parts) if parts is not None else None

    def counters(self) -> dict:
        """Bytes each kind of collective moved so far (per rank, the input it handed in)."""
        return dict(self._bytes)


def _first_difference(a, b, path: str = "") -> str:
    """A readable path to the first place where two nested descriptions differ, or ''."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}{key} (present on one rank only)"
            found = _first_difference(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return ""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path.rstrip('.')} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}{i}.")
            if found:
                return found
        return ""
    return "" if pickle.dumps(a) == pickle.dumps(b) else f"{path.rstrip('.')} ({a!r} vs {b!r})"
