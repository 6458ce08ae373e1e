"""The training loop of a job: main (every rank), one run of a method with Ctrl-C, periodic
saves and the figures it returns, the held-out loss, the lr schedule and the efficient-loss
choice. What is not the loop lives beside it: options.py (the options and their checks),
data.py (model, tokenizer, text, sampler), state.py (what a checkpoint holds, writing and reading
it), ranks.py (torchrun), report.py (table, plot, JSON).

Owns: main, train_and_report, run, StopOnCtrlC. May call: hift_rt.methods (the ways of
training), hift_rt.loss (whether a model takes the efficient loss), the job's other modules,
torch, tqdm when installed.
"""
from __future__ import annotations

import math
import os
import signal
import statistics
import threading
import time
from typing import Optional

import torch

from .. import loss, methods
from .data import ByteTokenizer, WindowSampler, build_model, load_text, load_tokenizer
from .errors import JobError, first_line
from .options import (
    DTYPES, EFFICIENT_LOSS_MIN_VOCAB, FORMAT_OPTIONS, MASTER_WEIGHTS, RUN_OPTIONS, check_arguments,
    check_output_paths, settle_run_options,
)
from .ranks import Ranks
from .report import LOSS_WINDOW, report
from .state import read_checkpoint, write_checkpoint


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
    """Train with `method_name` ("hift", or the --compare method: a name in methods.METHODS) as
    `args` say, from `resume` (a state from read_checkpoint) when given; returns the run's figures,
    or None when Ctrl-C stopped it. Every rank runs it; `log` prints (rank 0's)."""
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
        method = methods.METHODS[method_name](model, settings)
    except ValueError as exc:  # wrap's and the methods' refusals name the problem
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
                raise JobError(f"--resume {args.resume}: cannot load the training state ({first_line(exc)})") from None
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

        with ranks.agree():
            if not ranks.main:
                return
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise JobError(f"the weights are not finite after step {step}: not saving over {args.save}")
            write_checkpoint(args.save, model, tokenizer, state)

    saves = args.save and method_name == "hift"
    bar = _progress(args.steps, done, method_name, shown=ranks.main)
    tokens_per_step = args.batch_size * ranks.world * args.seq_len * args.grad_accum
    try:  # the bar ends its line before any error line
        while done < args.steps and not ranks.any(stop.requested):  # every rank stops after the same step
            start, counted = time.perf_counter(), method.accounting["wall"]
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
            history["step_seconds"].append(time.perf_counter() - start - (method.accounting["wall"] - counted))
            if not math.isfinite(history["losses"][-1]):
                kept = f", nothing saved over {args.save}" if saves else ""
                raise JobError(f"{method_name}: the training loss became {history['losses'][-1]} at step {done} "
                               f"(--lr {args.lr} too high?): stopped{kept}")
            bar.update(1, loss=history["losses"][-1], lr=lr, group=active,
                       tok_s=tokens_per_step / history["step_seconds"][-1], mem=history["memory_GiB"][-1])
            if saves and args.save_every and done % args.save_every == 0 and done < args.steps:
                save(done)
    finally:
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
    settle_run_options(args, resume.get("job", {}) if resume else {}, log)
    if args.compare and args.dtype == "fp16":
        raise JobError(f"--compare {args.compare} needs --dtype fp32 or bf16 (fp16 weights need the GradScaler only hift "
                       "takes)")
    if args.compare and args.grad_accum > 1 and not methods.METHODS[args.compare].accumulates:
        raise JobError(f"--compare {args.compare} updates inside the backward pass: it cannot take --grad-accum "
                       f"{args.grad_accum}")
    if args.compare and methods.METHODS[args.compare].unavailable():
        log(f"note: --compare {args.compare} is unavailable, hift runs alone "
            f"({methods.METHODS[args.compare].unavailable()})")
        args.compare = None
    if resume is not None and resume["step"] > args.steps:
        raise JobError(f"--resume {args.resume} is at step {resume['step']}, beyond --steps {args.steps}: "
                       f"give --steps {resume['step']} or more")
    message = (TORCHRUN_STOP_MESSAGE if ranks.world > 1 else STOP_MESSAGE) if ranks.main else None
    with StopOnCtrlC(message) as stop:
        results = [run(args, "hift", resume, stop, ranks, log)]
        if args.compare and not ranks.any(stop.requested):
            results.append(run(args, args.compare, None, stop, ranks, log))
        interrupted = ranks.any(stop.requested)
    if interrupted:
        return 130
    with ranks.agree():
        if ranks.main:
            report(args, results)
    return 0
