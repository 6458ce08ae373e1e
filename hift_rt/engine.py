"""Torch-facing layer over the C++ transfer engine (`hift_rt._C`).

Owns: the conversion of torch tensors to the engine's raw addresses, the checks that need torch
(device, contiguity, sizes), and keeping device memory alive while a transfer uses it. It may
call `hift_rt._C` and torch, nothing else of hift_rt.

The engine moves bytes between host buffers it owns (pinned under CUDA) and device memory, on
one stream per direction, and hands out integer tickets. This layer takes torch tensors:

- device-side tensors come from torch's caching allocator (`torch.cuda.memory_allocated()` tells
  the truth); each one is kept referenced here until its ticket is done, so the allocator never
  hands its memory to someone else while a copy is in flight. (`record_stream` would not do: it
  covers only the work queued on the copy stream when the tensor is freed, and the feeders queue
  a transfer's chunks later, as earlier chunks finish.)
- host-side tensors are views of a `HostBuffer` (engine-allocated, or registered torch memory);
- every transfer that reads device memory is ordered after the work queued so far on the current
  torch stream (an event recorded there, waited on by the copy stream: no host sync), and
  transfers touching the same bytes are ordered by the engine itself;
- `wait(ticket, stream)` makes a torch stream wait device-side; `wait(ticket)` blocks the host.

Scheduling: transfers are cut into chunks (`chunk_bytes`, 8 MiB by default) that one feeder
thread per direction hands to its copy stream, round-robin between the transfers that may run,
with at most `max_in_flight` chunks (default 2) queued on a stream. A small transfer issued
during a long one therefore waits about one chunk, and so does a small synchronous copy of
torch's, which would otherwise find every chunk of a swap ahead of it in the copy engine. Because
the feeder records a transfer's events as it queues its chunks, `wait(ticket, stream)` on CUDA
blocks the host until the transfer is fully queued (at most `max_in_flight` chunks before its
end); a prefetch issued a forward/backward ahead is long queued by then. On the host backend the
feeders copy with memcpy themselves, one chunk at a time, under the same rules.

`h2d` and `d2h` also take equal-length lists of tensors: one transfer (one ticket) of several
segments, e.g. the same element range of several state fields into one device buffer. A transfer
of 0 bytes moves nothing and returns a ticket that is already done. A transfer's device-side
bytes must not overlap its host-side bytes (ValueError).

Lifetime rules (the engine enforces them): freeing a HostBuffer waits for every transfer in flight
that touches it and refuses new ones meanwhile; device-side tensors are kept referenced here until
their ticket is done (pruned at each transfer and wait, and at close).
"""
from __future__ import annotations

import threading
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from . import _C

EngineError = _C.EngineError
DEFAULT_CHUNK_BYTES = _C.DEFAULT_CHUNK_BYTES
DEFAULT_MAX_IN_FLIGHT = _C.DEFAULT_MAX_IN_FLIGHT

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def build_info() -> dict:
    """How `hift_rt._C` was built: `cuda_compiled`, `cuda_runtime_version`, default chunk."""
    return _C.build_info()


def probe(device: int = 0) -> dict:
    """What `backend="auto"` picks here and why: `backend`, `reason`, `device_name`, `device_count`."""
    return _C.probe(device)


class HostBuffer:
    """`nbytes` of host memory known to the engine: pinned (CUDA) or page-aligned (host backend).

    `view(dtype, offset, numel)` returns a CPU tensor aliasing the buffer. A view owns a share of
    the memory: `free()` and the engine's `close()` drop the engine's share, and the memory goes
    with the last view (a state_dict holding views stays readable after the optimizer closes).
    Registered torch memory keeps its tensor referenced here; its views are views of that tensor.
    """

    def __init__(self, engine: "TransferEngine", ptr: int, nbytes: int, owner: Optional[torch.Tensor]):
        self._engine = engine
        self.ptr = ptr
        self.nbytes = nbytes
        self._owner = owner  # the registered torch tensor, or None when the engine allocated it
        self._freed = False

    def view(self, dtype: torch.dtype = torch.uint8, offset: int = 0, numel: Optional[int] = None) -> torch.Tensor:
        """A 1-D CPU tensor of `dtype` over bytes [offset, offset + numel * itemsize)."""
        if self._freed:
            raise ValueError("host buffer was freed")
        itemsize = dtype.itemsize
        if offset % itemsize:
            raise ValueError(f"offset {offset} is not a multiple of {dtype}'s size {itemsize}")
        if numel is None:
            numel = (self.nbytes - offset) // itemsize
        nbytes = numel * itemsize
        if offset < 0 or numel <= 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"view [{offset}, +{nbytes}) lies outside the host buffer of {self.nbytes} bytes")
        if self._owner is not None:
            return self._owner.view(-1).view(torch.uint8)[offset:offset + nbytes].view(dtype)
        # torch.frombuffer keeps the HostView (and with it the memory) alive for the tensor's life.
        return torch.frombuffer(self._engine._engine.host_view(self.ptr + offset, nbytes), dtype=dtype, count=numel)

    def free(self) -> None:
        """Release the memory (waits for transfers in flight that touch it). Idempotent."""
        if self._freed or self._engine.closed:
            self._freed = True
            return
        if self._owner is None:
            self._engine._engine.free_host(self.ptr)
        else:
            self._engine._engine.unregister_host(self.ptr)
            self._owner = None
        self._freed = True


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TransferEngine:
    """Moves tensors between host buffers and `device` memory on the engine's own streams.

    device: the device-side memory's device. A CUDA device takes the CUDA backend; "cpu" takes the
        host backend (feeder threads copying with memcpy, same ordering rules).
    backend: "auto" (from `device`), "cuda" or "host"; an unusable "cuda" raises EngineError.
    chunk_bytes: transfers are cut into chunks of this size (default 8 MiB).
    max_in_flight: chunks queued on each copy stream at most (default 2, >= 1); the host backend
        copies one chunk at a time whatever it is.
    """

    def __init__(self, device="cpu", backend: str = "auto", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT):
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            device = torch.device("cuda", index)
            if backend == "auto":
                backend = "cuda"
            if backend != "cuda":
                raise ValueError(f"device {device} needs backend 'cuda', got {backend!r}")
        elif device.type == "cpu":
            index = 0
            if backend == "auto":
                backend = "host"
            if backend != "host":
                raise ValueError(f"device 'cpu' needs backend 'host', got {backend!r}")
        else:
            raise ValueError(f"unsupported device {device}: expected 'cpu' or 'cuda'")
        self.device = device
        self._engine = _C.Engine(backend, index, chunk_bytes, max_in_flight)
        self._keepalive: dict[int, tuple] = {}
        self._keepalive_lock = threading.Lock()  # Python threads may share one engine
        if self._engine.backend == "cuda":
            # The engine's streams, as torch streams (e.g. for profiling or an explicit wait_stream).
            h2d, d2h = self._engine.streams()
            self.h2d_stream = torch.cuda.ExternalStream(h2d, device=device)
            self.d2h_stream = torch.cuda.ExternalStream(d2h, device=device)
        else:
            self.h2d_stream = self.d2h_stream = None

    # -- facts ------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._engine.backend

    @property
    def reason(self) -> str:
        return self._engine.reason

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def chunk_bytes(self) -> int:
        return self._engine.chunk_bytes

    @property
    def max_in_flight(self) -> int:
        return self._engine.max_in_flight

    def info(self) -> dict:
        """Backend, why it was chosen, device name, how the module was built."""
        return {
            "backend": self.backend,
            "reason": self.reason,
            "device": str(self.device),
            "device_name": self._engine.device_name or None,
            "chunk_bytes": self.chunk_bytes,
            "max_in_flight": self.max_in_flight,
            **build_info(),
        }

    # -- host memory ------------------------------------------------------------------------
    def alloc_host(self, nbytes: int) -> HostBuffer:
        """Host memory owned by the engine (pinned with cudaHostAlloc under CUDA)."""
        return HostBuffer(self, self._engine.alloc_host(int(nbytes)), int(nbytes), None)

    def register_host(self, tensor: torch.Tensor) -> HostBuffer:
        """Make a contiguous CPU tensor usable as a host buffer (cudaHostRegister under CUDA)."""
        if tensor.device.type != "cpu":
            raise ValueError(f"register_host needs a CPU tensor, got one on {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError("register_host needs a contiguous tensor")
        self._engine.register_host(tensor.data_ptr(), _nbytes(tensor))
        return HostBuffer(self, tensor.data_ptr(), _nbytes(tensor), tensor)

    # -- transfers --------------------------------------------------------------------------
    def _check_device_side(self, t: torch.Tensor, what: str) -> None:
        if t.device != self.device:
            raise ValueError(f"{what} must be on {self.device}, got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")

    @staticmethod
    def _check_host_side(t: torch.Tensor, what: str) -> None:
        if t.device.type != "cpu":
            raise ValueError(f"{what} must be a CPU tensor in a host buffer, got one on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous")

    @staticmethod
    def _same_size(device_side: torch.Tensor, host_side: torch.Tensor, what: str, device_name: str,
                   host_name: str) -> int:
        n = _nbytes(device_side)
        if n != _nbytes(host_side):
            raise ValueError(f"{what}: sizes differ ({device_name} {n} vs {host_name} {_nbytes(host_side)} bytes)")
        return n

    def _pairs(self, op: str, device_side: Tensors, host_side: Tensors, device_name: str,
               host_name: str) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
        """Checked (device tensor, host tensor, nbytes) pairs of one transfer; lists name the index."""
        if isinstance(device_side, torch.Tensor) and isinstance(host_side, torch.Tensor):
            self._check_device_side(device_side, f"{op} {device_name}")
            self._check_host_side(host_side, f"{op} {host_name}")
            return [(device_side, host_side, self._same_size(device_side, host_side, op, device_name, host_name))]
        if isinstance(device_side, torch.Tensor) or isinstance(host_side, torch.Tensor):
            raise ValueError(f"{op}: {device_name} and {host_name} must both be tensors or both lists of tensors")
        device_side, host_side = list(device_side), list(host_side)
        if len(device_side) != len(host_side):
            raise ValueError(f"{op}: {len(device_side)} {device_name} tensors but {len(host_side)} {host_name} tensors")
        pairs = []
        for i, (d, h) in enumerate(zip(device_side, host_side)):
            for t, name in ((d, device_name), (h, host_name)):
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{op} {name}[{i}] must be a tensor, got {type(t).__name__}")
            self._check_device_side(d, f"{op} {device_name}[{i}]")
            self._check_host_side(h, f"{op} {host_name}[{i}]")
            pairs.append((d, h, self._same_size(d, h, f"{op} pair {i}", device_name, host_name)))
        return pairs

    def _after_stream(self) -> Optional[int]:
        # Device reads and writes follow the compute queued so far on the current stream.
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return None

    def _track(self, ticket: int, device_tensors: tuple) -> int:
        # The feeders read and write these tensors until the ticket is done: keep them alive
        # (and their memory out of the caching allocator) until then, even if the caller drops
        # its last reference right now.
        with self._keepalive_lock:
            self._keepalive[ticket] = device_tensors
        self._prune()
        return ticket

    def _prune(self) -> None:
        # Oldest ticket first, up to the first one not done: a few queries per call however many
        # transfers are in flight (a later ticket that is done waits for the older one).
        with self._keepalive_lock:
            for ticket in list(self._keepalive):
                try:
                    done = self._engine.query(ticket)
                except EngineError:  # failed: finished too; its waiters report the failure
                    done = True
                if not done:
                    break
                del self._keepalive[ticket]

    def h2d(self, dst: Tensors, src: Tensors, deps: Iterable[int] = (), chunk_bytes: int = 0) -> int:
        """Copy host tensor `src` into device tensor `dst`; returns a ticket. Given equal-length
        lists, copies each `src[i]` into `dst[i]` as one transfer (one ticket)."""
        pairs = self._pairs("h2d", dst, src, "dst", "src")
        segments = [(d.data_ptr(), h.data_ptr(), n) for d, h, n in pairs]
        ticket = self._engine.h2d_segments(segments, list(deps), self._after_stream(), chunk_bytes)
        return self._track(ticket, tuple(d for d, _, _ in pairs))

    def d2h(self, dst: Tensors, src: Tensors, deps: Iterable[int] = (), chunk_bytes: int = 0) -> int:
        """Copy device tensor `src` into host tensor `dst` once the current stream's work is done.
        Given equal-length lists, copies each `src[i]` into `dst[i]` as one transfer."""
        pairs = self._pairs("d2h", src, dst, "src", "dst")
        segments = [(h.data_ptr(), d.data_ptr(), n) for d, h, n in pairs]
        ticket = self._engine.d2h_segments(segments, list(deps), self._after_stream(), chunk_bytes)
        return self._track(ticket, tuple(d for d, _, _ in pairs))

    def swap(self, slot: torch.Tensor, evict_to: torch.Tensor, fill_from: torch.Tensor,
             deps: Iterable[int] = (), chunk_bytes: int = 0) -> int:
        """Evict `slot` into `evict_to` and fill it from `fill_from`, pipelined chunk by chunk.

        Both directions run at once; once the ticket is done `evict_to` holds the slot's old bytes
        and the slot holds `fill_from`'s, never a mixture.
        """
        ((_, _, n),) = self._pairs("swap", slot, evict_to, "slot", "evict_to")
        self._check_host_side(fill_from, "swap fill_from")
        self._same_size(slot, fill_from, "swap", "slot", "fill_from")
        ticket = self._engine.swap(slot.data_ptr(), evict_to.data_ptr(), fill_from.data_ptr(), n,
                                   list(deps), self._after_stream(), chunk_bytes)
        return self._track(ticket, (slot,))

    # -- waiting ----------------------------------------------------------------------------
    def wait(self, ticket: int, stream=None) -> None:
        """Block the host until `ticket` is done, or, given a torch stream, make that stream wait
        for it device-side: on CUDA the host returns once the transfer is fully queued on the copy
        streams (at once in steady state; see the module docstring). On the host backend both
        block until done."""
        if stream is None:
            self._engine.wait(ticket)
            self._prune()
        elif self.device.type == "cuda":
            self._engine.wait_stream(ticket, stream.cuda_stream)
        else:
            self._engine.wait_stream(ticket, 0)
            self._prune()

    def query(self, ticket: int) -> bool:
        """True once `ticket` is done; never blocks."""
        return self._engine.query(ticket)

    def wait_tensor(self, t: torch.Tensor) -> None:
        """Block until no transfer in flight touches `t`'s bytes (e.g. before reading a host
        buffer on the host)."""
        self._engine.wait_range(t.data_ptr(), _nbytes(t))

    def synchronize(self) -> None:
        """Block until every transfer issued so far is done."""
        self._engine.synchronize()
        self._prune()

    def in_flight(self) -> int:
        return self._engine.in_flight()

    def counters(self) -> dict:
        """Per direction (`h2d`, `d2h`): bytes moved, busy seconds, transfers, and GB/s while busy,
        for the transfers done so far."""
        c = self._engine.counters()
        for d in c.values():
            d["gb_per_s"] = d["bytes"] / d["busy_seconds"] / 1e9 if d["busy_seconds"] > 0 else 0.0
        return c

    def reset_counters(self) -> None:
        self._engine.reset_counters()

    def record_schedule(self, on: bool = True) -> None:
        """Start (clearing the log) or stop recording the feeders' schedule."""
        self._engine.record_schedule(on)

    def schedule(self) -> List[Tuple[str, int, str, int]]:
        """The recorded schedule, in the order the feeders acted: `("queued", ticket, direction, 0)`
        when a transfer's leg joined a feeder, `("fed", ticket, direction, chunk)` when one of its
        chunks went to the copy stream. Shows e.g. a small transfer served between a swap's chunks."""
        return self._engine.schedule()

    def close(self) -> None:
        """Wait for everything in flight, free the engine's host buffers and streams. Idempotent."""
        self._engine.close()
        with self._keepalive_lock:
            self._keepalive.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
