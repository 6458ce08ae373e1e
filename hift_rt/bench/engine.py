"""`python -m hift_rt.bench engine`: transfer-engine bandwidth and overlap, beside torch's own copies.

Owns the engine benchmark; calls hift_rt.engine and the shared timing helpers (`_timing`).
Rows (each the median of `--reps` timed repetitions after a warm-up, all in one run):
- torch pinned `copy_(non_blocking=True)` H2D and D2H on a side stream: the reference figure;
- engine h2d, d2h: GB/s and % of torch's figure (target >= 90%);
- engine swap through one slot (both directions at once): GB/s counting both directions and the
  ratio to one direction's GB/s (target >= 1.6x; H200 anchor: 55 GB/s one way, 100 both ways);
- overlap: a compute-bound matmul loop on the compute stream, alone and with a swap running
  beside it: slowdown of the matmul (target <= 5%);
- small copies during a swap: the host time of a 4-byte `.item()` (D2H) and of a 4 KiB pageable
  H2D on the compute stream, alone, while an engine swap runs (at most `max_in_flight` chunks
  queued per copy stream), and while a swap runs from an engine that queues every chunk at once
  (the engine before its feeders). What the feeders are for: the small copy should wait about one
  chunk, not the rest of the swap.
On CPU (host backend) the bandwidth rows run with memcpy threads and say nothing about a GPU; the
small-copy row is not meaningful there (no copy engine is shared) and is skipped.
"""
import json
import statistics
import time

import torch

from . import _timing
from ..engine import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_IN_FLIGHT, TransferEngine


def add_arguments(parser):
    parser.add_argument("--mib", type=int, default=None, help="transfer size in MiB (default: 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 on CUDA, 5 on CPU)")
    parser.add_argument("--chunk-mib", type=float, default=None, help="engine chunk size in MiB (default: the engine's)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def _small_copies_during_swap(device, nbytes, chunk, reps, sync):
    """{copy: {"alone_ms", "during_swap_ms", "during_swap_all_queued_ms"}}: host time of each small
    copy alone, during a swap of `nbytes` from a default engine, and during one from an engine
    whose max_in_flight is the swap's chunk count (every chunk queued at once)."""
    scalar = torch.ones((), device=device)
    small_dev, small_cpu = torch.empty(1024, device=device), torch.ones(1024)

    def item_d2h():
        scalar.item()

    def h2d_4kib():
        small_dev.copy_(small_cpu)
        torch.cuda.current_stream(device).synchronize()

    copies = {"item_d2h_4B": item_d2h, "pageable_h2d_4KiB": h2d_4kib}
    rows = {name: {"alone_ms": _timing.median_host_ms([fn], reps=reps, warmup=2, sync=sync)}
            for name, fn in copies.items()}
    chunks = -(-nbytes // (chunk or DEFAULT_CHUNK_BYTES))
    rows["max_in_flight"] = {"during_swap_ms": DEFAULT_MAX_IN_FLIGHT, "during_swap_all_queued_ms": chunks}
    for label, depth in rows["max_in_flight"].items():
        engine = TransferEngine(device, max_in_flight=depth)
        host_a, host_b = engine.alloc_host(nbytes), engine.alloc_host(nbytes)
        slot = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        for name, fn in copies.items():
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                sync()
                ticket = engine.swap(slot, host_b.view(), host_a.view(), chunk_bytes=chunk)
                time.sleep(2e-3)  # the feeders queue the first chunks (all of them, all-queued)
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
                engine.wait(ticket)
            rows[name][label] = statistics.median(times[1:])
        engine.close()
    rows["chunks_per_direction"] = chunks
    return rows


def run(mib=None, reps=None, chunk_mib=None, device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    mib = mib or (1024 if cuda else 64)
    reps = reps or (10 if cuda else 5)
    nbytes = mib << 20
    chunk = int(chunk_mib * (1 << 20)) if chunk_mib else 0

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def seconds(fn):
        return _timing.median_host_ms([fn], reps=reps, warmup=2, sync=sync) / 1e3

    engine = TransferEngine(device)
    host_a, host_b = engine.alloc_host(nbytes), engine.alloc_host(nbytes)
    host_a.view().fill_(1)
    slot = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    rows = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "backend": engine.backend, "bytes": nbytes, "chunk_bytes": chunk or engine.chunk_bytes,
            "max_in_flight": engine.max_in_flight}

    if cuda:
        side = torch.cuda.Stream(device)
        pinned_src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
        pinned_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

        def torch_h2d():
            with torch.cuda.stream(side):
                slot.copy_(pinned_src, non_blocking=True)
            torch.cuda.current_stream().wait_stream(side)

        def torch_d2h():
            with torch.cuda.stream(side):
                pinned_dst.copy_(slot, non_blocking=True)
            torch.cuda.current_stream().wait_stream(side)

        rows["torch_h2d_GBps"] = nbytes / seconds(torch_h2d) / 1e9
        rows["torch_d2h_GBps"] = nbytes / seconds(torch_d2h) / 1e9

    def engine_h2d():
        engine.wait(engine.h2d(slot, host_a.view(), chunk_bytes=chunk))

    def engine_d2h():
        engine.wait(engine.d2h(host_b.view(), slot, chunk_bytes=chunk))

    def engine_swap():
        engine.wait(engine.swap(slot, host_b.view(), host_a.view(), chunk_bytes=chunk))

    rows["engine_h2d_GBps"] = nbytes / seconds(engine_h2d) / 1e9
    rows["engine_d2h_GBps"] = nbytes / seconds(engine_d2h) / 1e9
    rows["engine_swap_GBps_both"] = 2 * nbytes / seconds(engine_swap) / 1e9
    one_way = max(rows["engine_h2d_GBps"], rows["engine_d2h_GBps"])
    rows["swap_vs_one_direction"] = rows["engine_swap_GBps_both"] / one_way
    if cuda:
        rows["engine_h2d_vs_torch"] = rows["engine_h2d_GBps"] / rows["torch_h2d_GBps"]
        rows["engine_d2h_vs_torch"] = rows["engine_d2h_GBps"] / rows["torch_d2h_GBps"]

        # Overlap: a matmul loop sized to last about as long as one swap, alone and beside it.
        x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        swap_s = 2 * nbytes / rows["engine_swap_GBps_both"] / 1e9
        one_mm = _timing.median_ms([lambda: x @ x], reps=5, warmup=2, device=device) / 1e3
        n_mm = max(1, int(swap_s / one_mm))

        def matmuls():
            for _ in range(n_mm):
                x @ x

        alone = _timing.median_ms([matmuls], reps=reps, warmup=2, device=device) / 1e3
        # The swap is issued after the previous matmuls on the compute stream (ordering rule), so
        # time the matmuls with events on the compute stream itself.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        beside = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = engine.swap(slot, host_b.view(), host_a.view(), chunk_bytes=chunk)
            start.record()
            matmuls()
            end.record()
            engine.wait(t)
            torch.cuda.synchronize()
            beside.append(start.elapsed_time(end) / 1e3)
        rows["overlap"] = {"matmuls": n_mm, "matmul_alone_s": alone, "matmul_beside_swap_s": statistics.median(beside),
                           "swap_alone_s": swap_s,
                           "matmul_slowdown": statistics.median(beside) / alone - 1}
    rows["counters"] = engine.counters()
    engine.close()
    if cuda:
        rows["small_copies_during_swap"] = _small_copies_during_swap(device, nbytes, chunk, reps, sync)
        rows["small_copies_during_swap"]["chunk_ms_one_direction"] = (
            rows["chunk_bytes"] / (rows["engine_swap_GBps_both"] / 2) / 1e6)
    return rows


def _print(rows):
    print(f"transfer engine on {rows['device']} ({rows['backend']} backend), {rows['bytes'] >> 20} MiB, "
          f"chunk {rows['chunk_bytes'] >> 20} MiB, max_in_flight {rows['max_in_flight']}")
    fmt = "  {:<34} {:>10}"
    for key in ("torch_h2d_GBps", "torch_d2h_GBps", "engine_h2d_GBps", "engine_d2h_GBps", "engine_swap_GBps_both"):
        if key in rows:
            print(fmt.format(key, f"{rows[key]:.1f}"))
    for key, target in (("engine_h2d_vs_torch", ">= 0.90"), ("engine_d2h_vs_torch", ">= 0.90"),
                        ("swap_vs_one_direction", ">= 1.60")):
        if key in rows:
            print(fmt.format(key, f"{rows[key]:.2f}") + f"   target {target}")
    if "overlap" in rows:
        o = rows["overlap"]
        print(fmt.format("matmul slowdown beside a swap", f"{100 * o['matmul_slowdown']:.1f}%") + "   target <= 5%")
    small = rows.get("small_copies_during_swap")
    if small is None:
        print("  small copies during a swap: not meaningful on the host backend (no copy engine is shared)")
        return
    print(f"  small copies during a swap (ms; one chunk one way: {small['chunk_ms_one_direction']:.2f}; "
          f"{small['chunks_per_direction']} chunks per direction):")
    print("  {:<34} {:>10} {:>12} {:>12}".format("", "alone", "feeders", "all queued"))
    for name in ("item_d2h_4B", "pageable_h2d_4KiB"):
        r = small[name]
        print("  {:<34} {:>10.3f} {:>12.3f} {:>12.3f}".format(
            name, r["alone_ms"], r["during_swap_ms"], r["during_swap_all_queued_ms"]))


def main(args):
    rows = run(args.mib, args.reps, args.chunk_mib)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
