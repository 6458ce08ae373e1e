"""Checkpoint directories that a crash cannot leave half-written, and that never take what is not
theirs.

`save(directory, write, step)` calls `write(tmp)` to fill a fresh directory `tmp` beside
`directory` (same parent, so the same file system), adds the manifest MANIFEST last,

    {"format": 1, "step": <int>, "files": {<relative path>: {"bytes": <int>, "sha256": <hex>}}},

flushes every file and the directory to disk (fsync), and only then switches: on Linux one
renameat2(RENAME_EXCHANGE) swaps the two directories atomically; where that call is missing or
refused, `directory` is renamed to `.<name>.previous` and the new one into its place, and
`recover()` puts the previous one back if a crash fell between those two renames. So whenever a
process dies, `directory` (after `recover()`) is either the complete old checkpoint or the
complete new one.

What is ours. `directory` must be missing, an empty directory, or a checkpoint (it holds a
manifest); anything else is refused (`check_target`), so a save never replaces a directory of
the user's. A symlink is followed: the checkpoint is written at its target and the link stays.
Inside a checkpoint only the files its manifest lists (and the manifest) are ours: once the new
checkpoint is in place, the old one's listed files are deleted and any other file a user put
into the directory is moved into the new checkpoint, at the same relative path (a save whose
files would take such a path is refused before it switches). A temporary directory carries the
marker file SAVING until its manifest is written; leftovers of a killed save are recognised by
the marker or the manifest and cleared by the next `recover()` (which `save` and `manifest`
call), anything else beside the checkpoint is left alone.

`manifest(directory)` recovers, then checks every file the manifest lists (present, size,
sha256) and returns the manifest; anything else raises CheckpointError with one line that names
the file. A manifest's file names must stay inside the directory. One process writes a directory
at a time. Write errors are OSError; `os_error_in(exc)` finds the OSError behind a library's
wrapped write error (safetensors' and torch's serializers report ENOSPC in their own types).

Owns: the on-disk switch, what belongs to a checkpoint, the manifest and its verification. May
call: os, hashlib, json, ctypes (renameat2) and shutil; it knows nothing of torch or models.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional

MANIFEST = "hift_rt_checkpoint.json"
SAVING = ".hift_rt_saving"  # marker inside a temporary directory until its manifest is written
FORMAT = 1
_SAVING = ".saving-"      # infix of the temporary directory of a save in progress
_PREVIOUS = ".previous"   # suffix of the old checkpoint while the fallback switch runs
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(Exception):
    """A checkpoint directory that is incomplete, changed or corrupt, or a directory that is not
    a checkpoint where one is about to be written."""


def _hidden(directory: Path, suffix: str) -> Path:
    return directory.parent / f".{directory.name}{suffix}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind `exc`: itself, one in its chain (__cause__, __context__: torch.save into
    a Python file raises RuntimeError during the file's OSError), or one rebuilt from an
    "(os error N)" in its message (safetensors' SafetensorError); None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


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


# ---- what a directory holds ----------------------------------------------------------------

def _entries(directory: Path) -> List[str]:
    """Every entry below `directory` that is not a directory (files, symlinks, sockets; a
    symlink to a directory counts as one entry, not followed), as relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        base = Path(root).relative_to(directory)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if os.path.islink(os.path.join(root, name))]
    return sorted(found)


def _read_manifest(directory: Path) -> dict:
    """The manifest of `directory`, its form checked (not the files): {"step", "files": {name:
    (bytes, sha256)}}; CheckpointError if it is missing or malformed."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no {MANIFEST}: not a complete checkpoint written by --save")
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(listed, dict) or not isinstance(listed.get("files"), dict):
        raise CheckpointError(f"{MANIFEST} is unreadable (not an object with a \"files\" object)")
    if listed.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST} has format {listed.get('format')!r}; this hift_rt reads format {FORMAT}")
    step = listed.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{MANIFEST} is unreadable (step {step!r} is not a count >= 0)")
    files: Dict[str, tuple] = {}
    for name, entry in listed["files"].items():
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")) \
                or name in (MANIFEST, SAVING) or not parts:
            raise CheckpointError(f"{MANIFEST} is unreadable (it lists {name!r}, not a file inside the checkpoint)")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or \
                not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CheckpointError(f"{MANIFEST} is unreadable (the entry of {name!r} is not "
                                  "{\"bytes\": <count>, \"sha256\": <64 hex digits>})")
        files[name] = (size, digest)
    return {"step": step, "files": files}


def _foreign(directory: Path, listed: Dict[str, tuple]) -> List[str]:
    """Entries of the checkpoint in `directory` that it did not write: neither listed by its
    manifest nor the manifest itself."""
    return [name for name in _entries(directory) if name not in listed and name not in (MANIFEST, SAVING)]


def check_target(directory: Path, name: Optional[str] = None) -> None:
    """CheckpointError unless a checkpoint may be written at `directory` (symlinks followed): it
    is missing, an empty directory, or a checkpoint (a readable manifest). `name` is how the
    message names the directory (default: its resolved path)."""
    directory = Path(os.path.realpath(directory))
    name = name or str(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise CheckpointError(f"{name} exists and is not a directory")
    if not any(directory.iterdir()):
        return
    if not (directory / MANIFEST).exists():
        shown = ", ".join(_entries(directory)[:3]) or ", ".join(sorted(p.name for p in directory.iterdir())[:3])
        raise CheckpointError(f"{name} is a directory that is not a hift_rt checkpoint (it holds {shown}); a save "
                              "would replace it: give a new or empty directory, or a checkpoint's")
    try:
        _read_manifest(directory)
    except CheckpointError as exc:
        raise CheckpointError(f"{name} holds a damaged checkpoint ({exc}); a save cannot tell its files from "
                              "yours: give another directory") from None


def _is_ours(hidden: Path) -> bool:
    """A directory a save of ours left: it carries the marker or a manifest, or it is empty (what
    an exchange with an empty target directory leaves; removing it loses nothing)."""
    return hidden.is_dir() and not hidden.is_symlink() and \
        ((hidden / SAVING).is_file() or (hidden / MANIFEST).is_file() or not any(hidden.iterdir()))


def _discard(old: Path, home: Path) -> None:
    """Delete the checkpoint (or unfinished save) in `old`, once `home` holds the current one:
    its listed files and its marker go; any other entry (a user's file that was in the
    checkpoint directory) moves into `home` at the same relative path. The manifest goes last,
    so that an interrupted discard is finished by the next one; then the empty directories."""
    try:
        listed = _read_manifest(old)["files"]
    except CheckpointError:
        listed = None  # an unfinished save: every file in it is ours
    if listed is not None:
        for name in _foreign(old, listed):
            target = home / name
            if os.path.lexists(target):
                raise CheckpointError(f"{old / name} is not part of a checkpoint and {target} exists: "
                                      "move one of them; nothing was deleted")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old / name, target)
    for name in _entries(old):
        if name != MANIFEST and (listed is None or name in listed or name == SAVING):
            os.unlink(old / name)
    if (old / MANIFEST).exists():
        os.unlink(old / MANIFEST)
    for root, _, _ in sorted(os.walk(old), key=lambda entry: -len(entry[0])):
        os.rmdir(root)


def recover(directory: Path) -> None:
    """Finish what a crash interrupted: put back a previous checkpoint that the fallback switch had
    moved aside, or discard it where the switch completed; clear what killed saves left."""
    directory = Path(os.path.realpath(directory))
    previous = _hidden(directory, _PREVIOUS)
    if _is_ours(previous):
        if directory.exists():
            _discard(previous, directory)
        else:
            os.rename(previous, directory)
        _fsync(directory.parent)
    prefix = f".{directory.name}{_SAVING}"
    if directory.parent.is_dir():
        for stale in directory.parent.iterdir():
            if stale.name.startswith(prefix) and _is_ours(stale):
                _discard(stale, directory)


def _check_no_collision(directory: Path, new: Path) -> None:
    """Before the switch: no file a user put into the checkpoint at `directory` may sit where the
    new checkpoint `new` has an entry (it would have to be deleted)."""
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    for name in _foreign(directory, _read_manifest(directory)["files"]):
        path = PurePosixPath(name)
        blocked = os.path.lexists(new / path) or any(  # an entry there, or a file where its folder goes
            os.path.lexists(new / p) and (os.path.islink(new / p) or not os.path.isdir(new / p))
            for p in list(path.parents)[:-1])
        if blocked:
            raise CheckpointError(f"{directory / name} is not part of the checkpoint and the new checkpoint would "
                                  "replace it: move it away; nothing was changed")


def save(directory: Path, write: Callable[[Path], None], step: int) -> None:
    """Write a checkpoint of `step` into `directory` through `write(tmp)`, atomically (see the
    module docstring). `write` puts files into the empty directory `tmp`. CheckpointError where
    `directory` is not ours to replace; OSError for a write error (the directory unchanged)."""
    directory = Path(os.path.realpath(directory))
    check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    tmp = directory.parent / f".{directory.name}{_SAVING}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # not tempfile.mkdtemp: the checkpoint gets the umask's permissions, not 0o700
    try:
        (tmp / SAVING).touch()
        write(tmp)
        files = [tmp / name for name in _entries(tmp) if name != SAVING]
        listed = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": listed}, indent=1))
        (tmp / SAVING).unlink()
        for path in [*files, tmp / MANIFEST, *sorted(p for p in tmp.rglob("*") if p.is_dir()), tmp]:
            _fsync(path)
        check_target(directory)  # what was a checkpoint at the start may have been replaced since
        _check_no_collision(directory, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if not directory.exists():
            os.rename(tmp, directory)
        elif _exchange(tmp, directory):
            old = tmp  # tmp now holds the previous checkpoint
        else:
            old = _hidden(directory, _PREVIOUS)
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(old, directory)  # the previous checkpoint goes back: nothing switched
                raise
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # not switched: tmp is the unused new checkpoint
        raise
    try:
        _fsync(directory.parent)
        if old is not None:
            _discard(old, directory)
            _fsync(directory.parent)
    except OSError as exc:
        raise CheckpointError(f"the checkpoint of step {step} is in place, but flushing it or clearing the previous "
                              f"one failed ({exc.strerror or exc}); the next save or --resume clears what is "
                              "left") from None


def manifest(directory: Path) -> dict:
    """The verified manifest of the checkpoint in `directory`: every file it lists is there with
    its size and sha256; CheckpointError otherwise."""
    directory = Path(directory)
    recover(directory)
    listed = _read_manifest(directory)
    for name, (size, digest) in listed["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing (the manifest lists it)")
        if file.stat().st_size != size or sha256(file) != digest:
            raise CheckpointError(f"{name} does not match the manifest's checksum (changed or corrupt)")
    return {"step": listed["step"], "files": sorted(listed["files"])}
