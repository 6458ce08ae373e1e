"""The fine-tuning job behind `python -m hift_rt finetune` (the `hift-rt finetune` command).

With no options it trains a small Llama-shaped model from random weights on a corpus that ships
with Python (`pydoc_data.topics`, ~465 KB of English) through a byte-level tokenizer, on CUDA
when there is a GPU and otherwise on the CPU. `--model` takes a local Hugging Face model
directory, `--data` a .txt file or a UTF-8 .jsonl file with a "text" field. `--efficient-loss`
(auto: for vocabularies of EFFICIENT_LOSS_MIN_VOCAB tokens or more) computes the loss through
hift_rt.efficient_lm_loss, without the full logits. `--state-dtype` and `--master` choose how the
optimizer stores its moments and the master weights (hift_rt.wrap's state_dtype and
master_weights).

Every option and output path is checked before the first step; bad input ends the job with one
line (JobError). Ctrl-C stops at the next step boundary and, with --save, writes a checkpoint
there (a second Ctrl-C quits at once without saving); `--resume` continues it to the same
numbers as a run that was never interrupted. Checkpoints are written atomically by
hift_rt.checkpoint and hold the model (save_pretrained), the tokenizer when it is a Hugging Face
one, and STATE_FILE: optimizer, GradScaler, schedule, sampler position, per-step history and the
run's options.

Under `torchrun --nproc_per_node R` (WORLD_SIZE > 1) the job joins torch.distributed (NCCL with
each rank on cuda:LOCAL_RANK, gloo on the CPU) and hift_rt.wrap runs data parallel over it
(`--compare full`: torch AdamW under DistributedDataParallel). Every rank draws the same
batch_size x R windows per micro-batch from one seeded generator and trains on its batch_size of
them, so R ranks with --batch-size B follow one process with --batch-size R*B up to rounding (the
ranks' mean gradient and mean loss are sums in another order); the logged loss is the mean over
ranks. Rank 0 alone prints, shows the progress bar and writes the checkpoint, plot and JSON; every
rank takes part in the optimizer's state_dict() (a collective) before rank 0 saves. A JobError on
any rank ends every rank with exit code 2 and one line from rank 0 (Ranks.agree). torchrun
forwards Ctrl-C (SIGINT) to every rank once: the ranks agree at each step boundary whether one was
asked to stop, so all stop after the same step and save it. A checkpoint resumes on any number of
ranks, each reading it; --batch-size stays per rank.

Owns: options and their checks, data and tokenizer, the training loop, Ctrl-C, joining torchrun's
process group and the job's agreements over it, what a checkpoint holds, the summary, plot and
JSON. May call: hift_rt.methods (the ways of training), hift_rt.checkpoint, hift_rt.loss (whether
a model takes the efficient loss), torch.distributed, transformers, tqdm and matplotlib when
installed.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import secrets
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from . import checkpoint, loss, methods

STATE_FILE = "hift_rt_state.pt"
DEFAULT_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Options that the optimizer state fixes (its layout, or values load_state_dict restores): a
# resumed run takes them from the checkpoint and refuses a different value. (name, default; the
# dtype's default depends on the device)
RUN_OPTIONS = (("optim", "adamw"), ("strategy", "bottom_up"), ("units_per_group", 1), ("dtype", None),
               ("lr", 1e-3), ("weight_decay", 0.0))
# Options of how the state is stored: a resumed run takes them from the checkpoint unless given,
# and may change them (load_state_dict converts moments of another format and derives the master
# weights from what the checkpoint holds).
FORMAT_OPTIONS = (("state_dtype", "fp32"), ("master", "auto"))
MASTER_WEIGHTS = {"auto": "auto", "fp32": "fp32", "kahan": "kahan", "none": False}  # --master -> wrap's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MAX_SEED = 2 ** 63 - 1
LOSS_WINDOW = 10  # steps averaged for the "final loss" and the equal-time loss
# --efficient-loss auto: on from this vocabulary size (Llama-2's 32000 and up). The model's own loss
# keeps the logits, their fp32 copy and fp32 log-softmax (10 bytes per token and vocabulary entry
# in bf16) and allocates as much again in its backward: at 32000 and the default 8 x 128 tokens,
# 0.6 GiB, far more than a layer's activations; for small vocabularies (the default model's 256
# bytes) it is small, and the model's own loss is kept.
EFFICIENT_LOSS_MIN_VOCAB = 32000


class JobError(Exception):
    """A problem with the user's input or with the run, reported as one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---- data ----------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255: no files, no download."""
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))


def load_text(path: Optional[str]) -> str:
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    p = Path(path)
    if not p.is_file():
        raise JobError(f"--data: no such file: {path}")
    if p.suffix == ".txt":
        return p.read_text(encoding="utf-8", errors="replace")
    if p.suffix != ".jsonl":
        raise JobError(f"--data must be a .txt file or a .jsonl file with a \"text\" field, got {path}")
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise JobError(f"--data {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError(f"--data {path}: line {number} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise JobError(f"--data {path}: line {number} is nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise JobError(f"--data {path}: line {number} has no string field \"text\"")
        texts.append(record["text"])
    if not texts:
        raise JobError(f"--data {path}: no records")
    return "\n\n".join(texts)


class WindowSampler:
    """Random windows of seq_len tokens from a token stream, from a seeded generator whose state
    travels with checkpoints (a resumed run sees the same batches). Each call draws
    batch_size x world windows, the same on every rank, and returns rank's batch_size of them
    (batch_size, seq_len): `world` ranks see what one process with batch_size x world sees."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if tokens.numel() < seq_len + 2:
            raise JobError(f"the training text has {tokens.numel()} tokens, fewer than --seq-len {seq_len} + 2")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size * self.world,),
                               generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.stack([self.tokens[s:s + self.seq_len] for s in mine.tolist()])


# ---- torchrun ------------------------------------------------------------------------------

def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise JobError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number (torchrun sets it)") from None


def launched_rank() -> int:
    """This process's rank as torchrun's environment gives it (RANK), 0 outside torchrun: the rank
    that prints."""
    try:
        return int(os.environ.get("RANK", "0")) if _torchrun_world() > 1 else 0
    except (ValueError, JobError):
        return 0


class Ranks:
    """The processes of this job: rank, world (1 alone) and local_rank from torchrun's
    environment; `join(device)` initializes torch.distributed from it (NCCL for a CUDA device,
    gloo for the CPU; a process group that is already initialized is used as it is). The job's own
    agreements travel over a gloo group (host flags: no device synchronization). Alone, every
    agreement is the identity and nothing is initialized."""

    def __init__(self):
        self.world = _torchrun_world()
        self.rank = self.local_rank = 0
        self.host_group = None
        self.owns_group = False
        if self.world > 1:
            try:
                self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
            except (KeyError, ValueError):
                raise JobError(f"WORLD_SIZE is {self.world} but RANK and LOCAL_RANK are not both set to numbers: "
                               "start the job with torchrun") from None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def join(self, device: torch.device) -> None:
        if self.world == 1:
            return
        if not dist.is_available():
            raise JobError(f"WORLD_SIZE is {self.world} but this torch has no torch.distributed")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            try:
                dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
            except (RuntimeError, ValueError) as exc:
                raise JobError(f"cannot join the torchrun job's process group ({_first_line(exc)})") from None
            self.owns_group = True
        if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
            raise JobError(f"torch.distributed has rank {dist.get_rank()} of {dist.get_world_size()}; "
                           f"the environment says RANK {self.rank} of WORLD_SIZE {self.world}")
        gloo = dist.get_backend() == "gloo"
        self.host_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")

    def leave(self) -> None:
        if self.owns_group:
            gc.collect()  # what still holds the group (a DDP reducer in a cycle) goes first
            dist.destroy_process_group()
            self.owns_group = False

    @contextlib.contextmanager
    def agree(self):
        """Run the block on every rank; where it raised JobError on some rank, raise one on every
        rank: rank 0's, else the first failing rank's (named). Every rank must enter the block."""
        error = None
        try:
            yield
        except JobError as exc:
            if self.world == 1:
                raise
            error = str(exc)
        if self.world == 1:
            return
        errors = [None] * self.world
        dist.all_gather_object(errors, error, group=self.host_group)
        failed = [(rank, text) for rank, text in enumerate(errors) if text is not None]
        if failed:
            rank, text = failed[0]
            raise JobError(text if rank == 0 else f"rank {rank}: {text}")

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (a collective)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def mean(self, value: float) -> float:
        """The mean over ranks of `value` (a collective)."""
        if self.world == 1:
            return value
        return float(self.sum(torch.tensor([value], dtype=torch.float64))) / self.world

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a float64 CPU tensor (a collective)."""
        if self.world > 1:
            dist.all_reduce(values, group=self.host_group)
        return values


# ---- device, model, tokenizer --------------------------------------------------------------

def pick_device(name: str, ranks: Ranks) -> torch.device:
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


def build_model(path: Optional[str], option: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(model, description): the embedded default (path None) or a local HF directory, which
    `option` (--model or --resume) named."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and saving bars would break ours and the error line

    if path is None:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL))
        return model.to(device, dtype), "a small Llama-shaped model from RANDOM weights"
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise JobError(f"{option}: no such directory: {path}")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise JobError(f"{option} {path}: no weights (*.safetensors or *.bin) in this directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 -- a corrupt or truncated file raises anything
        raise JobError(f"{option} {path}: cannot load the model ({_first_line(exc)})") from None
    return model.to(device, dtype), f"{path} ({type(model).__name__})"


def load_tokenizer(path: Optional[str], option: str, vocab_size: int):
    """The directory's Hugging Face tokenizer, or bytes where it has no tokenizer files."""
    if path is None or not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        if vocab_size < ByteTokenizer.vocab_size:
            raise JobError(f"{option} {path}: no tokenizer files and a vocabulary too small for bytes")
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 -- as above
        raise JobError(f"{option} {path}: cannot load the tokenizer ({_first_line(exc)})") from None
    tokenizer.model_max_length = int(1e12)  # we cut windows ourselves
    return tokenizer


def lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int, device, ranks: Ranks,
                 max_batches: int = 8) -> float:
    """Mean over batches of the loss on the first max_batches batches of batch_size x R
    consecutive held-out windows (the same windows for every method and for one process with
    the global batch). Rank r computes its batch_size windows of each batch; a batch's loss is
    sum over ranks of (loss x windows) / windows, every window having seq_len tokens."""
    was_training = model.training
    model.eval()
    width = batch_size * ranks.world
    windows = [tokens[i:i + seq_len] for i in range(0, tokens.numel() - seq_len, seq_len)][:max_batches * width]
    batches = [windows[i:i + width] for i in range(0, len(windows), width)]
    sums = torch.zeros(2, len(batches), dtype=torch.float64)  # (loss x windows, windows) per batch
    for b, batch in enumerate(batches):
        mine = batch[ranks.rank * batch_size:(ranks.rank + 1) * batch_size]
        if mine:
            ids = torch.stack(mine).to(device)
            sums[0, b] = model(input_ids=ids, labels=ids).loss.float().item() * len(mine)
            sums[1, b] = len(mine)
    model.train(was_training)
    sums = ranks.sum(sums)
    return statistics.fmean((sums[0] / sums[1]).tolist()) if batches else float("nan")


def _memory_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def use_efficient_loss(option: str, model, log) -> bool:
    """--efficient-loss: "off"; "on" (a model it cannot serve is a JobError); "auto": on when the
    vocabulary has EFFICIENT_LOSS_MIN_VOCAB tokens or more and the model takes it (else a note)."""
    if option == "off" or (option == "auto" and model.config.vocab_size < EFFICIENT_LOSS_MIN_VOCAB):
        return False
    try:
        loss.check_supported(model)
    except ValueError as exc:
        if option == "on":
            raise JobError(f"--efficient-loss on: {exc}") from None
        log(f"note: the model's own loss is used ({exc})")
        return False
    return True


# ---- checkpoints ---------------------------------------------------------------------------

def read_checkpoint(path: str) -> dict:
    """The verified state of the checkpoint in `path` (manifest checksums, the state's step
    matching the manifest's); JobError naming --resume otherwise."""
    directory = Path(path)
    try:
        checkpoint.recover(directory)
    except OSError as exc:
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
        raise JobError(f"--resume {path}: cannot read {STATE_FILE} ({_first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("step") != listed["step"]:
        raise JobError(f"--resume {path}: {STATE_FILE} is not the state of the manifest's step {listed['step']} "
                       "(model and state do not belong together)")
    return state


def _settle_run_options(args, saved: dict, log) -> None:
    """Fill the run's options from the checkpoint (resume) or the defaults: refuse a value of
    RUN_OPTIONS that differs from the checkpoint's; a FORMAT_OPTIONS one converts the state."""
    for name, default in RUN_OPTIONS + FORMAT_OPTIONS:
        given, flag = getattr(args, name), "--" + name.replace("_", "-")
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


# ---- Ctrl-C --------------------------------------------------------------------------------

STOP_MESSAGE = "stopping after this step (Ctrl-C again quits at once, without saving)"
# torchrun forwards the first Ctrl-C to every rank as SIGINT; at a second one it ends the ranks
# with SIGTERM (measured with torch 2.13); it waits --shutdown-timeout for them before SIGKILL.
TORCHRUN_STOP_MESSAGE = ("stopping every rank after this step (Ctrl-C again quits at once, without saving; "
                         "torchrun kills the ranks after its --shutdown-timeout, 30 s by default)")


class StopOnCtrlC:
    """Within `with`: the first SIGINT asks the job to stop at the next step boundary
    (`requested`) and writes `message` (None: nothing, the torchrun ranks other than 0); the
    second raises KeyboardInterrupt at once, as Python's default handler. Signal handlers can
    only be set in the main thread; elsewhere nothing changes."""

    def __init__(self, message: Optional[str] = STOP_MESSAGE):
        self.requested = False
        self.installed = False
        self.message = message

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.message is None:
            return
        try:  # os.write: print() could re-enter a buffered write the signal interrupted
            os.write(2, f"\nhift-rt: {self.message}\n".encode())
        except OSError:
            pass

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


# ---- one run -------------------------------------------------------------------------------

def run(args, method_name: str, resume: Optional[dict], stop: StopOnCtrlC, ranks: Ranks, log=print) -> Optional[dict]:
    """Train with `method_name` ("hift" or "full") as `args` say, from `resume` (a state from
    read_checkpoint) when given; returns the run's figures, or None when Ctrl-C stopped it. Every
    rank runs it; `log` prints (rank 0's)."""
    device, dtype = args.device, DTYPES[args.dtype]
    source, option = (args.resume, "--resume") if resume is not None else (args.model, "--model")
    with ranks.agree():  # files every rank reads: one may fail where the others do not
        model, described = build_model(source, option, device, dtype, args.seed)
        if resume is not None and resume.get("tokenizer") == "bytes":
            tokenizer = ByteTokenizer()
        else:
            tokenizer = load_tokenizer(source, option, model.config.vocab_size)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and args.seq_len > max_positions:
            raise JobError(f"--seq-len {args.seq_len} is beyond the model's {max_positions} positions")
        model.config.use_cache = False
        model.train()
        tokens = torch.tensor(tokenizer.encode(load_text(args.data)), dtype=torch.long)
        split = int(tokens.numel() * 0.95)
        train_tokens, heldout_tokens = tokens[:split], tokens[split:]
        sampler = WindowSampler(train_tokens, args.seq_len, args.batch_size, args.seed, ranks.rank, ranks.world)
        efficient_loss = use_efficient_loss(args.efficient_loss, model, log)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = methods.Settings(lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                                optim=args.optim, strategy=args.strategy, units_per_group=args.units_per_group,
                                offload=args.offload, seed=args.seed, efficient_loss=efficient_loss,
                                state_dtype=args.state_dtype, master_weights=MASTER_WEIGHTS[args.master])
    try:
        method = (methods.HiFT if method_name == "hift" else methods.Full)(model, settings)
    except ValueError as exc:  # wrap's refusals name the problem
        raise JobError(f"{method_name}: {exc}") from None
    schedule = lr_factor(args.lr_schedule, args.warmup_steps, args.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(method.optimizer, schedule)
    history = {"losses": [], "memory_GiB": [], "step_seconds": []}
    done = first = 0
    if resume is not None:
        with ranks.agree():
            try:
                method.load_state_dict(resume["method"])
                scheduler.load_state_dict(resume["scheduler"])
                # The schedule is this run's (--steps may differ from the saved run's, whose last
                # lr may be its schedule's end): the lr of the step to come, from this schedule.
                for group, base in zip(method.optimizer.param_groups, scheduler.base_lrs):
                    group["lr"] = base * schedule(scheduler.last_epoch)
                sampler.generator.set_state(resume["sampler"])
                history = {key: list(resume["history"][key]) for key in history}
                first = done = int(resume["step"])
                heldout_start = float(resume["heldout_start"])
            except Exception as exc:  # noqa: BLE001 -- whatever a wrong state raises, one line
                raise JobError(f"--resume {args.resume}: cannot load the training state ({_first_line(exc)})") from None
        log(f"resumed from {args.resume} at step {done}")

    per_rank = f" per rank; {ranks.world} ranks" if ranks.world > 1 else ""
    log(f"{method_name}: {described}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
        f"({dtype}) on {device}{per_rank}; {method.groups} group(s); {train_tokens.numel()} training tokens"
        + ("; efficient loss (no full logits)" if efficient_loss else ""))
    if resume is None:
        heldout_start = heldout_loss(model, heldout_tokens, args.seq_len, args.batch_size, device, ranks)

    def save(step: int) -> None:
        state = {"method": method.state_dict(), "scheduler": scheduler.state_dict(), "step": step,  # a collective
                 "sampler": sampler.generator.get_state(), "history": history, "heldout_start": heldout_start,
                 "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else "hf",
                 "job": {name: getattr(args, name) for name, _ in RUN_OPTIONS + FORMAT_OPTIONS}}

        def write(directory: Path) -> None:
            model.save_pretrained(directory)
            if not isinstance(tokenizer, ByteTokenizer):
                tokenizer.save_pretrained(directory)
            torch.save(state, directory / STATE_FILE)

        with ranks.agree():
            if not ranks.main:
                return
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise JobError(f"the weights are not finite after step {step}: not saving over {args.save}")
            try:
                checkpoint.save(Path(args.save), write, step)
            except OSError as exc:
                raise JobError(f"--save {args.save}: {exc}") from None

    saves = args.save and method_name == "hift"
    bar = _progress(args.steps, done, method_name, shown=ranks.main)
    tokens_per_step = args.batch_size * ranks.world * args.seq_len * args.grad_accum
    while done < args.steps and not ranks.any(stop.requested):  # every rank stops after the same step
        start = time.perf_counter()
        active = getattr(method.optimizer, "active_group", 0)
        lr = method.optimizer.param_groups[0]["lr"]
        method.before_forward(done)
        total = 0.0
        for _ in range(args.grad_accum):
            batch = sampler.next().to(device)
            loss = method.model(input_ids=batch, labels=batch).loss / args.grad_accum
            method.backward(loss)
            total += loss.detach()
        method.update()
        scheduler.step()
        done += 1
        history["losses"].append(ranks.mean(float(total)))  # one sync per step, for the log
        history["memory_GiB"].append(_memory_gib(device))
        history["step_seconds"].append(time.perf_counter() - start)
        if not math.isfinite(history["losses"][-1]):
            bar.close()
            kept = f", nothing saved over {args.save}" if saves else ""
            raise JobError(f"{method_name}: the training loss became {history['losses'][-1]} at step {done} "
                           f"(--lr {args.lr} too high?): stopped{kept}")
        bar.update(1, loss=history["losses"][-1], lr=lr, group=active,
                   tok_s=tokens_per_step / history["step_seconds"][-1], mem=history["memory_GiB"][-1])
        if saves and args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done)
    bar.close()
    if saves:
        save(done)
    if ranks.any(stop.requested):
        kept = f"checkpoint saved in {args.save}; continue with --resume {args.save}" if saves else "nothing kept"
        log(f"interrupted at step {done}: {kept}")
        method.close()
        return None
    session = history["step_seconds"][first:]
    result = {
        "method": method_name, "steps": done, "groups": method.groups, "ranks": ranks.world,
        "efficient_loss": efficient_loss,
        "step_s": statistics.median(session) if session else float("nan"),
        "tokens_per_s": tokens_per_step / statistics.median(session) if session else float("nan"),
        "peak_GiB": _memory_gib(device),
        "first_loss": history["losses"][0] if history["losses"] else float("nan"),
        "final_loss": statistics.fmean(history["losses"][-LOSS_WINDOW:]) if history["losses"] else float("nan"),
        "heldout_start": heldout_start,
        "heldout_end": heldout_loss(model, heldout_tokens, args.seq_len, args.batch_size, device, ranks),
        **history,
    }
    method.close()
    return result


class _progress:
    """tqdm when installed, else a line every tenth of the run; nothing unless `shown` (rank 0)."""

    def __init__(self, total: int, initial: int, desc: str, shown: bool = True):
        self.bar = None
        if shown:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
            except ImportError:
                pass
        self.total, self.done, self.shown = total, initial, shown

    def update(self, n: int, **values) -> None:
        self.done += n
        postfix = {"loss": f"{values['loss']:.3f}", "lr": f"{values['lr']:.2e}", "group": values["group"],
                   "tok/s": f"{values['tok_s']:.0f}"}
        if not math.isnan(values["mem"]):
            postfix["GPU GiB"] = f"{values['mem']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.shown and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            print(f"step {self.done}/{self.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- report --------------------------------------------------------------------------------

def add_equal_time(results: List[dict]) -> None:
    """Give each result `equal_time` = {"seconds", "steps", "loss"}: its training loss (mean over
    its last LOSS_WINDOW steps) when it had trained as many seconds as the shortest whole run
    (the sum of that run's step times). The loss per step flatters the method that makes more
    progress per step however long its steps take; this compares equal wall time."""
    seconds = min(sum(r["step_seconds"]) for r in results)
    for r in results:
        elapsed, n = 0.0, 0
        for s in r["step_seconds"]:
            if elapsed + s > seconds * (1 + 1e-9):  # the shortest run itself reaches its last step
                break
            elapsed, n = elapsed + s, n + 1
        loss = statistics.fmean(r["losses"][max(0, n - LOSS_WINDOW):n]) if n else float("nan")
        r["equal_time"] = {"seconds": seconds, "steps": n, "loss": loss}


def summary_table(results: List[dict]) -> str:
    rows = [("", *[r["method"] for r in results]),
            ("groups", *[str(r["groups"]) for r in results]),
            ("peak GPU memory (GiB)", *[("-" if math.isnan(r["peak_GiB"]) else f"{r['peak_GiB']:.2f}") for r in results]),
            ("step time (s, median)", *[f"{r['step_s']:.4f}" for r in results]),
            ("tokens/s", *[f"{r['tokens_per_s']:.0f}" for r in results]),
            ("first loss", *[f"{r['first_loss']:.3f}" for r in results]),
            (f"final loss (last {LOSS_WINDOW})", *[f"{r['final_loss']:.3f}" for r in results]),
            ("held-out loss start -> end", *[f"{r['heldout_start']:.3f} -> {r['heldout_end']:.3f}" for r in results])]
    if "equal_time" in results[0]:
        rows.append((f"loss at equal time ({results[0]['equal_time']['seconds']:.1f} s)",
                     *[f"{r['equal_time']['loss']:.3f} @ step {r['equal_time']['steps']}" for r in results]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(row[i]) for row in rows) for i in range(1, len(rows[0]))]
    return "\n".join(f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols)) for row in rows)


def plot(results: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_memory = any(not math.isnan(m) for r in results for m in r["memory_GiB"])
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4), squeeze=False)
    for r in results:
        axes[0][0].plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"], linewidth=1)
        if has_memory:
            axes[0][1].plot(range(1, len(r["memory_GiB"]) + 1), r["memory_GiB"], label=r["method"])
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend()
    if has_memory:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("peak GPU memory so far (GiB)")
        axes[0][1].legend()
    fig.tight_layout()
    _write_replacing(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def _write_replacing(path: str, write) -> None:
    """`write(tmp)` into a file beside `path`, then replace `path` with it."""
    target = Path(path)
    tmp = target.parent / f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- options -------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--model", help="a local Hugging Face model directory (default: a small random Llama)")
    parser.add_argument("--data", help="a .txt file, or .jsonl with a \"text\" field (default: Python's pydoc topics)")
    parser.add_argument("--optim", choices=("adamw", "adam", "adagrad", "sgd"),
                        help="default: adamw, or the checkpoint's with --resume")
    parser.add_argument("--strategy", choices=("bottom_up", "top_down", "random"),
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
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"),
                        help="weights' dtype; bf16/fp16 get master weights as --master says (default auto: bf16 "
                             "on CUDA, fp32 on CPU; the checkpoint's with --resume)")
    parser.add_argument("--state-dtype", choices=("fp32", "bf16", "int8"),
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
    parser.add_argument("--compare", choices=("full",),
                        help="also run standard full fine-tuning (torch AdamW; under torchrun in "
                             "DistributedDataParallel)")
    parser.add_argument("--save", help="directory for the model (save_pretrained) and optimizer/rotation state")
    parser.add_argument("--save-every", type=int, default=0,
                        help="also save every N steps (default 0: at the end and on Ctrl-C only)")
    parser.add_argument("--resume", help="continue from a directory written by --save")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="PNG with loss curves and GPU memory per step (matplotlib)")
    parser.add_argument("--json", help="write the figures to this file")


def _check_writable(option: str, directory: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".hift-rt-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise JobError(f"{option}: cannot write into {directory} ({exc.strerror or exc})") from None


def check_output_paths(args) -> None:
    """Every output can be written: checked before the first step, so no trained model is lost."""
    if args.save:
        target = Path(args.save)
        if target.exists() and not target.is_dir():
            raise JobError(f"--save: {args.save} exists and is not a directory")
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
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if not path:
            continue
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


def check_arguments(args, ranks: Ranks) -> None:
    """Values that cannot work, refused before anything is built (the same on every rank);
    `args.device` becomes a torch.device."""
    for name in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.units_per_group is not None and args.units_per_group < 1:
        raise JobError(f"--units-per-group must be >= 1, got {args.units_per_group}")
    for name in ("lr", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise JobError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
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
        raise JobError("--compare full trains from the start; it cannot continue a --resume")


def main(args) -> int:
    ranks = Ranks()
    check_arguments(args, ranks)
    ranks.join(args.device)
    try:
        return train_and_report(args, ranks)
    finally:
        ranks.leave()


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def train_and_report(args, ranks: Ranks) -> int:
    """Every rank runs this; rank 0 prints and writes the outputs."""
    log = print if ranks.main else _silent
    resume = None
    # Rank 0 reads the checkpoint first: its read may finish a switch that a crash interrupted
    # (checkpoint.recover), which the others must not race.
    with ranks.agree():
        if ranks.main:
            check_output_paths(args)
            resume = read_checkpoint(args.resume) if args.resume else None
    with ranks.agree():
        if args.resume and not ranks.main:
            resume = read_checkpoint(args.resume)
    _settle_run_options(args, resume.get("job", {}) if resume else {}, log)
    if args.compare == "full" and args.dtype == "fp16":
        raise JobError("--compare full needs --dtype fp32 or bf16 (torch's AdamW cannot unscale fp16 gradients)")
    if resume is not None and resume["step"] > args.steps:
        raise JobError(f"--resume {args.resume} is at step {resume['step']}, beyond --steps {args.steps}: "
                       f"give --steps {resume['step']} or more")
    message = (TORCHRUN_STOP_MESSAGE if ranks.world > 1 else STOP_MESSAGE) if ranks.main else None
    with StopOnCtrlC(message) as stop:
        results = [run(args, "hift", resume, stop, ranks, log)]
        if args.compare == "full" and not ranks.any(stop.requested):
            results.append(run(args, "full", None, stop, ranks, log))
        interrupted = ranks.any(stop.requested)
    if interrupted:
        return 130
    with ranks.agree():
        if ranks.main:
            report(args, results)
    return 0


def report(args, results: List[dict]) -> None:
    """The summary table, and the plot and JSON when asked for."""
    if args.model is None and not args.resume:
        print("note: the model started from random weights (no --model given); the loss shows it learning the text")
    if len(results) > 1:
        add_equal_time(results)
    print(summary_table(results))
    if len(results) > 1:
        print("loss at equal time: the training loss each method had reached after as many seconds as the "
              "shortest whole run took; compare methods by this, not by the loss per step")
    try:
        if args.plot:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        if args.json:
            _write_replacing(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    except OSError as exc:
        raise JobError(f"cannot write the results: {exc}") from None
