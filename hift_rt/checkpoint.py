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
checkpoint is in place, the old one's listed files are deleted, whatever they now hold, and any
other file a user put into the directory is moved into the new checkpoint at the same relative
path (a save whose files would take such a path is refused before it switches).

Leftovers. A save's temporary directory carries the marker WRITING ("<host> <pid> <boot id>:<start
time>", which tells its process from a later one given the same pid) from its creation through
the switch; an old checkpoint being cleared carries CLEARING, put in first and taken out last.
The next `save` clears what a killed save left (a marked directory whose process is gone, or one
holding nothing but directories), and refuses to start while another live process on this host
is saving into the same directory; anything else beside the checkpoint is left alone. Readers
(`manifest`, `recover`) only undo an interrupted fallback switch: they never touch a save's
temporary directory, which a running save may be writing.

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
import itertools
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional

MANIFEST = "hift_rt_checkpoint.json"
WRITING = ".hift_rt_writing"    # marker of a save's temporary directory: "<host> <pid> <identity>" of its writer
CLEARING = ".hift_rt_clearing"  # marker of an old checkpoint being cleared, put in first, taken out last
OURS = (MANIFEST, WRITING, CLEARING)  # entries of a checkpoint directory that no manifest lists
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
        if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in name.split("/")) \
                or name in OURS:
            raise CheckpointError(f"{MANIFEST} is unreadable (it lists {name!r}, not a file inside the checkpoint)")
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or \
                not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CheckpointError(f"{MANIFEST} is unreadable (the entry of {name!r} is not "
                                  "{\"bytes\": <count>, \"sha256\": <64 hex digits>})")
        files[name] = (size, digest)
    return {"step": step, "files": files}


def _foreign(directory: Path, listed) -> List[str]:
    """Entries below `directory` that no save wrote: neither listed by its manifest (`listed`,
    names) nor the manifest or a marker."""
    return [name for name in _entries(directory) if name not in listed and name not in OURS]


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
        shown = ", ".join(sorted(p.name for p in itertools.islice(directory.iterdir(), 3)))
        raise CheckpointError(f"{name} is a directory that is not a hift_rt checkpoint (it holds {shown}); a save "
                              "would replace it: give a new or empty directory, or a checkpoint's")
    try:
        _read_manifest(directory)
    except CheckpointError as exc:
        raise CheckpointError(f"{name} holds a damaged checkpoint ({exc}); a save cannot tell its files from "
                              "yours: give another directory") from None


def _process_identity(pid: int) -> str:
    """"<boot id>:<start time>" of process `pid` on this host, or "-" where /proc does not say.

    A pid is reused once its process ends; the boot and the start time (clock ticks since boot,
    field 22 of /proc/PID/stat) tell a later process with the same pid from the one that wrote
    a marker."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
        return f"{boot}:{fields[19]}"  # fields[0] is field 3 (the state)
    except (OSError, IndexError):
        return "-"


def _mark(directory: Path, marker: str) -> None:
    """Put `marker` into `directory`, naming this process: "<host> <pid> <identity>"."""
    pid = os.getpid()
    (directory / marker).write_text(f"{socket.gethostname()} {pid} {_process_identity(pid)}")


def _owner_alive(hidden: Path) -> bool:
    """Whether the process its markers name may still be working on `hidden`: one on another host
    (it cannot be checked from here), or a live process on this one other than this process (a
    save of this process that failed left it: nothing of ours runs beside a save) that is the
    marker's writer, not a later process given the same pid. A marker without the identity
    (written by an older hift_rt) is judged by its pid alone."""
    for marker in (CLEARING, WRITING):
        try:
            host, pid, *identity = (hidden / marker).read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            continue
        if host != socket.gethostname():
            return True
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's live process
        now = _process_identity(pid)
        return not identity or "-" in (identity[0], now) or identity[0] == now
    return False


def _ours_and_left(hidden: Path) -> bool:
    """Whether `hidden` (a `.NAME.saving-*` or `.NAME.previous` directory) is what a save of ours
    left and no live process is working on: it carries a marker or a readable manifest, or holds
    nothing but directories (removing them loses nothing)."""
    if not hidden.is_dir() or hidden.is_symlink():
        return False
    try:
        marked = (hidden / CLEARING).is_file() or (hidden / WRITING).is_file() or bool(_read_manifest(hidden))
    except CheckpointError:
        marked = False  # a user's folder named like ours, maybe with a file named like our manifest
    return (marked or not _entries(hidden)) and not _owner_alive(hidden)


def _discard(old: Path, home: Path) -> None:
    """Clear `old`, a directory a save of ours left, now that `home` holds the checkpoint:

    - an unfinished save (the WRITING marker, no manifest, no CLEARING): every file is ours;
    - otherwise the files its manifest lists (if it still has one) and the markers are ours, and
      any other entry (a user's file that was in the checkpoint directory) moves into `home` at
      the same relative path.

    CLEARING is put in first and taken out last, after the manifest and the sub-directories, so
    that a discard killed at any moment leaves a directory the next one recognises and finishes
    the same way."""
    clearing = (old / CLEARING).is_file()
    try:
        listed = set(_read_manifest(old)["files"])
    except CheckpointError:
        listed = None if (old / WRITING).is_file() and not clearing else set()
    if not clearing:
        _mark(old, CLEARING)
    if listed is not None:
        for name in _foreign(old, listed):
            target = home / name
            if os.path.lexists(target):
                raise CheckpointError(f"{old / name} is not part of a checkpoint and {target} exists: "
                                      "move one of them; nothing was deleted")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old / name, target)
    for name in _entries(old):
        if name not in (MANIFEST, CLEARING) and (listed is None or name in listed or name in OURS):
            os.unlink(old / name)
    if (old / MANIFEST).exists():
        os.unlink(old / MANIFEST)
    for root, _, _ in sorted(os.walk(old), key=lambda entry: -len(entry[0]))[:-1]:
        os.rmdir(root)
    os.unlink(old / CLEARING)
    os.rmdir(old)


def recover(directory: Path) -> None:
    """Finish what a crash interrupted in the fallback switch: put back a previous checkpoint that
    it had moved aside, or clear it where the switch completed. Readers call this; they never
    touch a save's temporary directory (a save may be running)."""
    directory = Path(os.path.realpath(directory))
    previous = _hidden(directory, _PREVIOUS)
    if _ours_and_left(previous):
        if directory.exists():
            _discard(previous, directory)
        else:
            os.rename(previous, directory)
        _fsync(directory.parent)


def _clear_left_saves(directory: Path) -> None:
    """The writer's recovery: clear what killed saves into `directory` left; refuse while another
    live process on this host is saving into it (one writer at a time)."""
    recover(directory)
    prefix = f".{directory.name}{_SAVING}"
    for hidden in directory.parent.iterdir():
        if not hidden.name.startswith(prefix) or not hidden.is_dir():
            continue
        if _ours_and_left(hidden):
            _discard(hidden, directory)
        elif (hidden / WRITING).is_file() or (hidden / CLEARING).is_file():
            marker = next(((hidden / m).read_text().split() for m in (CLEARING, WRITING) if (hidden / m).is_file()),
                          [])
            owner = " ".join(marker[:2])
            if marker[:1] == [socket.gethostname()]:
                raise CheckpointError(f"another process (host and pid: {owner}) is saving into {directory} through "
                                      f"{hidden.name}; one process writes a checkpoint at a time (if no such "
                                      f"process runs, the folder is a leftover: delete it)")


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
    _clear_left_saves(directory)
    tmp = directory.parent / f".{directory.name}{_SAVING}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)  # not tempfile.mkdtemp: the checkpoint gets the umask's permissions, not 0o700
    try:
        _mark(tmp, WRITING)  # stays through the switch: whoever finds tmp knows whose it is
        write(tmp)
        files = [tmp / name for name in _entries(tmp) if name != WRITING]
        listed = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": listed}, indent=1))
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
        os.unlink(directory / WRITING)
        _fsync(directory.parent)
        if old is not None:
            _discard(old, directory)
            _fsync(directory.parent)
    except OSError as exc:
        raise CheckpointError(f"the checkpoint of step {step} is in place, but flushing it or clearing the previous "
                              f"one failed ({exc.strerror or exc}); the next save clears what is left") from None


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
