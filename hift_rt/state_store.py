"""Where each group's optimizer state lives, and the transfers that move it: the one door for state
residency, used by every updater.

A group's state is a list of named flat buffers ("fields", any dtype: fp32 moments, an fp32
master, a torch optimizer's own state tensors, ...), packed one after the other, each starting
64-byte aligned, into one byte *blob* per group.

- offload=False: every blob is a device tensor.
- offload=True: blobs live in host buffers of the transfer engine (pinned under CUDA); the active
  group's blob sits in one device *slot* sized for the largest blob. Rotating from g to h swaps
  the slot: g's blob goes out (D2H) while h's comes in (H2D), chunk by chunk, on the engine's
  streams; both start after the work queued so far on the compute stream (g's update), and the
  compute stream waits for h's arrival device-side, right before h's update (make_ready).

Owns StateStore; may call hift_rt.engine only.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Dict, List, NamedTuple, Optional

import torch

from .engine import HostBuffer, TransferEngine

FIELD_ALIGN = 64  # bytes: every field starts 16-byte aligned for 128-bit accesses, and cache-line aligned


class Field(NamedTuple):
    """One flat buffer of a group's state: (numel,) elements of dtype."""
    name: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _offsets(fields: List[Field]):
    """Byte offset of each field in a blob, and the blob's size."""
    offsets, end = [], 0
    for f in fields:
        offsets.append(end)
        end += -(-f.nbytes // FIELD_ALIGN) * FIELD_ALIGN
    return offsets, end


def _views(blob: torch.Tensor, fields: List[Field]) -> Dict[str, torch.Tensor]:
    """The fields of a (nbytes,) uint8 blob, as typed (numel,) views."""
    offsets, _ = _offsets(fields)
    return {f.name: blob[off:off + f.nbytes].view(f.dtype) for f, off in zip(fields, offsets)}


class StateStore:
    """The state of k groups on `device`, offloaded through `engine` when one is given."""

    def __init__(self, k: int, device: torch.device, engine: Optional[TransferEngine]):
        self.device = device
        self.engine = engine
        self._fields: List[List[Field]] = [[] for _ in range(k)]
        self._blobs: List[Optional[torch.Tensor]] = [None] * k  # device blobs (offload=False)
        self._hosts: List[Optional[HostBuffer]] = [None] * k  # host buffers (offload=True)
        self._slot = torch.zeros(0, dtype=torch.uint8, device=device)
        self._resident: Optional[int] = None  # the group whose blob is in the slot
        self._pending: Dict[int, List[int]] = {}  # group -> tickets its slot contents wait on
        # Exposed transfer: how long the compute stream sat waiting for a prefetch. On CUDA a
        # timing event on each side of the wait (resolved later, never synchronizing); on the
        # host backend the wall time of the blocking wait.
        self._waits: deque = deque()
        self._waited_seconds = 0.0

    @property
    def offloaded(self) -> bool:
        return self.engine is not None

    @property
    def resident(self) -> Optional[int]:
        """The group whose blob is in the slot (offloaded)."""
        return self._resident

    def nbytes(self, g: int) -> int:
        return _offsets(self._fields[g])[1]

    def fields(self, g: int) -> List[Field]:
        return list(self._fields[g])

    def device_bytes(self) -> int:
        """Bytes of state on the device: the slot, or every blob."""
        if self.offloaded:
            return self._slot.numel()
        return sum(b.numel() for b in self._blobs if b is not None)

    def host_bytes(self) -> int:
        return sum(h.nbytes for h in self._hosts if h is not None)

    # -- layout ------------------------------------------------------------------------------
    def define(self, g: int, fields: List[Field], values: Dict[str, torch.Tensor]) -> None:
        """Set group g's fields and their contents (each value a tensor of the field's numel, on
        any device). At wrap for every group; again when an optimizer creates its state on a
        group's first step (g is then the resident group). Offloaded, a resident g is placed in
        the slot (grown if needed), any other g in its host buffer."""
        # A value may be a view of the slot (a resident group's old fields) that the new layout
        # overwrites before reading it: copy those first.
        slot = self._slot.untyped_storage().data_ptr()
        values = {k: v.clone() if v.untyped_storage().data_ptr() == slot else v for k, v in values.items()}
        self._fields[g] = list(fields)
        nbytes = self.nbytes(g)
        if not self.offloaded:
            self._blobs[g] = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            self._fill(_views(self._blobs[g], fields), values)
            return
        if self._hosts[g] is not None:
            self._hosts[g].free()  # waits for the transfers that still touch it
        self._hosts[g] = self.engine.alloc_host(max(nbytes, 1))
        if self._resident == g:
            # The slot's old contents may still be arriving, and the tail of the previous group's
            # eviction may still be reading bytes the new layout covers: wait for all of it (on
            # the host; this happens once per group, on its first step).
            self.make_ready(g)
            self.engine.wait_tensor(self._slot)
            if self._slot.numel() < nbytes:
                self._slot = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            self._fill(self.views(g), values)
        else:
            self._fill(self.host_views(g), values)

    @staticmethod
    def _fill(views: Dict[str, torch.Tensor], values: Dict[str, torch.Tensor]) -> None:
        for name, view in views.items():
            view.copy_(values[name].reshape(-1))

    def reserve_slot(self) -> None:
        """Size the slot for the largest blob defined so far (offloaded; after the groups are defined)."""
        largest = max(self.nbytes(g) for g in range(len(self._fields)))
        if self.offloaded and self._slot.numel() < largest:
            self._slot = torch.zeros(largest, dtype=torch.uint8, device=self.device)

    # -- views -------------------------------------------------------------------------------
    def views(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields on the device; offloaded, g must be the resident group (its contents may still
        be arriving: make_ready orders the current stream after them)."""
        if not self.offloaded:
            return _views(self._blobs[g], self._fields[g])
        if self._resident != g:
            raise RuntimeError(f"group {g}'s state is not on the device (group {self._resident}'s is)")
        return _views(self._slot[:self.nbytes(g)], self._fields[g])

    def host_views(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields in its host buffer (offloaded), as they are: possibly under a transfer."""
        return _views(self._hosts[g].view(torch.uint8, 0, max(self.nbytes(g), 1)), self._fields[g])

    # -- the active group --------------------------------------------------------------------
    def make_ready(self, g: int) -> None:
        """Order the current stream after g's arrival in the slot (device side; the host backend
        blocks instead)."""
        tickets = self._pending.pop(g, [])
        if not tickets:
            return
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record(stream)
            for ticket in tickets:
                self.engine.wait(ticket, stream)
            after.record(stream)
            self._waits.append((before, after))
            self._resolve_waits()
        else:
            start = time.perf_counter()
            for ticket in tickets:
                self.engine.wait(ticket)
            self._waited_seconds += time.perf_counter() - start

    def _resolve_waits(self) -> None:
        while self._waits and self._waits[0][1].query():
            before, after = self._waits.popleft()
            self._waited_seconds += before.elapsed_time(after) / 1e3

    def exposed_wait_seconds(self) -> float:
        """Total time the compute stream waited for state to arrive, over the waits that have
        completed so far (all of them after a device synchronize). 0 without offload."""
        self._resolve_waits()
        return self._waited_seconds

    def load(self, g: int) -> None:
        """Bring g's blob into the slot, whose contents are not needed (at wrap, after loading a
        checkpoint)."""
        self._resident = g
        nbytes = self.nbytes(g)
        self._pending[g] = [self.engine.h2d(self._slot[:nbytes], self._host(g))] if nbytes else []

    def switch(self, g: int, h: int) -> None:
        """Evict resident g to its host buffer and bring h into the slot, pipelined: the common
        length moves as one swap (both directions at once), the longer blob's tail as a plain copy."""
        if self._resident != g or g == h:
            raise RuntimeError(f"state store: switch({g}, {h}) with group {self._resident} resident")
        ng, nh = self.nbytes(g), self.nbytes(h)
        common = min(ng, nh)
        tickets = []
        if common:
            tickets.append(self.engine.swap(self._slot[:common], self._host(g)[:common], self._host(h)[:common]))
        if ng > common:
            self.engine.d2h(self._host(g)[common:], self._slot[common:ng])
        if nh > common:
            tickets.append(self.engine.h2d(self._slot[common:nh], self._host(h)[common:]))
        self._pending.pop(g, None)
        self._pending[h] = tickets
        self._resident = h

    def _host(self, g: int) -> torch.Tensor:
        """g's blob in its host buffer, (nbytes,) uint8."""
        return self._hosts[g].view(torch.uint8, 0, max(self.nbytes(g), 1))[:self.nbytes(g)]

    # -- checkpoints -------------------------------------------------------------------------
    def read(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields as they are now, after every transfer touching them: a CPU copy for the
        resident group, views of its host buffer for an evicted one (live: a later eviction of g
        rewrites them; they stay valid after close()), the device blob's views without offload."""
        if not self.offloaded:
            return self.views(g)
        if self._resident == g:
            # Wait on the host, keeping the tickets: the next update still orders the compute
            # stream after them (whatever stream or thread this read runs on).
            for ticket in self._pending.get(g, []):
                self.engine.wait(ticket)
            return {name: v.to("cpu", copy=True) for name, v in self.views(g).items()}
        self.engine.wait_tensor(self._host(g))
        return self.host_views(g)

    def write(self, g: int, values: Dict[str, torch.Tensor]) -> None:
        """Overwrite g's fields (same layout). Offloaded: into its host buffer, and into the slot
        too when g is resident."""
        if not self.offloaded:
            self._fill(self.views(g), values)
            return
        self.engine.wait_tensor(self._host(g))
        self._fill(self.host_views(g), values)
        if self._resident == g:
            self.load(g)

    def close(self) -> None:
        for h in self._hosts:
            if h is not None:
                h.free()
        self._hosts = [None] * len(self._hosts)
