"""`hift-rt finetune` against a user's files: what `--save` refuses to replace, how a write error
ends (one `hift-rt: error:` line, exit code 2, the previous checkpoint whole and resumable, no
hidden folder left), and a damaged or edited checkpoint refused with a line naming the field.

Real write errors without root: RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG),
set around one in-process run; a full disk on a 512 KiB tmpfs where the test may mount one
(root), skipped elsewhere; EIO, EROFS and EACCES by raising them where the checkpoint writer
calls the file system.
"""
import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hift_rt import checkpoint, job
from hift_rt.job import state as job_state
from test_cli import assert_one_line, copy_with, run, tiny_hf_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model") / "model"
    tiny_hf_model(directory)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory, small):
    """A checkpoint of 3 steps of the small model."""
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    assert run("--steps", 3, "--save", directory, "--model", small) == 0
    return directory


def contents(directory):
    """{relative path: bytes} of every file below `directory`, hidden ones included."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*"))
            if p.is_file()}


def hidden(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


# ---- what --save refuses --------------------------------------------------------------------

def _precious(tmp_path):
    target = tmp_path / "mine"
    (target / "sub").mkdir(parents=True)
    (target / "precious.txt").write_text("years of notes")
    (target / "sub" / "deep.txt").write_text("more")
    return ["--save", target], "--save: {t}/mine is a directory that is not a hift_rt checkpoint (it holds precious.txt"


def _data_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text("the corpus " * 500)
    return ["--data", tmp_path / "corpus" / "train.txt", "--save", tmp_path / "corpus"], \
        "--save: {t}/corpus is a directory that is not a hift_rt checkpoint (it holds train.txt)"


def _data_inside_a_checkpoint(tmp_path, saved):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    (ckpt / "train.txt").write_text("the corpus " * 500)
    return ["--data", ckpt / "train.txt", "--save", ckpt], \
        "--save {t}/ckpt would replace the directory that holds --data {t}/ckpt/train.txt"


def _parent_of_resume(tmp_path, saved):
    shutil.copytree(saved, tmp_path / "runs" / "ckpt")
    return ["--resume", tmp_path / "runs" / "ckpt", "--save", tmp_path / "runs", "--steps", 5], \
        "--save: {t}/runs is a directory that is not a hift_rt checkpoint (it holds ckpt)"


def _inside_resume(tmp_path, saved):
    shutil.copytree(saved, tmp_path / "ckpt")
    return ["--resume", tmp_path / "ckpt", "--save", tmp_path / "ckpt" / "next", "--steps", 5], \
        "--save {t}/ckpt/next lies inside the --resume checkpoint {t}/ckpt"


def _damaged_checkpoint(tmp_path, saved):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    (ckpt / checkpoint.MANIFEST).write_text("{not json")
    return ["--save", ckpt], "--save: {t}/ckpt holds a damaged checkpoint"


@pytest.mark.parametrize("case", [_precious, _data_folder, _data_inside_a_checkpoint, _parent_of_resume,
                                  _inside_resume, _damaged_checkpoint])
def test_save_refuses_what_is_not_its_own_before_the_first_step(tmp_path, saved, small, capsys, case):
    argv, message = case(tmp_path, saved) if case.__code__.co_argcount == 2 else case(tmp_path)
    before = contents(tmp_path)
    capsys.readouterr()
    assert run("--steps", 2, *(["--model", small] if "--resume" not in argv else []), *argv) == 2
    out, _ = assert_one_line(capsys, message.format(t=tmp_path))
    assert "hift:" not in out  # refused before training
    assert contents(tmp_path) == before and not hidden(tmp_path)


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_results_never_go_over_the_data_or_into_a_checkpoint(tmp_path, saved, capsys, option):
    data = tmp_path / "train.txt"
    data.write_text("the corpus " * 500)
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    before = contents(tmp_path)
    for argv, message in (([option, data, "--data", data], f"{option} {data} is the --data file"),
                          ([option, ckpt / "run.out", "--resume", ckpt, "--steps", 5],
                           f"{option} {ckpt / 'run.out'} lies inside the --resume checkpoint"),
                          ([option, ckpt / checkpoint.MANIFEST, "--resume", saved, "--save", ckpt, "--steps", 5],
                           f"{option} {ckpt / checkpoint.MANIFEST} lies inside the --save checkpoint")):
        assert run("--steps", 2, *argv) == 2
        assert_one_line(capsys, message)
    assert contents(tmp_path) == before


@pytest.mark.parametrize("option", ["--resume", "--save", "--data", "--model", "--json", "--plot"])
def test_an_empty_path_is_refused(option, capsys):
    assert run("--steps", 1, option, "") == 2
    assert_one_line(capsys, f"{option} is an empty path; give a path or leave the option out")


def test_an_empty_directory_is_taken_and_a_symlink_is_followed(tmp_path, small):
    (tmp_path / "empty").mkdir()
    assert run("--steps", 2, "--save", tmp_path / "empty", "--model", small) == 0
    assert checkpoint.manifest(tmp_path / "empty")["step"] == 2
    (tmp_path / "disk").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "disk" / "target", target_is_directory=True)  # dangling until the first save
    for steps, resume in ((2, []), (4, ["--resume", link])):
        assert run("--steps", steps, "--save", link, *(resume or ["--model", small])) == 0
        assert link.is_symlink() and os.readlink(link) == str(tmp_path / "disk" / "target")
        assert checkpoint.manifest(tmp_path / "disk" / "target")["step"] == steps
        assert not hidden(tmp_path) and not hidden(tmp_path / "disk")


def test_files_a_user_put_into_a_checkpoint_survive_its_next_save(tmp_path, saved):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    (ckpt / "notes.txt").write_text("lr 1e-3 looked fine")
    (ckpt / "eval").mkdir()
    (ckpt / "eval" / "scores.json").write_text("{}")
    assert run("--steps", 5, "--resume", ckpt, "--save", ckpt) == 0
    assert (ckpt / "notes.txt").read_text() == "lr 1e-3 looked fine" and (ckpt / "eval" / "scores.json").exists()
    assert checkpoint.manifest(ckpt) == {"step": 5, "files": sorted(checkpoint.manifest(saved)["files"])}
    assert not hidden(tmp_path)


# ---- write errors ---------------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(limit):
    """Within `with`: the kernel refuses to write a file past `limit` bytes (EFBIG), as a full disk
    refuses a write: a real write error for safetensors and torch.save, with no root needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("failing,every", [("model.safetensors", 0), (job.STATE_FILE, 0), (job.STATE_FILE, 8)],
                         ids=["weights", "state", "state-at-save-every"])
def test_a_refused_write_ends_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, saved, capsys, failing,
                                                                              every):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    before = contents(ckpt)
    sizes = {name: (ckpt / name).stat().st_size for name in checkpoint.manifest(ckpt)["files"]}
    # 8 steps: every group has state, so the state file outgrows the weights (their moments: 2x)
    limit = sizes["model.safetensors"] // 2 if failing == "model.safetensors" else sizes["model.safetensors"] * 3 // 2
    with file_size_limit(limit):
        code = run("--steps", 10 if every else 8, "--resume", ckpt, "--save", ckpt, "--save-every", every)
    assert code == 2
    assert_one_line(capsys, f"--save {ckpt}: cannot write the checkpoint of step 8 (File too large); {ckpt} is as it was")
    assert contents(ckpt) == before and not hidden(tmp_path)
    assert run("--steps", 4, "--resume", ckpt, "--save", tmp_path / "resumed") == 0  # still resumable


@pytest.mark.parametrize("where,code", [("state file", errno.EIO), ("fsync", errno.EIO),
                                        ("switch", errno.EROFS), ("state file", errno.EACCES)])
def test_eio_erofs_eacces_in_a_save_keep_the_previous_checkpoint(tmp_path, saved, capsys, monkeypatch, where, code):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    before = contents(ckpt)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "state file":  # torch.save writes into a Python file whose write fails midway
        real_open = open

        class Failing:
            def __init__(self, *args):
                self.file = real_open(*args)

            def write(self, data):
                self.file.write(data[:10])
                fail()

            def __getattr__(self, name):
                return getattr(self.file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        monkeypatch.setattr(job_state, "open", Failing, raising=False)
    elif where == "fsync":
        monkeypatch.setattr(checkpoint, "_fsync", fail)
    else:
        monkeypatch.setattr(checkpoint, "_exchange", fail)
    assert run("--steps", 5, "--resume", ckpt, "--save", ckpt) == 2
    assert_one_line(capsys, f"cannot write the checkpoint of step 5 ({os.strerror(code)}); {ckpt} is as it was")
    assert contents(ckpt) == before and not hidden(tmp_path)


@pytest.fixture
def tmpfs(tmp_path):
    """A 512 KiB tmpfs (room for one checkpoint of the small model, ~330 KB, not two); skipped
    where this process may not mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the file-size-limit test covers real write errors")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("every", [0, 2], ids=["final-save", "save-every"])
def test_a_full_disk_keeps_the_last_checkpoint_whole_and_resumable(tmpfs, tmp_path, small, capsys, every):
    ckpt = tmpfs / "ckpt"
    if every:  # the save at step 2 fits, the one at step 4 does not
        assert run("--steps", 6, "--save", ckpt, "--save-every", every, "--model", small) == 2
    else:
        assert run("--steps", 2, "--save", ckpt, "--model", small) == 0
        assert run("--steps", 4, "--resume", ckpt, "--save", ckpt) == 2
    assert_one_line(capsys, f"--save {ckpt}: cannot write the checkpoint of step 4 (No space left on device); "
                            f"{ckpt} is as it was")
    assert checkpoint.manifest(ckpt)["step"] == 2 and os.listdir(tmpfs) == ["ckpt"]
    # resumed from the kept checkpoint, the run ends where one that never failed ends
    assert run("--steps", 6, "--resume", ckpt, "--save", tmp_path / "resumed") == 0
    assert run("--steps", 6, "--save", tmp_path / "whole", "--model", small) == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- damaged or edited checkpoints ----------------------------------------------------------

def _edit(state, how):
    optimizer = state["method"]["optimizer"]
    entry = optimizer["state"][min(optimizer["state"])]
    if how == "dtype fp64":
        state["job"]["dtype"] = "fp64"
    elif how == "master fp8":
        state["job"]["master"] = "fp8"
    elif how == "units_per_group a string":
        state["job"]["units_per_group"] = "1"
    elif how == "an unknown run option":
        state["job"]["learning_rate"] = 0.1
    elif how == "dtype a list":
        state["job"]["dtype"] = ["fp32"]
    elif how == "run options a list":
        state["job"] = ["adamw"]
    elif how == "losses as strings":
        state["history"]["losses"] = [str(x) for x in state["history"]["losses"]]
    elif how == "a history of another length":
        state["history"]["step_seconds"] = state["history"]["step_seconds"][:-1]
    elif how == "a schedule of another step":
        state["scheduler"]["last_epoch"] = 7
    elif how == "a sampler of another size":
        state["sampler"] = state["sampler"][:100]
    elif how == "a tokenizer of another kind":
        state["tokenizer"] = "sentencepiece"
    elif how == "exp_avg fp16":
        entry["exp_avg"] = entry["exp_avg"].half()
    elif how == "exp_avg int64":
        entry["exp_avg"] = entry["exp_avg"].long()
    elif how == "step a huge tensor":
        entry["step"] = torch.zeros(4096)
    elif how == "step a huge number":
        entry["step"] = torch.tensor(1e20)
    elif how == "state keys as strings":
        optimizer["state"] = {str(i): e for i, e in optimizer["state"].items()}
    return state


@pytest.mark.parametrize("how,message", [
    ("dtype fp64", "the saved --dtype 'fp64' is not a value this hift_rt runs"),
    ("master fp8", "the saved --master 'fp8' is not a value this hift_rt runs"),
    ("units_per_group a string", "the saved --units-per-group '1' is not a value this hift_rt runs"),
    ("an unknown run option", "unknown run option(s) ['learning_rate']"),
    ("run options a list", "'job' is list, not a dict"),
    ("dtype a list", "the saved --dtype ['fp32'] is not a value this hift_rt runs"),
    ("losses as strings", "history 'losses' is not a list of 3 numbers (one per step)"),
    ("a history of another length", "history 'step_seconds' is not a list of 3 numbers"),
    ("a schedule of another step", "'scheduler' is not a schedule at step 3"),
    ("a sampler of another size", "'sampler' is not a random generator's state"),
    ("a tokenizer of another kind", "'tokenizer' is 'sentencepiece', not 'bytes' or 'hf'"),
    ("exp_avg fp16", "cannot load the training state (ValueError: state 'exp_avg' of parameter"),
    ("exp_avg int64", "has dtype torch.int64; expected one of"),
    ("step a huge tensor", "'step' of parameter 'model.embed_tokens.weight' is a tensor of 4096 elements"),
    ("step a huge number", "is tensor(1.0000e+20), not a whole count of updates"),
    ("state keys as strings", "'state' has key '0' (str): its keys are parameter indices"),
])
def test_an_edited_state_file_is_refused_with_one_line_naming_the_field(tmp_path, saved, capsys, how, message):
    state = _edit(torch.load(saved / job.STATE_FILE, weights_only=True), how)
    torch.save(state, tmp_path / "edited.pt")
    ckpt = copy_with(saved, tmp_path / "ckpt", {job.STATE_FILE: tmp_path / "edited.pt"})
    capsys.readouterr()
    assert run("--steps", 5, "--resume", ckpt) == 2
    _, line = assert_one_line(capsys, message)
    assert f"--resume {ckpt}" in line


@pytest.mark.parametrize("manifest,message", [
    ("[" * 100000, "hift_rt_checkpoint.json is nested too deeply to be a manifest"),
    ('{"format": 1, "step": 3, "files": {"../outside.txt": {"bytes": 1, "sha256": "' + "0" * 64 + '"}}}',
     "it lists '../outside.txt', not a file inside the checkpoint"),
    ('{"format": 1, "step": "3", "files": {}}', "step '3' is not a count >= 0"),
    ('{"format": 1, "step": 3, "files": {"model.safetensors": {"bytes": -1, "sha256": "x"}}}',
     "the entry of 'model.safetensors' is not"),
])
def test_a_crafted_manifest_is_refused_and_deletes_nothing(tmp_path, saved, capsys, manifest, message):
    ckpt = shutil.copytree(saved, tmp_path / "ckpt")
    (tmp_path / "outside.txt").write_text("x")
    (ckpt / checkpoint.MANIFEST).write_text(manifest)
    before = contents(tmp_path)
    assert run("--steps", 5, "--resume", ckpt) == 2
    _, line = assert_one_line(capsys, message)
    assert line.startswith(f"hift-rt: error: --resume {ckpt}: hift_rt_checkpoint.json ")
    assert run("--steps", 5, "--resume", saved, "--save", ckpt) == 2  # nor is it replaced by a save
    assert_one_line(capsys, f"--save: {ckpt} holds a damaged checkpoint")
    assert contents(tmp_path) == before

