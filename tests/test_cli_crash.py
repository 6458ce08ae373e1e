"""Crash tests of `hift-rt finetune`: real SIGINTs and SIGKILLs at random moments, in
subprocesses, then `--resume`; the result must equal, weights bit for bit and losses exactly, a
run that was never interrupted.

Every process runs the tiny settings (batch 2 x 32 tokens, OMP_NUM_THREADS=1), which are
deterministic, on the kernels' torch path (TRITON_INTERPRET=0: the Triton interpreter would make
each step take seconds). The moments are drawn from a seeded generator; which step a signal hits
still depends on the machine's speed, and the assertions hold for any step. The resumed runs and
the uninterrupted reference run in one process (sequential `main()` calls) to pay Python's start-up
once. About 60-90 s in all on two cores.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_rt import checkpoint

STEPS = 12
TINY = ["--batch-size", "2", "--seq-len", "32", "--warmup-steps", "2", "--steps", str(STEPS), "--strategy", "random"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
RUN_MAINS = ("import sys; from hift_rt.cli import main; "
             "sys.exit(max(main(line.split()) for line in sys.argv[1:]))")


def start(err, *argv):
    """The CLI in a subprocess; stdout is read line by line, stderr (progress bar) goes to `err`."""
    return subprocess.Popen([sys.executable, "-m", "hift_rt", "finetune", *TINY, *argv], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=err)


def wait_until(proc, done, what):
    deadline = time.monotonic() + 300
    while not done():
        assert proc.poll() is None, f"the job ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.01)


def steps_shown(err_path):
    """The last step count the progress bar wrote (tqdm: "  5/12 ["), -1 before the bar exists
    (it appears once Ctrl-C stops at step boundaries; earlier, Python's default handler runs)."""
    counts = re.findall(rf"(\d+)/{STEPS} \[", Path(err_path).read_text(errors="replace"))
    return int(counts[-1]) if counts else -1


def run_in_one_process(*command_lines):
    done = subprocess.run([sys.executable, "-c", RUN_MAINS, *command_lines], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def ended(proc, directory):
    """(rc, stdout, the step of the checkpoint left in `directory` or None)."""
    out = proc.stdout.read()
    rc = proc.wait()
    return rc, out, checkpoint.manifest(directory)["step"] if directory.exists() else None


def ctrl_c(tmp_path, name, at_step, delay):
    """Ctrl-C `delay` s after the progress bar showed `at_step` steps."""
    directory, err_path = tmp_path / name, tmp_path / f"{name}.err"
    with open(err_path, "w") as err:
        proc = start(err, "--save", directory)
        wait_until(proc, lambda: steps_shown(err_path) >= at_step, f"step {at_step}")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        return ended(proc, directory)


def ctrl_c_twice(tmp_path, name, delay, second_after):
    """Ctrl-C `delay` s after the first checkpoint (saved every 4 steps) exists, and again
    `second_after` s later: the second quits at once, maybe in the middle of a save."""
    directory = tmp_path / name
    with open(tmp_path / f"{name}.err", "w") as err:
        proc = start(err, "--save", directory, "--save-every", "4")
        wait_until(proc, (directory / checkpoint.MANIFEST).exists, "a first checkpoint")
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        time.sleep(second_after)
        proc.send_signal(signal.SIGINT)
        return ended(proc, directory)


def kill_while_saving(tmp_path, name, delay):
    """SIGKILL `delay` s after the first checkpoint exists, in a run that saves after every step
    (most of a step's time is its save, so most kills land in one, over an older checkpoint)."""
    directory = tmp_path / name
    with open(tmp_path / f"{name}.err", "w") as err:
        proc = start(err, "--save", directory, "--save-every", "1")
        wait_until(proc, (directory / checkpoint.MANIFEST).exists, "a first checkpoint")
        time.sleep(delay)
        proc.kill()
        return ended(proc, directory)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """All trials at once (each in its own thread and process, to share the start-up time), then
    one process that runs the uninterrupted reference and resumes every trial's checkpoint."""
    tmp_path = tmp_path_factory.mktemp("crash")
    rng = random.Random(20261127)
    trials = [(ctrl_c, "ctrl_c0", rng.randrange(STEPS - 2), rng.uniform(0.0, 0.2)),
              (ctrl_c, "ctrl_c1", rng.randrange(STEPS - 2), rng.uniform(0.0, 0.2)),
              (ctrl_c_twice, "ctrl_c_twice", rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.05)),
              (kill_while_saving, "sigkill0", rng.uniform(0.0, 1.5)),
              (kill_while_saving, "sigkill1", rng.uniform(0.0, 1.5))]
    with ThreadPoolExecutor(len(trials)) as pool:
        outcomes = dict(zip([name for _, name, *_ in trials], pool.map(lambda t: t[0](tmp_path, *t[1:]), trials)))
    resumable = [name for name, (_, _, step) in outcomes.items() if step is not None]
    common = " ".join(["finetune", *TINY])
    run_in_one_process(f"{common} --save {tmp_path / 'reference'} --json {tmp_path / 'reference.json'}",
                       *[f"{common} --resume {tmp_path / n} --save {tmp_path / n} --json {tmp_path / n}.json"
                         for n in resumable])
    return tmp_path, outcomes


def assert_same_run(tmp_path, resumed: Path):
    reference = tmp_path / "reference"
    a, b = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{resumed.name}: weights differ"
    losses = [json.loads((tmp_path / f"{d.name}.json").read_text())[0]["losses"] for d in (reference, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


@pytest.mark.parametrize("name", ["ctrl_c0", "ctrl_c1", "ctrl_c_twice"])
def test_ctrl_c_at_a_random_moment_then_resume_equals_the_uninterrupted_run(crashed, name):
    tmp_path, outcomes = crashed
    rc, out, saved_step = outcomes[name]
    assert rc in (0, 130), (rc, out, (tmp_path / f"{name}.err").read_text()[-2000:])
    reported = re.search(r"interrupted at step (\d+): checkpoint saved", out)
    if name != "ctrl_c_twice":
        # the signal came during training (a checkpoint of that step) or after it (the final one)
        assert saved_step == (int(reported.group(1)) if reported else STEPS)
    else:
        assert saved_step >= 4  # the checkpoint saved before the two Ctrl-C, or a later one
    assert_same_run(tmp_path, tmp_path / name)


@pytest.mark.parametrize("name", ["sigkill0", "sigkill1"])
def test_sigkill_during_a_save_then_resume_equals_the_uninterrupted_run(crashed, name):
    tmp_path, outcomes = crashed
    rc, _, saved_step = outcomes[name]
    assert rc == -signal.SIGKILL and saved_step >= 1  # a complete checkpoint, the old or the new one
    assert_same_run(tmp_path, tmp_path / name)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]
    assert leftovers == []  # the resumed run's save cleared what the kill left behind
