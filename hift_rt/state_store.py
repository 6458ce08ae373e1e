"""Where each group's optimizer state lives, and the transfers that move it.

Each group g owns one fp32 *state blob* of `sizes[g]` elements: its state buffers one after the
other (e.g. exp_avg | exp_avg_sq | master), each as long as the group's flat parameter buffer.

- offload=False: every blob stays on the parameters' device.
- offload=True: blobs live in host buffers of the transfer engine (pinned under CUDA); the active
  group's blob sits in one device *slot* sized for the largest blob. Rotating from g to h swaps
  the slot: g's blob goes out (D2H) while h's comes in (H2D), chunk by chunk, on the engine's
  streams; both start after the work queued so far on the compute stream (g's update kernel),
  and the compute stream waits for h's arrival device-side, right before h's update.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Dict, List, Optional, Sequence

import torch

from .engine import HostBuffer, TransferEngine


class StateStore:
    def __init__(self, sizes: Sequence[int], device: torch.device, engine: Optional[TransferEngine]):
        self.sizes = list(sizes)
        self.device = device
        self.engine = engine
        self._pending: Dict[int, List[int]] = {}  # group -> tickets its slot contents wait on
        self._resident: Optional[int] = None  # the group whose blob is in the slot
        # Exposed transfer: how long the compute stream sat waiting for a prefetch. On CUDA a
        # timing event on each side of the wait (resolved later, never synchronizing); on the
        # host backend the wall time of the blocking wait.
        self._waits: deque = deque()
        self._waited_seconds = 0.0
        if engine is None:
            self._blobs = [torch.zeros(n, dtype=torch.float32, device=device) for n in self.sizes]
            self._hosts: List[Optional[HostBuffer]] = []
            self._slot = None
        else:
            self._blobs = []
            self._hosts = [engine.alloc_host(4 * n) if n else None for n in self.sizes]
            self._slot = torch.zeros(max(self.sizes, default=0), dtype=torch.float32, device=device)

    @property
    def offloaded(self) -> bool:
        return self.engine is not None

    def device_bytes(self) -> int:
        """Bytes of state on the device: the slot, or every blob."""
        if self.offloaded:
            return self._slot.numel() * 4
        return sum(b.numel() * 4 for b in self._blobs)

    def host_bytes(self) -> int:
        return sum(4 * n for n in self.sizes) if self.offloaded else 0

    def _host(self, g: int) -> torch.Tensor:
        return self._hosts[g].view(torch.float32)

    # -- the active group --------------------------------------------------------------------
    def view(self, g: int) -> torch.Tensor:
        """g's blob on the device, (sizes[g],) fp32; g must be the resident group when offloaded."""
        if not self.offloaded:
            return self._blobs[g]
        if self._resident != g:
            raise RuntimeError(f"group {g}'s state is not on the device (group {self._resident}'s is)")
        return self._slot[:self.sizes[g]]

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
        completed so far (all of them after a device synchronize)."""
        self._resolve_waits()
        return self._waited_seconds

    def load(self, g: int) -> None:
        """Bring g's blob into the empty slot (at wrap and after load_state_dict)."""
        self._resident = g
        if self.sizes[g]:
            self._pending[g] = [self.engine.h2d(self._slot[:self.sizes[g]], self._host(g))]

    def switch(self, g: int, h: int) -> None:
        """Evict resident g to its host buffer and bring h into the slot, pipelined: the common
        length moves as one swap (both directions at once), the longer blob's tail as a plain copy."""
        assert self._resident == g and g != h
        ng, nh = self.sizes[g], self.sizes[h]
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

    # -- checkpoints -------------------------------------------------------------------------
    def read(self, g: int) -> torch.Tensor:
        """g's blob as it is now: a CPU copy for the resident group, a view of its host buffer
        (no transfer touching it any more) for an evicted one, the device blob without offload.
        Views are live, as torch's state_dict tensors are: a later eviction of g rewrites them;
        they stay valid after close()."""
        if not self.offloaded:
            return self._blobs[g]
        if self.sizes[g] == 0:
            return torch.zeros(0)
        if self._resident == g:
            # Wait on the host, keeping the tickets: the next update still orders the compute
            # stream after them (whatever stream or thread this read runs on).
            for ticket in self._pending.get(g, []):
                self.engine.wait(ticket)
            return self._slot[:self.sizes[g]].to("cpu", copy=True)
        host = self._host(g)
        self.engine.wait_tensor(host)
        return host

    def write(self, g: int, values: torch.Tensor) -> None:
        """Overwrite g's blob (load_state_dict). Offloaded: written to the host buffer; the
        resident group is then reloaded with load()."""
        if not self.offloaded:
            self._blobs[g].copy_(values)
            return
        if self.sizes[g] == 0:
            return
        host = self._host(g)
        self.engine.wait_tensor(host)
        host.copy_(values)

    def close(self) -> None:
        for h in self._hosts:
            if h is not None:
                h.free()
        self._hosts = []
