"""Timing helpers shared by the benchmarks.

A timed thing is a list of calls, one per buffer set; repetitions cycle through them so that a
call never finds its inputs in a cache left warm by the previous one.
"""
import math
import statistics
import time

import torch

# Bytes the buffer sets of one measurement should span together: several times the L2 cache of
# an H100/H200 (50 MB), so rotating through them defeats it.
ROTATE_BYTES = 256 << 20
MAX_SETS = 8


def buffer_sets(bytes_per_set):
    """How many buffer sets to rotate through: enough for ROTATE_BYTES, 2 to MAX_SETS."""
    return max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))


def median_ms(calls, *, reps, warmup, device):
    """Median wall time of one call in milliseconds over `reps` calls cycling through `calls`,
    after `warmup` untimed ones. On CUDA each call is bracketed by events on the current
    stream (no host sync inside the loop); elsewhere by time.perf_counter."""
    if device.type != "cuda":
        return median_host_ms(calls, reps=reps, warmup=warmup, sync=lambda: None)
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def median_host_ms(calls, *, reps, warmup, sync):
    """Median host-clock time of one call in milliseconds over `reps` calls cycling through
    `calls`, after `warmup` untimed ones, each call bracketed by `sync()` (e.g. a device-wide
    synchronize): for work on streams other than the current one, or for what the host itself
    waits (a blocking copy), which events on the current stream would not show."""
    for i in range(warmup):
        calls[i % len(calls)]()
    times = []
    for i in range(reps):
        sync()
        start = time.perf_counter()
        calls[i % len(calls)]()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gbps(bytes_moved, ms):
    """Bandwidth in GB/s (1e9 bytes per second) of `bytes_moved` in `ms` milliseconds."""
    return bytes_moved / ms / 1e6
