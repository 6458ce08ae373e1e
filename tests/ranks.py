"""Spawning gloo ranks for the multi-process tests: each rank is a subprocess running a worker
script (tests/dp_worker.py, tests/fsdp_worker.py) with its scenario, rank, world size, port and
output prefix; each writes its report as JSON to `<out>.rank<r>`."""
import gc
import json
import os
import socket
import subprocess
import sys

import torch.distributed as dist

HERE = os.path.dirname(__file__)


def free_port():
    """A TCP port free on the loopback now (the OS picks it; the ranks bind it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker, scenario, world, out, timeout=600, env=None):
    """Run `scenario` of tests/`worker` on `world` ranks; each rank's report (None if it wrote none).

    Every rank must exit 0 with a report, except in the scenario "dies", where only rank 0 must
    (rank 1 exits on purpose)."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, worker), scenario, str(rank), str(world), port, out],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    reports = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        path = f"{out}.rank{rank}"
        reports.append(read_report(path) if os.path.exists(path) else None)
        if scenario != "dies" or rank == 0:
            assert p.returncode == 0 and reports[-1] is not None, f"rank {rank} failed:\n{log[-3000:]}"
    return reports


def read_report(path):
    with open(path) as f:
        return json.load(f)


def holds_group(obj):
    """Whether any attribute of `obj` is a torch.distributed ProcessGroup."""
    return any(isinstance(v, dist.ProcessGroup) for v in vars(obj).values())


def finish(report, out, rank, peer_lost=False):
    """A worker's last act: write this rank's report to `<out>.rank<rank>`, then leave the process
    group. What still holds the group (an optimizer or a failed wrap's traceback, in a reference
    cycle) is collected first, so that destroy_process_group really ends gloo's threads: left for
    the interpreter's teardown, a gloo thread that drops a finished collective's tensors takes the
    GIL after Python began finalizing and aborts the process ("terminate called without an active
    exception", exit -6; seen in CI, core dump in pybind11::gil_scoped_acquire under
    ~AsyncAllgatherWork). Where a peer was lost on purpose (`peer_lost`) no teardown is clean: the
    report is what is tested, and the process ends at once."""
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(report, f)
    if peer_lost:
        sys.stdout.flush()
        os._exit(0)
    gc.collect()
    dist.destroy_process_group()
