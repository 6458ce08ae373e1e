"""The processes of a job under torchrun: rank, world and local rank from the environment,
joining torch.distributed, and the job's agreements over it (errors, Ctrl-C, sums of figures).

Owns: Ranks, launched_rank. May call: torch.distributed, hift_rt.job.errors.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch
import torch.distributed as dist

from .errors import JobError, first_line


def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise JobError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number (torchrun sets it)") from None


def launched_rank() -> int:
    """This process's rank as torchrun's environment gives it (RANK), 0 outside torchrun: the rank
    that prints."""
    try:
        return int(os.environ.get("RANK", "0")) if _torchrun_world() > 1 else 0
    except (ValueError, JobError):
        return 0


class Ranks:
    """The processes of this job: rank, world (1 alone) and local_rank from torchrun's
    environment; `join(device)` initializes torch.distributed from it (NCCL for a CUDA device,
    gloo for the CPU; a process group that is already initialized is used as it is). The job's own
    agreements travel over a gloo group (host flags: no device synchronization). Alone, every
    agreement is the identity and nothing is initialized."""

    def __init__(self):
        self.world = _torchrun_world()
        self.rank = self.local_rank = 0
        self.host_group = None
        self.owns_group = False
        if self.world > 1:
            try:
                self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            except (KeyError, ValueError):
                raise JobError(f"WORLD_SIZE is {self.world} but RANK and LOCAL_RANK are not both set to numbers: "
                               "start the job with torchrun") from None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device) -> None:
        if self.world == 1:
            return
        if not dist.is_available():
            raise JobError(f"WORLD_SIZE is {self.world} but this torch has no torch.distributed")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
            except (RuntimeError, ValueError) as exc:
                raise JobError(f"cannot join the torchrun job's process group ({first_line(exc)})") from None
            self.owns_group = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
            raise JobError(f"torch.distributed has rank {dist.get_rank()} of {dist.get_world_size()}; "
                           f"the environment says RANK {self.rank} of WORLD_SIZE {self.world}")
        gloo = dist.get_backend() == "gloo"
        self.host_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")

    def leave(self) -> None:
        if self.owns_group:
            gc.collect()  # what still holds the group (a DDP reducer in a cycle) goes first
            dist.destroy_process_group()
            self.owns_group = False

    @contextlib.contextmanager
    def agree(self):
        """Run the block on every rank; where it raised JobError on some rank, raise one on every
        rank: rank 0's, else the first failing rank's (named). Every rank must enter the block."""
        error = None
        try:
            yield
        except JobError as exc:
            if self.world == 1:
                raise
            error = str(exc)
        if self.world == 1:
            return
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.host_group)
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            rank, text = failed[0]
            raise JobError(text if rank == 0 else f"rank {rank}: {text}")

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (a collective)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def mean(self, value: float) -> float:
        """The mean over ranks of `value` (a collective)."""
        if self.world == 1:
            return value
        return float(self.sum(torch.tensor([value], dtype=torch.float64))) / self.world

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a float64 CPU tensor (a collective)."""
        if self.world > 1:
            dist.all_reduce(values, group=self.host_group)
        return values
