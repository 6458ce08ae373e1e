"""`python -m hift_rt.bench engine`: transfer-engine bandwidth and overlap, beside torch's own copies.

Rows (each the median of `--reps` timed repetitions after a warm-up, all in one run):
- torch pinned `copy_(non_blocking=True)` H2D and D2H on a side stream: the reference figure;
- engine h2d, d2h: GB/s and % of torch's figure (target >= 90%);
- engine swap through one slot (both directions at once): GB/s counting both directions and the
  ratio to one direction's GB/s (target >= 1.6x; H200 anchor: 55 GB/s one way, 100 both ways);
- overlap: a compute-bound matmul loop on the compute stream, alone and with a swap running
  beside it: slowdown of the matmul (target <= 5%).
On CPU (host backend) the same rows run with memcpy threads; the figures say nothing about a GPU.
"""
import json
import statistics
import time

import torch

from ..engine import TransferEngine


def add_arguments(parser):
    parser.add_argument("--mib", type=int, default=None, help="transfer size in MiB (default: 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 on CUDA, 5 on CPU)")
    parser.add_argument("--chunk-mib", type=float, default=None, help="engine chunk size in MiB (default: the engine's)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(mib=None, reps=None, chunk_mib=None, device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    mib = mib or (1024 if cuda else 64)
    reps = reps or (10 if cuda else 5)
    nbytes = mib << 20
    chunk = int(chunk_mib * (1 << 20)) if chunk_mib else 0
    engine = TransferEngine(device)
    host_a, host_b = engine.alloc_host(nbytes), engine.alloc_host(nbytes)
    host_a.view().fill_(1)
    slot = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    rows = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "backend": engine.backend, "bytes": nbytes, "chunk_bytes": chunk or engine.chunk_bytes}

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

        rows["torch_h2d_GBps"] = nbytes / _median_seconds(torch_h2d, device, reps) / 1e9
        rows["torch_d2h_GBps"] = nbytes / _median_seconds(torch_d2h, device, reps) / 1e9

    def engine_h2d():
        engine.wait(engine.h2d(slot, host_a.view(), chunk_bytes=chunk))

    def engine_d2h():
        engine.wait(engine.d2h(host_b.view(), slot, chunk_bytes=chunk))

    def engine_swap():
        engine.wait(engine.swap(slot, host_b.view(), host_a.view(), chunk_bytes=chunk))

    rows["engine_h2d_GBps"] = nbytes / _median_seconds(engine_h2d, device, reps) / 1e9
    rows["engine_d2h_GBps"] = nbytes / _median_seconds(engine_d2h, device, reps) / 1e9
    rows["engine_swap_GBps_both"] = 2 * nbytes / _median_seconds(engine_swap, device, reps) / 1e9
    one_way = max(rows["engine_h2d_GBps"], rows["engine_d2h_GBps"])
    rows["swap_vs_one_direction"] = rows["engine_swap_GBps_both"] / one_way
    if cuda:
        rows["engine_h2d_vs_torch"] = rows["engine_h2d_GBps"] / rows["torch_h2d_GBps"]
        rows["engine_d2h_vs_torch"] = rows["engine_d2h_GBps"] / rows["torch_d2h_GBps"]

        # Overlap: a matmul loop sized to last about as long as one swap, alone and beside it.
        x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        swap_s = 2 * nbytes / rows["engine_swap_GBps_both"] / 1e9
        one_mm = _median_seconds(lambda: x @ x, device, 5)
        n_mm = max(1, int(swap_s / one_mm))

        def matmuls():
            for _ in range(n_mm):
                x @ x

        alone = _median_seconds(matmuls, device, reps)
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
    return rows


def _print(rows):
    print(f"transfer engine on {rows['device']} ({rows['backend']} backend), {rows['bytes'] >> 20} MiB, "
          f"chunk {rows['chunk_bytes'] >> 20} MiB")
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


def main(args):
    rows = run(args.mib, args.reps, args.chunk_mib)
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
