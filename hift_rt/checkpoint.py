"""Checkpoint directories that a crash cannot leave half-written.

`save(directory, write, step)` calls `write(tmp)` to fill a fresh directory `tmp` beside
`directory` (same parent, so the same file system), adds the manifest MANIFEST last,

    {"format": 1, "step": <int>, "files": {<relative path>: {"bytes": <int>, "sha256": <hex>}}},

flushes every file and the directory to disk (fsync), and only then switches: on Linux one
renameat2(RENAME_EXCHANGE) swaps the two directories atomically; where that call is missing or
refused, `directory` is renamed to `.<name>.previous` and the new one into its place, and
`recover()` puts the previous one back if a crash fell between those two renames. The previous
checkpoint is deleted only after the switch. So whenever a process dies, `directory` (after
`recover()`) is either the complete old checkpoint or the complete new one.

`manifest(directory)` recovers, then checks every file the manifest lists (present, size,
sha256) and returns the manifest; anything else raises CheckpointError with one line that names
the file. One process writes a directory at a time.

Owns: the on-disk switch, the manifest and its verification. May call: os, hashlib, json,
ctypes (renameat2) and shutil; it knows nothing of torch or models.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

MANIFEST = "hift_rt_checkpoint.json"
FORMAT = 1
_SAVING = ".saving-"      # infix of the temporary directory of a save in progress
_PREVIOUS = ".previous"   # suffix of the old checkpoint while the fallback switch runs


class CheckpointError(Exception):
    """A checkpoint directory that is incomplete, changed or corrupt."""


def _hidden(directory: Path, suffix: str) -> Path:
    return directory.parent / f".{directory.name}{suffix}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # A directory's entries reach the disk only with an fsync of the directory itself.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems (and Windows) cannot fsync a directory
        if not path.is_dir() or exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where unavailable."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without RENAME_EXCHANGE
    raise OSError(code, f"cannot switch {b} to the new checkpoint: {os.strerror(code)}")


def recover(directory: Path) -> None:
    """Finish what a crash interrupted: put back a previous checkpoint that the fallback switch
    had moved aside, and delete it where the switch completed."""
    previous = _hidden(directory, _PREVIOUS)
    if previous.exists():
        if directory.exists():
            shutil.rmtree(previous)
        else:
            os.rename(previous, directory)
        _fsync(directory.parent)


def _remove_stale_saves(directory: Path) -> None:
    """Delete what saves killed midway left behind (never a checkpoint: see save())."""
    prefix = f".{directory.name}{_SAVING}"
    for stale in directory.parent.iterdir():
        if stale.name.startswith(prefix):
            shutil.rmtree(stale, ignore_errors=True)


def save(directory: Path, write: Callable[[Path], None], step: int) -> None:
    """Write a checkpoint of `step` into `directory` through `write(tmp)`, atomically (see the
    module docstring). `write` puts files into the empty directory `tmp`."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    _remove_stale_saves(directory)
    tmp = directory.parent / f".{directory.name}{_SAVING}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # not tempfile.mkdtemp: the checkpoint gets the umask's permissions, not 0o700
    try:
        write(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        listed = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": listed}, indent=1))
        for path in [*files, tmp / MANIFEST, *sorted(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            _fsync(path)
        if not directory.exists():
            os.rename(tmp, directory)
        elif _exchange(tmp, directory):
            pass  # tmp now holds the previous checkpoint, deleted below
        else:
            previous = _hidden(directory, _PREVIOUS)
            os.rename(directory, previous)
            os.rename(tmp, directory)
            tmp = previous
        _fsync(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest(directory: Path) -> dict:
    """The verified manifest of the checkpoint in `directory`: every file it lists is there with
    its size and sha256; CheckpointError otherwise."""
    directory = Path(directory)
    recover(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no {MANIFEST}: not a complete checkpoint written by --save")
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
        form = listed["format"]
        step = int(listed["step"])
        files = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from None
    if form != FORMAT:
        raise CheckpointError(f"{MANIFEST} has format {form!r}; this hift_rt reads format {FORMAT}")
    for name, (size, digest) in files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing (the manifest lists it)")
        if file.stat().st_size != size or sha256(file) != digest:
            raise CheckpointError(f"{name} does not match the manifest's checksum (changed or corrupt)")
    return {"step": step, "files": sorted(files)}
