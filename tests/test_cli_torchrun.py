"""`python -m hift_rt finetune` under torchrun: 2 gloo ranks on the CPU (subprocesses, the kernels'
torch path) against one process with the global batch (this process, `main()`).

Tolerance: with --batch-size B each of R ranks trains on its B of the R*B windows one process
with --batch-size R*B draws, so the runs differ only by rounding: the ranks' mean gradient (a
reduce-scatter of per-rank means; DDP for --compare full) and mean loss are sums in another order
than one process's, and this process runs the kernels in Triton's interpreter. Measured over 4 to
24 fp32 AdamW steps of the 2-layer model (weights are O(1)): losses within 1.2e-6, weights within
3.8e-6 (one element of an MLP weight, where Adam's normalization amplifies a rounding difference;
every other element within 1e-6); asserted with TOL = 2e-5. About 50 s on two shared cores,
mostly the start-up of three interpreters (torchrun and two ranks) per launch.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_rt import checkpoint, job
from hift_rt.cli import main
from ranks import free_port
from test_cli import tiny_hf_model

TOL = 2e-5
STEPS = 60  # the interrupted run's --steps (Ctrl-C stops it long before)
COMMON = ["--seq-len", "32", "--warmup-steps", "2", "--lr-schedule", "constant"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}


def torchrun(*argv, **popen):
    """2 ranks of the CLI under torchrun (standalone: a free port of its own)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "hift_rt", "finetune", "--batch-size", "2", *COMMON, *map(str, argv)]
    return subprocess.Popen(command, env=ENV, text=True, stdout=subprocess.PIPE, **popen)


def one_process(*argv):
    """One process with the global batch (2 ranks x 2)."""
    assert main(["finetune", "--batch-size", "4", *COMMON, *map(str, argv)]) == 0


def weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def assert_close_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    error = max((a[k] - b[k]).abs().max().item() for k in a)
    assert error <= TOL, error


def losses(path):
    return [r["losses"] for r in json.loads(Path(path).read_text())]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two torchrun launches: 4 steps with --compare full and a save; a resume of that checkpoint
    on 2 ranks, interrupted by Ctrl-C to torchrun (which forwards SIGINT to every rank)."""
    root = tmp_path_factory.mktemp("torchrun")
    tiny_hf_model(root / "small")
    first = torchrun("--model", root / "small", "--steps", 4, "--save", root / "two", "--json", root / "two.json",
                     "--compare", "full", stderr=subprocess.PIPE)
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    with open(root / "resumed.err", "w") as err:
        resumed = torchrun("--resume", root / "two", "--steps", STEPS, "--save", root / "resumed",
                           "--json", root / "resumed.json", stderr=err)
        deadline = time.monotonic() + 300
        while not re.search(rf"\b([6-9]|[1-5]\d)/{STEPS} \[", (root / "resumed.err").read_text(errors="replace")):
            assert resumed.poll() is None, (root / "resumed.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the resumed run shows no step 6 after 300 s"
            time.sleep(0.01)
        resumed.send_signal(signal.SIGINT)
        resumed_out, _ = resumed.communicate(timeout=300)
    return root, first_out, resumed_out, (root / "resumed.err").read_text(errors="replace")


def test_two_ranks_train_save_and_print_once_as_one_process_with_the_global_batch(runs):
    root, out, _, _ = runs
    assert out.count("tokens/s") == 1 and out.count("on cpu per rank; 2 ranks") == 2  # rank 0: hift, full
    assert checkpoint.manifest(root / "two")["step"] == 4
    one_process("--model", root / "small", "--steps", 4, "--save", root / "one", "--json", root / "one.json",
                "--compare", "full")
    for method, (two, one) in zip(("hift", "full"), zip(losses(root / "two.json"), losses(root / "one.json"))):
        assert len(two) == 4 and max(abs(a - b) for a, b in zip(two, one)) <= TOL, (method, two, one)
    assert_close_weights(root / "two", root / "one")
    (two_hift, two_full), (one_hift, _) = (json.loads((root / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two_hift["ranks"] == two_full["ranks"] == 2 and one_hift["ranks"] == 1
    assert abs(two_hift["heldout_end"] - one_hift["heldout_end"]) <= TOL  # the held-out loss sharded over ranks


def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step_and_rank_0_saves_it(runs):
    root, _, out, err = runs
    reported = re.findall(r"interrupted at step (\d+): checkpoint saved", out)
    assert len(reported) == 1 and err.count("hift-rt: stopping every rank after this step") == 1, (out, err[-2000:])
    step = int(reported[0])
    assert 6 <= step < STEPS and checkpoint.manifest(root / "resumed")["step"] == step
    state = torch.load(root / "resumed" / job.STATE_FILE, weights_only=True)
    assert len(state["history"]["losses"]) == step
    assert "hift-rt: error" not in err


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_on_two_as_one_process_runs(runs):
    """The checkpoint of step 4 (2 ranks) resumed on 2 ranks (to the step Ctrl-C stopped) and on 1
    rank with the global batch: both as one process that ran every step."""
    root = runs[0]
    step = checkpoint.manifest(root / "resumed")["step"]
    one_process("--resume", root / "two", "--steps", step, "--save", root / "one_rank", "--json", root / "one_rank.json")
    one_process("--model", root / "small", "--steps", step, "--save", root / "whole", "--json", root / "whole.json")
    (whole,) = losses(root / "whole.json")
    two_ranks = torch.load(root / "resumed" / job.STATE_FILE, weights_only=True)["history"]["losses"]
    (one_rank,) = losses(root / "one_rank.json")
    for resumed, directory in ((two_ranks, root / "resumed"), (one_rank, root / "one_rank")):
        assert len(resumed) == step and max(abs(a - b) for a, b in zip(resumed, whole)) <= TOL, (resumed, whole)
        assert_close_weights(directory, root / "whole")


# One rank fails inside Ranks.agree; then the CLI with an output path that only rank 0 checks, in the
# process group this script joined (the CLI uses it as it is); the script leaves it: a process that
# exits with a gloo group alive can abort in the interpreter's teardown (exit code -6).
AGREE = """
import sys, torch
from hift_rt import job
from hift_rt.job.ranks import Ranks
from hift_rt.cli import main
ranks = Ranks()
ranks.join(torch.device("cpu"))
try:
    with ranks.agree():
        if ranks.rank == 1:
            raise job.JobError("only rank 1 failed")
except job.JobError as exc:
    print(f"agreed: {exc}", flush=True)
code = main(sys.argv[1:])
ranks.leave()
sys.exit(code)
"""


def test_an_error_on_one_rank_ends_every_rank_with_code_2_and_one_line_from_rank_0(tmp_path):
    port = free_port()
    bad = tmp_path / "missing" / "r.json"
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, "finetune", "--steps", "1", "--json", str(bad)],
                              env={**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (err0[-2000:], err1[-2000:])
    assert out0.strip() == out1.strip() == "agreed: rank 1: only rank 1 failed"
    assert err0.strip().splitlines() == [f"hift-rt: error: --json {bad}: no such directory: {bad.parent}"], err0
    assert "hift-rt: error" not in err1, err1
