"""A job's checkpoint: what it holds, writing it (atomically, through hift_rt.checkpoint) and
reading it back, every field checked before anything is loaded.

A checkpoint directory holds the model (save_pretrained), the tokenizer when it is a Hugging
Face one, and STATE_FILE:

    {"step": int, "method": {"optimizer": <HiFTOptimizer state dict>, "grad_scaler": {...}},
     "scheduler": <LambdaLR state dict>, "sampler": <the window generator's uint8 state>,
     "history": {"losses", "memory_GiB", "step_seconds": one number per step},
     "heldout_start": float, "tokenizer": "bytes" | "hf", "job": <run options>}

`read_checkpoint` verifies the manifest (hift_rt.checkpoint), loads STATE_FILE with
weights_only=True (no code runs) and checks every field against what a save writes; the
optimizer's own state is checked by its load_state_dict, before it changes anything. A damaged
or edited file is a JobError naming the field. `write_checkpoint` turns every write error
(ENOSPC, EIO, EROFS, permissions; also as safetensors and torch.save wrap them) into one
JobError line and leaves the directory as it was.

Owns: STATE_FILE, the state's layout and checks, read_checkpoint, write_checkpoint. May call:
hift_rt.checkpoint, hift_rt.job.options (check_saved_options), hift_rt.job.data
(ByteTokenizer), hift_rt.job.errors, torch.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import checkpoint
from .data import ByteTokenizer
from .errors import JobError, first_line
from .options import check_saved_options

STATE_FILE = "hift_rt_state.pt"
HISTORY = ("losses", "memory_GiB", "step_seconds")
_GENERATOR_STATE = torch.Generator().get_state()  # a CPU generator's state: its size and dtype


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_state(state, listed_step: int, source: str) -> None:
    """JobError naming the field for anything in a STATE_FILE (loaded: `state`) that a save of
    step `listed_step` cannot have written; `source` names the file in the message."""
    if not isinstance(state, dict) or not _count(state.get("step")) or state["step"] != listed_step:
        raise JobError(f"{source} is not the state of the manifest's step {listed_step} "
                       "(model and state do not belong together)")
    step = listed_step

    def refuse(field: str, what: str):
        raise JobError(f"{source}: {field} {what} (the file was edited or damaged)")

    for key, kind in (("method", dict), ("scheduler", dict), ("history", dict), ("job", dict)):
        if not isinstance(state.get(key), kind):
            refuse(repr(key), f"is {type(state.get(key)).__name__}, not a {kind.__name__}")
    if state.get("tokenizer") not in ("bytes", "hf"):
        refuse("'tokenizer'", f"is {state.get('tokenizer')!r}, not 'bytes' or 'hf'")
    heldout = state.get("heldout_start")
    if not _number(heldout) or math.isinf(heldout):  # NaN: a held-out text shorter than a window
        refuse("'heldout_start'", f"is {heldout!r}, not a finite number or NaN")
    sampler = state.get("sampler")
    if not torch.is_tensor(sampler) or sampler.dtype != _GENERATOR_STATE.dtype or \
            sampler.shape != _GENERATOR_STATE.shape:
        refuse("'sampler'", f"is not a random generator's state ({_GENERATOR_STATE.numel()} bytes)")
    history = state["history"]
    for key in HISTORY:
        values = history.get(key)
        if not isinstance(values, list) or len(values) != step or not all(_number(v) for v in values):
            refuse(f"history {key!r}", f"is not a list of {step} numbers (one per step)")
    if not all(math.isfinite(v) for v in history["losses"]) or \
            not all(math.isfinite(v) and v >= 0 for v in history["step_seconds"]):
        refuse("history", "has a non-finite loss or a step time that is not a finite number >= 0")
    scheduler = state["scheduler"]
    base_lrs = scheduler.get("base_lrs")
    if scheduler.get("last_epoch") != step or not isinstance(base_lrs, list) or \
            not all(_number(lr) and math.isfinite(lr) and lr >= 0 for lr in base_lrs):
        refuse("'scheduler'", f"is not a schedule at step {step} with finite learning rates >= 0")
    method = state["method"]
    if not isinstance(method.get("optimizer"), dict):
        refuse("the optimizer state", "is missing")
    scaler = method.get("grad_scaler")
    if scaler is not None and not (
            isinstance(scaler, dict) and _number(scaler.get("scale")) and 0 < scaler["scale"] < math.inf
            and _number(scaler.get("growth_factor")) and 1 < scaler["growth_factor"] < math.inf
            and _number(scaler.get("backoff_factor")) and 0 < scaler["backoff_factor"] < 1
            and _count(scaler.get("growth_interval")) and scaler["growth_interval"] > 0
            and _count(scaler.get("_growth_tracker"))):
        refuse("the GradScaler state", "is not a scale > 0 with factors and counts torch accepts")
    check_saved_options(state["job"], f"{source}")


def read_checkpoint(path: str) -> dict:
    """The verified state of the checkpoint in `path` (manifest checksums, every field of the
    state file checked); JobError naming --resume otherwise."""
    directory = Path(path)
    try:
        checkpoint.recover(directory)
    except (OSError, checkpoint.CheckpointError) as exc:
        raise JobError(f"--resume {path}: {exc}") from None
    if not directory.is_dir():
        raise JobError(f"--resume: no such directory: {path}")
    if not (directory / STATE_FILE).is_file():
        raise JobError(f"--resume {path}: no {STATE_FILE} (not a directory written by --save)")
    try:
        listed = checkpoint.manifest(directory)
    except (checkpoint.CheckpointError, OSError) as exc:
        raise JobError(f"--resume {path}: {exc}") from None
    if STATE_FILE not in listed["files"]:
        raise JobError(f"--resume {path}: the manifest does not list {STATE_FILE}")
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- a damaged pickle raises anything
        raise JobError(f"--resume {path}: cannot read {STATE_FILE} ({first_line(exc)})") from None
    check_state(state, listed["step"], f"--resume {path}: {STATE_FILE}")
    return state


def _write_state(state: dict, path: Path) -> None:
    # Through a Python file, not a path: torch's own file writer reports a failed write only as
    # "unexpected pos ..."; through a Python file the OSError (ENOSPC, EIO) is the RuntimeError's
    # context, where checkpoint.os_error_in finds it.
    with open(path, "wb") as f:
        torch.save(state, f)


def write_checkpoint(save: str, model, tokenizer, state: dict) -> None:
    """Write `state` (see the module docstring), the model and the tokenizer as the checkpoint
    of state["step"] in `save` (the --save option's value); JobError with one line for a
    directory that is not ours to replace or a write error, which leave `save` as it was."""
    def write(directory: Path) -> None:
        try:
            model.save_pretrained(directory)
            if not isinstance(tokenizer, ByteTokenizer):
                tokenizer.save_pretrained(directory)
            _write_state(state, directory / STATE_FILE)
        except Exception as exc:  # noqa: BLE001 -- a write error, however the library wraps it
            error = checkpoint.os_error_in(exc)
            if error is None:
                raise
            raise error from None

    try:
        checkpoint.save(Path(save), write, state["step"])
    except checkpoint.CheckpointError as exc:
        raise JobError(f"--save {save}: {exc}") from None
    except OSError as exc:
        raise JobError(f"--save {save}: cannot write the checkpoint of step {state['step']} "
                       f"({exc.strerror or exc}); {save} is as it was") from None
