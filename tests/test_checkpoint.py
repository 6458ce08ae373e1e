"""hift_rt.checkpoint: a save killed at any moment leaves the old checkpoint or the new one,
complete; the manifest catches a changed, truncated or missing file.

A kill is simulated by raising at the n-th file-system operation of a save (each rename, exchange,
fsync and file written) and then doing nothing more, as a dead process does: the save's own
clean-up (`finally`) is skipped too. For every n, with and without renameat2(RENAME_EXCHANGE),
the directory is then checked as a restarted job would: `manifest()` (which recovers first) must
return step 1 (old) or 2 (new) with every file's bytes exactly those of that step.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from hift_rt import checkpoint


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


USER_FILES = {"notes.txt": b"mine", "sub/mine.bin": b"also mine"}


def contents(step):
    return {"model.bin": bytes([step]) * 5000, "sub/state.pt": f"state of step {step}".encode()}


def writer(step, operation):
    def write(directory):
        for name, data in contents(step).items():
            operation()
            (directory / name).parent.mkdir(exist_ok=True)
            (directory / name).write_bytes(data)
    return write


class Kill:
    """Counts file-system operations and raises Killed at operation number `at`; after that, the
    process is dead: rmtree does nothing."""

    def __init__(self, monkeypatch, at, exchange):
        self.at, self.count, self.dead = at, 0, False
        real_rename, real_fsync, real_rmtree = os.rename, checkpoint._fsync, shutil.rmtree
        real_exchange = checkpoint._exchange

        def counted(function):
            def run(*args, **kwargs):
                self.operation()
                return function(*args, **kwargs)
            return run

        monkeypatch.setattr(os, "rename", counted(real_rename))
        monkeypatch.setattr(os, "unlink", counted(os.unlink))
        monkeypatch.setattr(os, "rmdir", counted(os.rmdir))
        monkeypatch.setattr(checkpoint, "_fsync", counted(real_fsync))
        monkeypatch.setattr(checkpoint, "_exchange", counted(real_exchange if exchange else lambda a, b: False))
        monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None if self.dead else real_rmtree(*a, **k))

    def operation(self):
        self.count += 1
        if self.count == self.at:
            self.dead = True
            raise Killed


def assert_checkpoint_of(directory, steps):
    step = checkpoint.manifest(directory)["step"]
    assert step in steps
    for name, data in contents(step).items():
        assert (directory / name).read_bytes() == data, (step, name)
    return step


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("old", [True, False], ids=["over-an-old-checkpoint", "into-a-new-directory"])
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, exchange, old):
    seen, at = set(), 1
    while True:
        directory = tmp_path / f"run{at}" / "ckpt"
        if old:
            checkpoint.save(directory, writer(1, lambda: None), 1)
            for name, data in USER_FILES.items():  # a user's files in the checkpoint directory
                (directory / name).parent.mkdir(exist_ok=True)
                (directory / name).write_bytes(data)
        with monkeypatch.context() as patch:
            kill = Kill(patch, at, exchange)
            try:
                checkpoint.save(directory, writer(2, kill.operation), 2)
                finished = True
            except Killed:
                finished = False
        if not old and not directory.exists() and not (directory.parent / ".ckpt.previous").exists():
            seen.add(None)  # killed before the first checkpoint existed
        else:
            seen.add(assert_checkpoint_of(directory, {1, 2} if old else {2}))
        checkpoint.save(directory, writer(3, lambda: None), 3)  # the next save clears what was left
        assert assert_checkpoint_of(directory, {3}) == 3
        assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]
        if old:  # the user's files went wherever the checkpoint went, whatever the moment of the kill
            assert {name: (directory / name).read_bytes() for name in USER_FILES} == USER_FILES
        if finished:
            break
        at += 1
    assert at > 6 and seen == ({1, 2} if old else {None, 2})  # every moment tried, both outcomes met


def test_exchange_is_used_where_the_kernel_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("in a")
    if not checkpoint._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here; the two-rename path is tested above")
    assert (b / "x").read_text() == "in a" and not (a / "x").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.bin").write_bytes(b"\x01" * 4999), "model.bin does not match"),   # truncated
    (lambda d: (d / "model.bin").write_bytes(b"\x01" * 4999 + b"\x02"), "model.bin does not match"),  # changed
    (lambda d: (d / "sub" / "state.pt").unlink(), "sub/state.pt is missing"),
    (lambda d: (d / checkpoint.MANIFEST).unlink(), "no hift_rt_checkpoint.json"),
    (lambda d: (d / checkpoint.MANIFEST).write_text("{not json"), "is unreadable"),
    (lambda d: (d / checkpoint.MANIFEST).write_bytes(b"\xff\xfe"), "is unreadable"),
    (lambda d: (d / checkpoint.MANIFEST).write_text(json.dumps({"format": 1, "step": 1, "files": []})),
     "is unreadable"),
    (lambda d: (d / checkpoint.MANIFEST).write_text(json.dumps({"format": 9, "step": 1, "files": {}})), "format 9"),
])
def test_the_manifest_refuses_a_damaged_checkpoint(tmp_path, damage, message):
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, writer(1, lambda: None), 1)
    assert checkpoint.manifest(directory) == {"step": 1, "files": ["model.bin", "sub/state.pt"]}
    damage(directory)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.manifest(directory)


def test_save_refuses_a_file_in_place_of_the_directory(tmp_path):
    (tmp_path / "ckpt").write_text("a file")
    with pytest.raises(checkpoint.CheckpointError, match="exists and is not a directory"):
        checkpoint.save(tmp_path / "ckpt", writer(1, lambda: None), 1)
    assert (tmp_path / "ckpt").read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_a_directory_that_is_not_a_checkpoint_and_takes_an_empty_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(checkpoint.CheckpointError, match="is a directory that is not a hift_rt checkpoint "
                                                         r"\(it holds precious.txt\)"):
        checkpoint.save(tmp_path / "mine", writer(1, lambda: None), 1)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    checkpoint.save(tmp_path / "empty", writer(1, lambda: None), 1)
    assert assert_checkpoint_of(tmp_path / "empty", {1}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]


def test_a_symlink_is_followed_and_kept(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "ckpt")
    for step in (1, 2):
        checkpoint.save(tmp_path / "link", writer(step, lambda: None), step)
        assert (tmp_path / "link").is_symlink() and assert_checkpoint_of(tmp_path / "disk" / "ckpt", {step}) == step
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "link"]
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ckpt"]


def test_a_save_that_would_replace_a_users_file_is_refused_before_it_switches(tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, writer(1, lambda: None), 1)
    (directory / "extra.bin").write_bytes(b"the user's")

    def write_extra(target):
        writer(2, lambda: None)(target)
        (target / "extra.bin").write_bytes(b"the checkpoint's")

    with pytest.raises(checkpoint.CheckpointError, match="extra.bin is not part of the checkpoint and the new "
                                                         "checkpoint would replace it"):
        checkpoint.save(directory, write_extra, 2)
    assert assert_checkpoint_of(directory, {1}) == 1 and (directory / "extra.bin").read_bytes() == b"the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_reader_during_a_save_leaves_the_save_alone(tmp_path):
    """A --resume or an evaluation reading the checkpoint while a run saves into it: the reader
    must not take the save's temporary directory for a leftover."""
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, writer(1, lambda: None), 1)
    checkpoint.save(directory, writer(2, lambda: checkpoint.manifest(directory)), 2)
    assert assert_checkpoint_of(directory, {2}) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_live_save_of_another_process_is_waited_for_not_cleared_and_a_dead_ones_is(tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, writer(1, lambda: None), 1)
    running = tmp_path / ".ckpt.saving-123-abcd"
    running.mkdir()
    (running / "model.bin").write_bytes(b"half")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # written by this hift_rt (with the process's identity) and by an older one (pid alone)
        for marker in (f"{socket.gethostname()} {other.pid} {checkpoint._process_identity(other.pid)}",
                       f"{socket.gethostname()} {other.pid}"):
            (running / checkpoint.WRITING).write_text(marker)
            with pytest.raises(checkpoint.CheckpointError,
                               match=f"another process \\(host and pid: {socket.gethostname()} {other.pid}\\) is "
                                     "saving into"):
                checkpoint.save(directory, writer(2, lambda: None), 2)
            assert (running / "model.bin").read_bytes() == b"half" and assert_checkpoint_of(directory, {1}) == 1
    finally:
        other.kill()
        other.wait()
    checkpoint.save(directory, writer(2, lambda: None), 2)  # its writer is gone: a leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.skipif(checkpoint._process_identity(os.getpid()) == "-", reason="needs Linux's /proc")
def test_a_dead_saves_pid_taken_by_a_later_process_does_not_block_the_next_save(tmp_path):
    """The writer was killed and its pid given to another process: the marker's identity (boot id,
    start time) differs from that process's, so the save's leftovers are cleared, not waited for."""
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, writer(1, lambda: None), 1)
    left = tmp_path / ".ckpt.saving-123-abcd"
    left.mkdir()
    (left / "model.bin").write_bytes(b"half")
    boot, start = checkpoint._process_identity(os.getppid()).split(":")
    assert start.isdigit() and len(boot) >= 32
    # a live process (this one's parent) under the identity of one that started a tick earlier
    (left / checkpoint.WRITING).write_text(f"{socket.gethostname()} {os.getppid()} {boot}:{int(start) - 1}")
    checkpoint.save(directory, writer(2, lambda: None), 2)
    assert assert_checkpoint_of(directory, {2}) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_hidden_directories_that_are_not_a_saves_are_left_alone(tmp_path):
    directory = tmp_path / "ckpt"
    lookalike = tmp_path / ".ckpt.saving-mine"  # a user's, named like ours but without marker or manifest
    lookalike.mkdir()
    (lookalike / "data.txt").write_text("keep")
    (tmp_path / ".ckpt.previous").mkdir()
    (tmp_path / ".ckpt.previous" / "data.txt").write_text("keep too")
    broken = tmp_path / ".ckpt.saving-old"  # a file named like our manifest does not make it ours
    broken.mkdir()
    (broken / checkpoint.MANIFEST).write_text("{}")
    (broken / "precious.txt").write_text("keep as well")
    checkpoint.save(directory, writer(1, lambda: None), 1)
    checkpoint.save(directory, writer(2, lambda: None), 2)
    assert (lookalike / "data.txt").read_text() == "keep"
    assert (tmp_path / ".ckpt.previous" / "data.txt").read_text() == "keep too"
    assert (broken / "precious.txt").read_text() == "keep as well"


def test_os_error_in_finds_the_os_error_a_library_wrapped(tmp_path):
    assert checkpoint.os_error_in(ValueError("no file here")) is None
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:  # torch.save into a Python file: the OSError is the context
        assert checkpoint.os_error_in(wrapped).errno == 28
    found = checkpoint.os_error_in(Exception("Error while serializing: I/O error: File too large (os error 27)"))
    assert (found.errno, found.strerror) == (27, os.strerror(27))  # safetensors' SafetensorError
