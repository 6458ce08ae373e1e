"""Where each group's optimizer state lives, and the transfers that move it: the one door for state
residency, used by every updater.

A group's state is a list of named flat buffers ("fields", any dtype: fp32 moments, int8 codes
and their scales, an fp32 master, a torch optimizer's own state tensors, ...). Offloaded, a
group's fields are packed one after the other, each starting 64-byte aligned, into one byte
*blob*: one host buffer, moved as one piece.

- offload=False: every field is a device tensor.
- offload=True, whole-group *slot*: blobs live in host buffers of the transfer engine (pinned
  under CUDA); the active group's blob sits in one device slot sized for the largest blob.
  Rotating from g to h swaps the slot: g's blob goes out (D2H) while h's comes in (H2D), chunk
  by chunk, on the engine's streams; both start after the work queued so far on the compute
  stream (g's update), and the compute stream waits for h's arrival device-side, right before
  h's update (make_ready).
- offload=True, *window*: the device holds a ring of R chunk buffers instead, each with room for
  E elements of every field. A group's state streams through it E elements at a time: the
  update of chunk c waits (device side) for its arrival, then chunk c is evicted and chunk c + R
  comes into its buffer; the engine orders each arrival after the eviction of the buffer's
  previous occupant (same device bytes). At the end of a step the next group's first R chunks
  are prefetched, to arrive during the next forward and backward. Host memory is authoritative
  for every group between steps.

stream(g) hides the mode from the updater: it yields (start, end, views) element ranges of g
with g's fields for that range on the device, in order, and moves the state around them.

Owns StateStore; may call hift_rt.engine only.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from .engine import HostBuffer, TransferEngine

FIELD_ALIGN = 64  # bytes: every field starts 16-byte aligned for 128-bit accesses, and cache-line aligned


class StoredField(NamedTuple):
    """One flat buffer of a group's state as stored: (numel,) elements of dtype, one element per
    `per` elements of the group's flat buffer (1 for per-element state, a block size for per-block
    scales; `per` divides the chunk size and every chunk start)."""
    name: str
    dtype: torch.dtype
    numel: int
    per: int = 1

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _aligned(nbytes: int) -> int:
    return -(-nbytes // FIELD_ALIGN) * FIELD_ALIGN


def _offsets(fields: List[StoredField]):
    """Byte offset of each field in a blob, and the blob's size."""
    offsets, end = [], 0
    for f in fields:
        offsets.append(end)
        end += _aligned(f.nbytes)
    return offsets, end


def _views(blob: torch.Tensor, fields: List[StoredField]) -> Dict[str, torch.Tensor]:
    """The fields of a (nbytes,) uint8 blob, as typed (numel,) views."""
    offsets, _ = _offsets(fields)
    return {f.name: blob[off:off + f.nbytes].view(f.dtype) for f, off in zip(fields, offsets)}


def blob_nbytes(fields: List[StoredField]) -> int:
    """Bytes of a group's blob: its fields one after the other, each FIELD_ALIGN-aligned. Offloaded,
    each group's host buffer holds its blob (at least 1 byte); without offload each field is a
    device tensor of its aligned size."""
    return _offsets(fields)[1]


def plan_device(fields_per_group: List[List[StoredField]], window_bytes: Optional[int],
                ring: int) -> Tuple[int, int, int, int]:
    """Offloaded state's device memory for groups with these fields: (R ring buffers, E elements
    per chunk, bytes per ring buffer, bytes in all). The window (R <= `ring` buffers of E elements
    of every field, E a multiple of 256) when `window_bytes` is given and the largest blob does
    not fit in it; otherwise the whole-group slot: (0, 0, 0, the largest blob's bytes). Pure
    arithmetic, so memory can be planned for a model that is never built (hift_rt.fsdp)."""
    largest = max(blob_nbytes(fields) for fields in fields_per_group)
    if window_bytes is None or largest <= window_bytes:
        return 0, 0, 0, largest
    per_element = max(sum(f.dtype.itemsize / f.per for f in fields) for fields in fields_per_group)
    smallest_chunk = 256 * per_element  # chunks hold whole parameter alignments
    if window_bytes < smallest_chunk:
        raise ValueError(f"state_window={window_bytes} bytes is too small: it must hold at least one "
                         f"chunk of 256 elements at {per_element:g} bytes each ({int(smallest_chunk)} bytes)")
    buffers = max(1, min(ring, int(window_bytes // smallest_chunk)))
    chunk = int(window_bytes // buffers // per_element) // 256 * 256
    buffer_bytes = max(sum(_aligned(-(-chunk // f.per) * f.dtype.itemsize) for f in fields)
                       for fields in fields_per_group)
    return buffers, chunk, buffer_bytes, buffers * buffer_bytes


def _part(f: StoredField, start: int, end: int) -> Tuple[int, int]:
    """The elements of field f that cover group elements [start, end)."""
    return start // f.per, min(f.numel, -(-end // f.per))


class StateStore:
    """The state of k groups on `device`, offloaded through `engine` when one is given."""

    RING = 4  # chunk buffers of a window (fewer when it is tiny): R - 1 chunks arrive while one is updated

    def __init__(self, k: int, device: torch.device, engine: Optional[TransferEngine]):
        self.device = device
        self.engine = engine
        self._fields: List[List[StoredField]] = [[] for _ in range(k)]
        self._elements = [0] * k  # each group's flat elements (the range stream() walks)
        self._on_device: List[Dict[str, torch.Tensor]] = [{} for _ in range(k)]  # offload=False: the fields
        self._hosts: List[Optional[HostBuffer]] = [None] * k  # host buffers (offload=True)
        # host_views(g), built once per buffer: a window transfers each chunk through them, and
        # a view costs a binding call and a torch.frombuffer per field.
        self._host_views: Dict[int, Dict[str, torch.Tensor]] = {}
        self._slot = torch.zeros(0, dtype=torch.uint8, device=device)  # whole-group slot, or the ring
        self._resident: Optional[int] = None  # slot: the group whose blob is in it; window: the next group
        self._pending: Dict[int, List[int]] = {}  # slot: group -> tickets its slot contents wait on
        self.chunk_elements = 0  # window: E (0: no window)
        self.ring = 0  # window: R
        self._ring_bytes = 0  # window: bytes of one chunk buffer
        self._arrivals: Dict[int, List[int]] = {}  # window: chunk c of the resident group -> tickets
        # Exposed transfer: how long the compute stream sat waiting for a prefetch. On CUDA a
        # timing event on each side of the wait (resolved later, never synchronizing); on the
        # host backend the wall time of the blocking wait.
        self._waits: deque = deque()
        self._waited_seconds = 0.0

    @property
    def offloaded(self) -> bool:
        return self.engine is not None

    @property
    def windowed(self) -> bool:
        return self.chunk_elements > 0

    @property
    def resident(self) -> Optional[int]:
        """The group whose state is (or is arriving) on the device (offloaded)."""
        return self._resident

    def nbytes(self, g: int) -> int:
        return _offsets(self._fields[g])[1]

    def fields(self, g: int) -> List[StoredField]:
        return list(self._fields[g])

    def device_bytes(self) -> int:
        """Bytes of state on the device: the slot or the ring, or every field."""
        if self.offloaded:
            return self._slot.numel()
        return sum(_aligned(t.numel() * t.element_size()) for fields in self._on_device for t in fields.values())

    def host_bytes(self) -> int:
        return sum(h.nbytes for h in self._hosts if h is not None)

    # -- layout ------------------------------------------------------------------------------
    def define(self, g: int, fields: List[StoredField], values: Dict[str, torch.Tensor], elements: int = 0) -> None:
        """Set group g's fields and their contents (each value a tensor of the field's numel, on
        any device); `elements` is the group's flat size (for stream()). At wrap for every group;
        again when an optimizer creates its state on a group's first step (whole-group slot
        only; g is then the resident group). Offloaded, a resident g is placed in the slot (grown
        if needed), any other g in its host buffer."""
        # A value may be a view of the slot (a resident group's old fields) that the new layout
        # overwrites before reading it: copy those first.
        slot = self._slot.untyped_storage().data_ptr()
        values = {k: v.clone() if v.untyped_storage().data_ptr() == slot else v for k, v in values.items()}
        self._fields[g] = list(fields)
        self._elements[g] = elements
        nbytes = self.nbytes(g)
        if not self.offloaded:
            self._on_device[g] = {f.name: torch.zeros(f.numel, dtype=f.dtype, device=self.device) for f in fields}
            self._fill(self._on_device[g], values)
            return
        if self._hosts[g] is not None:
            self._hosts[g].free()  # waits for the transfers that still touch it
        self._host_views.pop(g, None)
        self._hosts[g] = self.engine.alloc_host(max(nbytes, 1))
        if self._resident == g and not self.windowed:
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

    def start(self, active: int, window_bytes: Optional[int] = None) -> None:
        """Offloaded, after every group is defined: allocate the device memory (see plan_device)
        and bring the active group's state in."""
        self.ring, self.chunk_elements, self._ring_bytes, slot = plan_device(self._fields, window_bytes, self.RING)
        self._slot = torch.zeros(slot, dtype=torch.uint8, device=self.device)
        self.load(active)

    # -- views -------------------------------------------------------------------------------
    def views(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields on the device (not in window mode); offloaded, g must be the resident group
        (its contents may still be arriving: make_ready orders the current stream after them)."""
        if not self.offloaded:
            return dict(self._on_device[g])
        if self._resident != g or self.windowed:
            raise RuntimeError(f"group {g}'s whole state is not on the device")
        return _views(self._slot[:self.nbytes(g)], self._fields[g])

    def host_views(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields in its host buffer (offloaded), as they are: possibly under a transfer. Each
        is a tensor of its own storage (torch.save refuses views of one storage as several dtypes,
        and saves a view's whole storage)."""
        if g not in self._host_views:
            offsets, _ = _offsets(self._fields[g])
            self._host_views[g] = {f.name: self._hosts[g].view(f.dtype, off, f.numel)
                                   for f, off in zip(self._fields[g], offsets)}
        return dict(self._host_views[g])

    def _host(self, g: int) -> torch.Tensor:
        """g's blob in its host buffer, (nbytes,) uint8."""
        return self._hosts[g].view(torch.uint8, 0, max(self.nbytes(g), 1))[:self.nbytes(g)]

    # -- the active group --------------------------------------------------------------------
    def stream(self, g: int) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """(start, end, views): consecutive ranges of g's flat elements, each with the fields
        covering it on the device (ready to use on the current stream), all of g in order. The
        caller updates a range before taking the next one; consume the whole iterator."""
        if not self.offloaded:
            yield 0, self._elements[g], self.views(g)
            return
        if not self.windowed:
            self.make_ready(g)
            yield 0, self._elements[g], self.views(g)
            return
        if self._resident != g:
            self.load(g)
        E, n = self.chunk_elements, self._elements[g]
        for c in range((n + E - 1) // E):
            start, end = c * E, min(n, (c + 1) * E)
            # For c >= R this blocks the host until the arrival is fully queued (a stream can
            # wait only for recorded events), which follows the update of chunk c - R: through a
            # window the host keeps about one chunk of lead over the GPU.
            self._wait(self._arrivals.pop(c))
            yield start, end, self._chunk_views(g, c % self.ring, start, end)
            # The update of chunk c is queued: send it home, and bring chunk c + R into its buffer
            # (the engine starts that arrival after this eviction: the same device bytes).
            self._transfer(g, c, to_device=False)
            if (c + self.ring) * E < n:
                self._arrivals[c + self.ring] = self._transfer(g, c + self.ring, to_device=True)

    def _chunk_views(self, g: int, buffer: int, start: int, end: int) -> Dict[str, torch.Tensor]:
        """Views of ring buffer `buffer` holding group elements [start, end) of g's fields."""
        views, offset = {}, buffer * self._ring_bytes
        for f in self._fields[g]:
            lo, hi = _part(f, start, end)
            views[f.name] = self._slot[offset:offset + (hi - lo) * f.dtype.itemsize].view(f.dtype)
            offset += _aligned(-(-self.chunk_elements // f.per) * f.dtype.itemsize)
        return views

    def _transfer(self, g: int, c: int, to_device: bool) -> List[int]:
        """Chunk c of g between its host fields and ring buffer c % R: one transfer (each field's
        part a segment of it); returns its ticket in a list (the waits take lists)."""
        E = self.chunk_elements
        start, end = c * E, min(self._elements[g], (c + 1) * E)
        device = self._chunk_views(g, c % self.ring, start, end)
        host = self.host_views(g)
        pieces = [(device[f.name], host[f.name][slice(*_part(f, start, end))]) for f in self._fields[g]]
        if not pieces:
            return []
        devices, hosts = [d for d, _ in pieces], [h for _, h in pieces]
        return [self.engine.h2d(devices, hosts) if to_device else self.engine.d2h(hosts, devices)]

    def make_ready(self, g: int) -> None:
        """Order the current stream after g's arrival in the slot (device side; the host backend
        blocks instead)."""
        self._wait(self._pending.pop(g, []))

    def _wait(self, tickets: List[int]) -> None:
        """The current stream waits for `tickets`, timed as exposed transfer."""
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
        """Bring g's state to the device (the whole blob into the slot, or its first R chunks into
        the ring), discarding what the device holds (at wrap, after loading a checkpoint, and in
        window mode to prefetch the next group)."""
        self._resident = g
        if self.windowed:
            chunks = -(-self._elements[g] // self.chunk_elements)
            self._arrivals = {c: self._transfer(g, c, to_device=True) for c in range(min(self.ring, chunks))}
            return
        nbytes = self.nbytes(g)
        self._pending[g] = [self.engine.h2d(self._slot[:nbytes], self._host(g))] if nbytes else []

    def switch(self, g: int, h: int) -> None:
        """After g's update: h becomes the active group. Slot: evict g and bring h in, pipelined
        (the common length moves as one swap, both directions at once, the longer blob's tail as a
        plain copy). Window: g's chunks were evicted by stream(); prefetch h's first chunks."""
        if self._resident != g or g == h:
            raise RuntimeError(f"state store: switch({g}, {h}) with group {self._resident} resident")
        if self.windowed:
            self.load(h)
            return
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

    # -- checkpoints -------------------------------------------------------------------------
    def read(self, g: int) -> Dict[str, torch.Tensor]:
        """g's fields as they are now, after every transfer touching them: views of its host
        buffer (live: a later eviction of g rewrites them; they stay valid after close()), or a
        CPU copy of the slot for the resident group of the whole-group slot, or the device fields
        themselves without offload."""
        if not self.offloaded:
            return self.views(g)
        if self._resident == g and not self.windowed:
            # Wait on the host, keeping the tickets: the next update still orders the compute
            # stream after them (whatever stream or thread this read runs on).
            for ticket in self._pending.get(g, []):
                self.engine.wait(ticket)
            return {name: v.to("cpu", copy=True) for name, v in self.views(g).items()}
        self.engine.wait_tensor(self._host(g))
        return self.host_views(g)

    def write(self, g: int, values: Dict[str, torch.Tensor]) -> None:
        """Overwrite g's fields (same layout). Offloaded: into its host buffer, and onto the device
        too when g is the resident group."""
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
        self._host_views = {}
