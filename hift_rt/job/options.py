"""The job's options: the command line (add_arguments), the checks of every value and output path
before anything is built (check_arguments, check_output_paths), and the run options a checkpoint
fixes (settle_run_options), with the checks of a checkpoint's saved ones (check_saved_options).

`--save DIR` takes a missing DIR, an empty directory, or a checkpoint (hift_rt.checkpoint's
rules; a symlink is followed and the checkpoint written at its target); DIR may not hold the
--data file, the --model directory or the --resume checkpoint, nor lie inside the --resume
checkpoint unless it is that checkpoint. A save only ever replaces DIR itself, so writing
beside the data (`--data train.txt --save ckpt`) is safe and allowed.

Owns: the options' names, defaults and checks. May call: hift_rt.checkpoint (check_target),
hift_rt.rotation (the strategies' names), hift_rt.job.errors, torch.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .. import checkpoint, methods
from ..rotation import STRATEGIES
from .errors import JobError

OPTIMS = ("adamw", "adam", "adagrad", "sgd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = ("fp32", "bf16", "int8")
MASTER_WEIGHTS = {"auto": "auto", "fp32": "fp32", "kahan": "kahan", "none": False}  # --master -> wrap's
# Options that the optimizer state fixes (its layout, or values load_state_dict restores): a
# resumed run takes them from the checkpoint and refuses a different value. (name, default; the
# dtype's default depends on the device)
RUN_OPTIONS = (("optim", "adamw"), ("strategy", "bottom_up"), ("units_per_group", 1), ("dtype", None),
               ("lr", 1e-3), ("weight_decay", 0.0))
# Options of how the state is stored: a resumed run takes them from the checkpoint unless given,
# and may change them (load_state_dict converts moments of another format and derives the master
# weights from what the checkpoint holds).
FORMAT_OPTIONS = (("state_dtype", "fp32"), ("master", "auto"))
PATH_OPTIONS = ("model", "data", "save", "resume", "json", "plot")
MAX_SEED = 2 ** 63 - 1
# --efficient-loss auto: on from this vocabulary size (Llama-2's 32000 and up). The model's own loss
# keeps the logits, their fp32 copy and fp32 log-softmax (10 bytes per token and vocabulary entry
# in bf16) and allocates as much again in its backward: at 32000 and the default 8 x 128 tokens,
# 0.6 GiB, far more than a layer's activations; for small vocabularies (the default model's 256
# bytes) it is small, and the model's own loss is kept.
EFFICIENT_LOSS_MIN_VOCAB = 32000


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="a local Hugging Face model directory (default: a small random Llama)")
    parser.add_argument("--data", help="a .txt file, or .jsonl with a \"text\" field (default: Python's pydoc topics)")
    parser.add_argument("--optim", choices=OPTIMS,
                        help="default: adamw, or the checkpoint's with --resume")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="default: bottom_up, or the checkpoint's with --resume")
    parser.add_argument("--units-per-group", type=int, help="default: 1, or the checkpoint's with --resume")
    parser.add_argument("--lr", type=float, help="default: 1e-3, or the checkpoint's with --resume")
    parser.add_argument("--lr-schedule", default="cosine", choices=("constant", "linear", "cosine"))
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, help="default: 0, or the checkpoint's with --resume")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences per micro-batch; under torchrun per rank (R ranks: R x this in all)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    parser.add_argument("--dtype", choices=("auto", *DTYPES),
                        help="weights' dtype; bf16/fp16 get master weights as --master says (default auto: bf16 "
                             "on CUDA, fp32 on CPU; the checkpoint's with --resume)")
    parser.add_argument("--state-dtype", choices=STATE_DTYPES,
                        help="how the optimizer stores its moments: fp32, bf16, or int8 (blockwise 8-bit, one fp32 "
                             "scale per 128); default fp32, or the checkpoint's with --resume, where another value "
                             "converts the saved state")
    parser.add_argument("--master", choices=tuple(MASTER_WEIGHTS),
                        help="master weights of bf16/fp16 weights: fp32 (a copy), kahan (a compensation buffer in "
                             "the weights' dtype, 2 bytes per parameter), none (plain low-precision updates: lossy); "
                             "auto: fp32, none for fp32 weights. Default auto, or the checkpoint's with --resume, "
                             "where another value converts the saved state")
    parser.add_argument("--offload", default="auto", choices=("auto", "on", "off"),
                        help="optimizer state of inactive groups in pinned host memory (auto: on CUDA)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:1, ... (under torchrun: auto, cpu or cuda, each rank on "
                             "cuda:LOCAL_RANK)")
    parser.add_argument("--efficient-loss", default="auto", choices=("auto", "on", "off"),
                        help="the loss without full logits (hift_rt.efficient_lm_loss); auto: for vocabularies of "
                             f"{EFFICIENT_LOSS_MIN_VOCAB} tokens or more")
    parser.add_argument("--compare", choices=tuple(name for name in methods.METHODS if name != "hift"),
                        help="also run another method on the same model and data: full (torch AdamW; under torchrun "
                             "in DistributedDataParallel) or a peer (one process: pip install 'hift_rt[peers]')")
    parser.add_argument("--save", help="directory for the model (save_pretrained) and optimizer/rotation state: a new "
                        "or empty directory, or a checkpoint written by --save (replaced atomically)")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also save every N steps (default 0: at the end and on Ctrl-C only)")
    parser.add_argument("--resume", help="continue from a directory written by --save")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="PNG with loss curves and GPU memory per step (matplotlib)")
    parser.add_argument("--json", help="write the figures to this file")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _finite_at_least_0(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def check_saved_options(saved, source: str) -> dict:
    """The run options of a checkpoint's state file (`source` names it), each checked as the
    command line checks it: a value this hift_rt cannot run (an edited or damaged file) is a
    JobError naming the option. Options it lacks take their defaults (an older checkpoint)."""
    if not isinstance(saved, dict):
        raise JobError(f"{source}: its run options are a {type(saved).__name__}, not a table of options")
    def one_of(names):
        return lambda v: isinstance(v, str) and v in names  # a list or dict would not even hash

    valid = {"optim": one_of(OPTIMS), "strategy": one_of(STRATEGIES),
             "units_per_group": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "dtype": one_of(DTYPES), "lr": _finite_at_least_0, "weight_decay": _finite_at_least_0,
             "state_dtype": one_of(STATE_DTYPES), "master": one_of(MASTER_WEIGHTS)}
    unknown = sorted(str(name) for name in saved if name not in valid)
    if unknown:
        raise JobError(f"{source}: unknown run option(s) {unknown} (written by another version, or edited)")
    for name, value in saved.items():
        if not valid[name](value):
            raise JobError(f"{source}: the saved {_flag(name)} {value!r} is not a value this hift_rt runs "
                           "(the checkpoint was edited or damaged)")
    return saved


def settle_run_options(args, saved: dict, log) -> None:
    """Fill the run's options from the checkpoint (resume: `saved`, checked by
    check_saved_options) or the defaults: refuse a value of RUN_OPTIONS that differs from the
    checkpoint's; a FORMAT_OPTIONS one converts the state."""
    for name, default in RUN_OPTIONS + FORMAT_OPTIONS:
        given, flag = getattr(args, name), _flag(name)
        if name in saved and given is not None and given != saved[name]:
            if (name, default) in RUN_OPTIONS:
                raise JobError(f"--resume {args.resume} was saved with {flag} {saved[name]}; this run asks for "
                               f"{flag} {given} (drop {flag} to continue the saved run)")
            log(f"note: --resume {args.resume} was saved with {flag} {saved[name]}; its optimizer state is "
                f"converted to {flag} {given}")
        if given is None:
            given = saved.get(name, default)
        setattr(args, name, given)
    if args.dtype is None:
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    if args.master in ("fp32", "kahan") and args.dtype == "fp32":
        raise JobError(f"--master {args.master} needs --dtype bf16 or fp16 (fp32 weights are their own master)")


def pick_device(name: str, ranks) -> torch.device:
    """--device as a torch.device. Under torchrun (more than one rank) "auto" and "cuda" mean
    cuda:LOCAL_RANK, one GPU per rank."""
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if name != "auto" and (kind != "cuda" or (index and not index.isdigit())):
        raise JobError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise JobError(f"--device {name}: no CUDA GPU is available here")
    count = torch.cuda.device_count()
    if ranks.world > 1:
        if index:
            raise JobError(f"--device {name}: under torchrun each rank runs on cuda:LOCAL_RANK; "
                           "give --device cuda or auto")
        if ranks.local_rank >= count:
            raise JobError(f"LOCAL_RANK {ranks.local_rank}: this machine has {count} CUDA device(s); "
                           f"start at most {count} ranks per machine (--nproc-per-node)")
        return torch.device("cuda", ranks.local_rank)
    if index and int(index) >= count:
        raise JobError(f"--device {name}: this machine has {count} CUDA device(s)")
    return torch.device("cuda" if name == "auto" else name)


def check_arguments(args, ranks) -> None:
    """Values that cannot work, refused before anything is built (the same on every rank);
    `args.device` becomes a torch.device."""
    for name in PATH_OPTIONS:
        if getattr(args, name) == "":
            raise JobError(f"{_flag(name)} is an empty path; give a path or leave the option out")
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(args, name) < 1:
            raise JobError(f"{_flag(name)} must be >= 1, got {getattr(args, name)}")
    if args.units_per_group is not None and args.units_per_group < 1:
        raise JobError(f"--units-per-group must be >= 1, got {args.units_per_group}")
    for name in ("lr", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise JobError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    if args.warmup_steps < 0 or args.save_every < 0:
        raise JobError("--warmup-steps and --save-every must be >= 0")
    if args.save_every and not args.save:
        raise JobError("--save-every needs --save DIR")
    if not 0 <= args.seed <= MAX_SEED:
        raise JobError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    args.device = pick_device(args.device, ranks)
    args.offload = {"auto": "auto", "on": True, "off": False}[args.offload]
    args.max_grad_norm = args.max_grad_norm or None
    if args.dtype == "auto":
        args.dtype = None
    if args.resume and args.model:
        raise JobError("--resume takes the model from the checkpoint; drop --model")
    if args.resume and args.compare:
        raise JobError(f"--compare {args.compare} trains from the start; it cannot continue a --resume")


def _check_writable(option: str, directory: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".hift-rt-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise JobError(f"{option}: cannot write into {directory} ({exc.strerror or exc})") from None


def _within(path: Path, directory: Path) -> bool:
    """Whether `path` is `directory` or lies below it (both resolved)."""
    return path == directory or directory in path.parents


def _check_save(args) -> None:
    """--save: see the module docstring."""
    target = Path(os.path.realpath(args.save))
    shown = args.save if target == Path(os.path.abspath(args.save)) else f"{args.save} (a link to {target})"
    try:
        checkpoint.check_target(target, shown)
    except checkpoint.CheckpointError as exc:
        raise JobError(f"--save: {exc}") from None
    for option, source in (("--data", args.data), ("--model", args.model), ("--resume", args.resume)):
        if source is None:
            continue
        real = Path(os.path.realpath(source))
        if option == "--resume" and real == target:
            continue  # continuing a checkpoint in place: it is replaced by the next one
        if _within(real, target):
            raise JobError(f"--save {args.save} would replace the directory that holds {option} {source}: "
                           "give another --save directory")
        if option == "--resume" and _within(target, real):
            raise JobError(f"--save {args.save} lies inside the --resume checkpoint {source}: give --save "
                           f"{args.resume} to continue it in place, or a directory outside it")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise JobError(f"--save {args.save}: {existing} is a file, not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(f"--save {args.save}: cannot create {target.parent} ({exc.strerror or exc})") from None
    _check_writable(f"--save {args.save}", target.parent)
    if target.exists():
        _check_writable(f"--save {args.save}", target)


def check_output_paths(args) -> None:
    """Every output can be written, and --save takes nothing that is not ours: checked before the
    first step, so no trained model is lost and no user file is replaced."""
    if args.save:
        _check_save(args)
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
        real = Path(os.path.realpath(path))
        if args.data is not None and real == Path(os.path.realpath(args.data)):
            raise JobError(f"{option} {path} is the --data file: give another file for the results")
        for checkpoint_option, directory in (("--save", args.save), ("--resume", args.resume)):
            if directory is not None and _within(real, Path(os.path.realpath(directory))):
                raise JobError(f"{option} {path} lies inside the {checkpoint_option} checkpoint {directory}, whose "
                               "files the next save replaces: give a file outside it")
        if Path(path).is_dir():
            raise JobError(f"{option}: {path} is a directory")
        if not Path(path).parent.is_dir():
            raise JobError(f"{option} {path}: no such directory: {Path(path).parent}")
        _check_writable(option, Path(path).parent)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise JobError("--plot needs matplotlib (pip install hift_rt[cli])") from None
