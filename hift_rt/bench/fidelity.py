"""`python -m hift_rt.bench fidelity`: fine-tuning quality of hift against full fine-tuning and
against the peers a user would pick instead to save memory.

Does hift fine-tune as well as full fine-tuning, and as well as BAdam, LISA, GaLore, APOLLO,
Adam-mini, AdaLomo or 8-bit AdamW at equal memory, equal steps and equal time? Held-out loss
after fine-tuning, at equal steps, equal parameter updates and equal time, forgetting, steps to a
target loss, time per step and the memory each method holds (hift_rt.methods' rule, counted from
the tensors, and worked out for Llama-2-7B's shape by memory_rule.py).

Stage 1 pretrains a small Llama (byte vocabulary, random init) with full AdamW on corpus A (pydoc
topics); the checkpoint is cached on disk under a key of everything it depends on (model config,
steps, batch, lr, seed, precision, corpus A's hash, torch and transformers versions). Stage 2
fine-tunes it on corpus B (standard-library source) with each method, each lr and each seed, and
evaluates held-out loss on B and on A (forgetting) every `steps / evals` steps. See corpora.py.

Methods are spec strings `NAME[:key=value,...]`, NAME one of hift_rt.methods.METHODS (full,
hift, lora, badam, lisa, galore, apollo, adam-mini, adalomo, adamw8bit, layerwise-sync); `--methods
peers` is PEERS, every one of them at its published settings. `lr=1e-3/3e-3` gives the method its
own lr grid (else --lrs; the method's name in the report leaves it out, so reports with other
grids merge); `dtype=bf16` casts the model's weights; the other keys are the method's options
(hift_rt.methods: e.g. `badam:switch_every=1`, `lisa:layers=1`, `galore:rank=16`), and for hift
wrap's arguments as they are (`hift:strategy=random,upg=2,lr_policy=step`; `upg` means
units_per_group; numbers, true/false and none are converted), so new wrap options are methods
without code changes here. A method whose package is not installed is reported unavailable and
left out; the others run.

Every run shares the schedule: a linear warmup from 0 over ceil(warmup_ratio x steps) steps (as
Trainer does), then cosine (or linear) decay to 0 at the run's last step; gradients clipped to
norm 1 (AdaLomo: its update's RMS instead, as its authors recommend), no weight decay, the same
batches for every method at a given seed. Every method but full runs --steps steps. Full
fine-tuning runs --steps, --target-steps, and round(steps / k) for every group count k > 1 of the
other methods (hift's groups, BAdam's blocks), each a run with its own schedule, so that each
budget compares annealed losses:
  equal steps    a method after T steps against full after T steps;
  equal updates  a method that updates one of k groups per step (hift, BAdam, layerwise-sync)
                 after T steps against full after T / k steps;
  equal time     a method after T steps against full's final loss interpolated (linearly in
                 time) between the full runs whose times bracket the method's;
  to target      the steps (and seconds) after which a run's held-out B loss first reaches full's
                 final loss after --target-steps steps (linear between evaluations).
Time is steps x the run's step time (median over cycles of the mean step time in a cycle, first
cycle excluded), evaluation excluded: robust to other work on a shared machine. The clock is wall
time, except on a CPU with one thread (OMP_NUM_THREADS=1), where it is the process's CPU time:
there it equals the wall time of an unloaded machine, and other processes do not inflate it.
Full fine-tuning is always compared at its best lr for that budget (lowest mean over seeds);
every method's lr is picked the same way: the lowest mean held-out B after T steps over its grid.

The runs go one after another (--jobs N runs N processes on a CPU machine; set
OMP_NUM_THREADS=1). --merge combines the runs of earlier --json files of the same setting.

Owns: the presets, the runs, the command line. May call: hift_rt.methods (every method),
memory_rule, corpora, fidelity_report, transformers (the model), matplotlib.
"""
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .. import methods as registry
from . import corpora, fidelity_report, memory_rule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"upg": "units_per_group"}
# Set identically for every method by the benchmark, so a method spec may not change them.
SHARED = {"max_grad_norm": 1.0, "weight_decay": 0.0}
RESERVED = tuple(SHARED) + ("seed", "optim")
# `--methods peers`: full fine-tuning, hift with its state offloaded (as on a GPU: the memory the
# table shows is the runtime's device and host parts) and every peer at its published settings,
# BAdam also switching every step. The methods whose lr means something else than AdamW's have
# a grid of their own, set for the tiny preset from 60-step trials (give lr= for another
# preset): AdaLomo's lr is relative to each weight's RMS (0.01 and 0.03 beat 0.1 and AdamW's
# 0.003), LoRA's adapters start from zero (0.01 beat 0.003), GaLore's and APOLLO's READMEs train
# with 0.01 (0.003 and 0.01 within 1%); the others take --lrs.
PEERS = ("full", "hift:offload=true", "lora:lr=1e-2/3e-2", "badam", "badam:switch_every=1", "lisa",
         "galore:lr=3e-3/1e-2", "apollo:lr=3e-3/1e-2", "adam-mini", "adalomo:lr=1e-2/3e-2", "adamw8bit")
PRETRAIN_SEED = 0
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DEFAULT_CACHE = Path("~/.cache/hift_rt/fidelity")


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    seq_len: int
    batch: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int             # T: the fine-tuning length of the hift runs
    evals: int             # evaluations along a run (plus one before it)
    eval_windows: int      # held-out windows of seq_len per corpus
    corpus_b_bytes: int
    lrs: Tuple[float, ...]
    methods: Tuple[str, ...]


DEFAULT_METHODS = ("full", "hift:lr_policy=cycle", "hift:lr_policy=step")
PRESETS = {
    # the CI smoke test's size: seconds on CPU (0.04 M parameters, 4 units)
    "micro": Preset(32, 64, 2, 2, 32, 4, 60, 3e-3, 16, 4, 8, 64 << 10, (3e-3,), ("full", "hift")),
    # CPU, a few minutes with the default methods and 2 seeds (0.86 M parameters, 6 units)
    "tiny": Preset(128, 344, 4, 4, 128, 8, 1200, 2e-3, 240, 12, 32, 512 << 10, (1e-3,), DEFAULT_METHODS),
    # one H100/H200, a few minutes (113 M parameters, 18 units); 300 x 4096 tokens of pretraining
    # is ~3 passes over A's 420 K training tokens: more would mostly overfit A
    "gpu": Preset(768, 2048, 16, 12, 256, 16, 300, 6e-4, 540, 12, 64, 4 << 20, (3e-4,), DEFAULT_METHODS),
}


class FidelityError(Exception):
    """Bad input to the benchmark; main() prints it on one line and exits with code 2."""


# ---- methods --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    label: str                          # the spec as the user wrote it, without its lr grid
    kind: str                           # its name in hift_rt.methods.METHODS
    lrs: Optional[Tuple[float, ...]]    # its own lr grid, or None for --lrs
    dtype: str                          # the weights' dtype, a key of DTYPES
    options: Tuple[Tuple[str, object], ...]  # Settings.options (hift: wrap() keyword arguments)


def _value(text: str):
    """A spec value as Python: true/false/none, an int, a float, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _lrs(texts: List[str], where: str) -> Tuple[float, ...]:
    try:
        lrs = tuple(float(x) for x in texts)
    except ValueError:
        raise FidelityError(f"{where}: learning rates must be numbers, got {'/'.join(texts)!r}") from None
    if not lrs or any(not lr > 0 or math.isinf(lr) for lr in lrs):
        raise FidelityError(f"{where}: learning rates must be positive and finite, got {lrs}")
    return lrs


def parse_method(spec: str) -> Method:
    """`NAME[:lr=A/B,dtype=D,key=value,...]` (see the module docstring)."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in registry.METHODS:
        raise FidelityError(f"method {spec!r}: must start with one of {', '.join(registry.METHODS)}")
    fields, named = {}, []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not eq or not key or not value.strip():
            raise FidelityError(f"method {spec!r}: {item!r} is not key=value")
        if key in fields:
            raise FidelityError(f"method {spec!r}: {key} given twice")
        fields[key] = value.strip()
        if key != "lr":
            named.append(item.strip())
    lrs = _lrs(fields.pop("lr").split("/"), f"method {spec!r}") if "lr" in fields else None
    dtype = fields.pop("dtype", "fp32")
    if dtype not in DTYPES:
        raise FidelityError(f"method {spec!r}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for key in RESERVED:
        if key in fields:
            raise FidelityError(f"method {spec!r}: {key} is the same for every method and set by the benchmark")
    options = {k: _value(v) for k, v in fields.items()}
    cls = registry.METHODS[kind]
    if options and not cls.OPTIONS and kind != "hift":
        raise FidelityError(f"method {spec!r}: {kind} takes only lr= and dtype=, got {', '.join(fields)}")
    try:
        cls.check_options(options)
    except ValueError as exc:
        raise FidelityError(f"method {spec!r}: {exc}") from None
    label = ":".join([kind, ",".join(named)]) if named else kind
    return Method(label, kind, lrs, dtype, tuple(options.items()))


@dataclass(frozen=True)
class Run:
    method: Method
    lr: float
    seed: int
    steps: int


# ---- model, data, schedule ------------------------------------------------------------------

@dataclass
class Setup:
    """What every run needs; pickled to worker processes."""
    model_config: dict          # LlamaConfig keyword arguments
    device: str
    autocast: bool              # bf16 autocast (CUDA)
    batch: int
    seq_len: int
    eval_every: int
    warmup_ratio: float
    schedule: str               # "cosine" or "linear"
    clock: str                  # "wall" or "cpu" (see the module docstring)
    train_b: torch.Tensor       # (n,) int64 byte tokens of corpus B's training split
    eval_a: torch.Tensor        # (eval_windows, seq_len) held-out windows of A
    eval_b: torch.Tensor        # (eval_windows, seq_len) held-out windows of B
    checkpoint: str             # stage 1's file


def _model_config(preset: Preset, seq_len: int) -> dict:
    return {"hidden_size": preset.hidden, "intermediate_size": preset.intermediate,
            "num_hidden_layers": preset.layers, "num_attention_heads": preset.heads,
            "num_key_value_heads": preset.heads, "vocab_size": 256, "max_position_embeddings": seq_len}


def _build_model(config: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(PRETRAIN_SEED)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype)
    model.config.use_cache = False
    model.train()
    return model


def _schedule(opt, setup: Setup, steps: int):
    """Linear warmup from 0 (Trainer's), then cosine or linear decay to 0 at `steps`."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if setup.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(opt, math.ceil(setup.warmup_ratio * steps), steps)


class _Batches:
    """Random (batch, seq_len) windows of `tokens` from a generator seeded with `seed`."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch: int, seed: int):
        self.tokens, self.seq_len, self.batch = tokens, seq_len, batch
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch,), generator=self.generator)
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])


def _autocast(setup: Setup):
    return torch.autocast("cuda", dtype=torch.bfloat16) if setup.autocast else contextlib.nullcontext()


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, setup: Setup) -> float:
    """Mean next-token loss over the (count, seq_len) `windows` (each has the same token count)."""
    model.eval()
    total = torch.zeros((), device=setup.device)
    for chunk in windows.split(setup.batch):
        chunk = chunk.to(setup.device)
        with _autocast(setup):
            total += model(input_ids=chunk, labels=chunk).loss.float() * len(chunk)
    model.train()
    return total.item() / len(windows)


def _build_method(method: Method, model, lr: float, seed: int):
    """`method` over `model` (hift_rt.methods), with the settings every run shares."""
    settings = registry.Settings(lr=lr, seed=seed, options=method.options, **SHARED)
    return registry.METHODS[method.kind](model, settings)


def _train(method, schedule, batches: _Batches, steps: int, setup: Setup, evaluate=None):
    """`steps` optimizer steps of `method` (hift_rt.methods' protocol); returns each step's
    seconds and the evaluations (every setup.eval_every steps and at the last;
    `evaluate(step, mean train loss since the previous evaluation, seconds trained so far)` makes
    one)."""
    step_times, losses = [], []
    evals = [evaluate(0, None, 0.0)] if evaluate else []
    for step in range(1, steps + 1):
        batch = batches.next().to(setup.device)
        start, counted = CLOCKS[setup.clock](), method.accounting[setup.clock]
        method.before_forward(step - 1)
        with _autocast(setup):
            loss = method.model(input_ids=batch, labels=batch).loss
        method.backward(loss)
        method.update()
        schedule.step()
        losses.append(loss.item())  # waits for the compute stream only: the step is done
        step_times.append(CLOCKS[setup.clock]() - start - (method.accounting[setup.clock] - counted))
        if evaluate and (step % setup.eval_every == 0 or step == steps):
            evals.append(evaluate(step, statistics.fmean(losses), sum(step_times)))
            losses = []
    return step_times, evals


def step_seconds(step_times, groups: int) -> float:
    """Median over whole cycles of `groups` steps of the cycle's mean step time; the first cycle
    (allocator and cache warm-up) is left out when there are others."""
    cycles = [statistics.fmean(step_times[i:i + groups]) for i in range(0, len(step_times) - groups + 1, groups)]
    return statistics.median(cycles[1:] if len(cycles) > 1 else cycles or step_times)


def group_count(method: Method, setup: Setup) -> int:
    """k: the steps in which the method visits each of its groups once (hift's groups, BAdam's
    blocks; 1 for the methods that train everything every step). Also the check that the method
    takes its options (hift: that wrap() does), before any run starts."""
    model = _build_model(setup.model_config, setup.device, DTYPES[method.dtype])
    try:
        built = _build_method(method, model, 1e-3, 0)
    except (TypeError, ValueError, RuntimeError) as exc:
        refused = "hift_rt.wrap refused its options" if method.kind == "hift" else "refused its options"
        raise FidelityError(f"method {method.label!r}: {refused}: {exc}") from None
    k = built.groups
    built.close()
    return k


# ---- stage 1 --------------------------------------------------------------------------------

def _stage1_key(preset: Preset, setup: Setup, corpus_a: corpora.Corpus) -> str:
    import transformers

    what = {"model": setup.model_config, "steps": preset.pretrain_steps, "lr": preset.pretrain_lr,
            "batch": setup.batch, "seq_len": setup.seq_len, "warmup_ratio": setup.warmup_ratio,
            "schedule": setup.schedule, "seed": PRETRAIN_SEED, "autocast": setup.autocast,
            "corpus_a": corpus_a.sha256, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def stage1(preset: Preset, setup: Setup, corpus_a: corpora.Corpus, cache_dir: Path, log) -> dict:
    """Pretrain on A with full AdamW, or find the cached checkpoint; sets setup.checkpoint.
    Returns what the report says about it."""
    key = _stage1_key(preset, setup, corpus_a)
    path = cache_dir / f"stage1-{key}.pt"
    setup.checkpoint = str(path)
    if path.is_file():
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        log(f"stage 1: cached checkpoint {path}")
        return {**meta, "key": key, "path": str(path), "cached": True}
    log(f"stage 1: pretraining on corpus A for {preset.pretrain_steps} steps (cached as {path})")
    model = _build_model(setup.model_config, setup.device, torch.float32)
    full = _build_method(parse_method("full"), model, preset.pretrain_lr, PRETRAIN_SEED)
    batches = _Batches(corpus_a.train, setup.seq_len, setup.batch, PRETRAIN_SEED)
    start = time.perf_counter()
    _train(full, _schedule(full.optimizer, setup, preset.pretrain_steps), batches, preset.pretrain_steps, setup)
    full.close()
    meta = {"steps": preset.pretrain_steps, "seconds": time.perf_counter() - start,
            "heldout_A": heldout_loss(model, setup.eval_a, setup), "heldout_B": heldout_loss(model, setup.eval_b, setup)}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"model": model.state_dict(), "meta": meta}, partial)
        os.replace(partial, path)  # another process reading the cache sees all of it or nothing
    except OSError as exc:
        raise FidelityError(f"--cache-dir {cache_dir}: cannot write the stage 1 checkpoint: {exc}") from None
    log(f"stage 1: held-out loss A {meta['heldout_A']:.3f}, B {meta['heldout_B']:.3f} ({meta['seconds']:.0f} s)")
    return {**meta, "key": key, "path": str(path), "cached": False}


# ---- stage 2 --------------------------------------------------------------------------------

def run_one(setup: Setup, run: Run) -> dict:
    """Fine-tune stage 1's checkpoint on B with one method, lr and seed; the run's report."""
    model = _build_model(setup.model_config, setup.device, DTYPES[run.method.dtype])
    state = torch.load(setup.checkpoint, map_location=setup.device, weights_only=True)["model"]
    model.load_state_dict(state)
    del state
    method = _build_method(run.method, model, run.lr, run.seed)

    def evaluate(step, train_loss, elapsed):
        return {"step": step, "loss_A": heldout_loss(method.model, setup.eval_a, setup),
                "loss_B": heldout_loss(method.model, setup.eval_b, setup), "train_loss": train_loss,
                "elapsed_s": elapsed}

    batches = _Batches(setup.train_b, setup.seq_len, setup.batch, run.seed)
    try:
        step_times, evals = _train(method, _schedule(method.optimizer, setup, run.steps), batches, run.steps, setup,
                                   evaluate)
        memory = method.breakdown()
    finally:
        method.close()
    groups = method.groups
    del model, method
    gc.collect()
    if setup.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"method": run.method.label, "kind": run.method.kind, "lr": run.lr, "seed": run.seed, "steps": run.steps,
            "groups": groups, "step_s": step_seconds(step_times, groups), "memory": memory, "evals": evals}


def plan(methods, lrs, seeds, steps: int, target_steps: int, groups: dict):
    """The runs: each method but full x its lrs x seeds for `steps`; full x its lrs x seeds for
    every length a budget needs (steps, target_steps, round(steps / k) per k > 1 of the others)."""
    full_lengths = sorted({steps, target_steps} | {max(1, round(steps / k)) for k in groups.values() if k > 1})
    runs = []
    for method in methods:
        lengths = full_lengths if method.kind == "full" else [steps]
        runs += [Run(method, lr, seed, n) for lr in method.lrs or lrs for n in lengths for seed in seeds]
    return runs


def _describe(run: Run, report: dict) -> str:
    first, last = report["evals"][0], report["evals"][-1]
    return (f"{run.method.label} lr={run.lr:g} seed={run.seed} steps={run.steps}: held-out B "
            f"{first['loss_B']:.3f} -> {last['loss_B']:.3f}, A {first['loss_A']:.3f} -> {last['loss_A']:.3f}, "
            f"{report['step_s'] * 1e3:.1f} ms/step")


def _execute(setup: Setup, runs, jobs: int, log):
    if jobs == 1:
        reports = []
        for run in runs:
            reports.append(run_one(setup, run))
            log(_describe(run, reports[-1]))
        return reports
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_one, setup, run): i for i, run in enumerate(runs)}
        reports = [None] * len(runs)
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            reports[i] = future.result()
            log(_describe(runs[i], reports[i]))
    return reports


# ---- command line ---------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model and run sizes (default: gpu on CUDA, tiny on CPU); micro is the CI smoke test's")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method specs, e.g. full hift:strategy=random,upg=2,lr_policy=step,lr=1e-3/3e-3 "
                             "badam:switch_every=1, or 'peers': " + " ".join(PEERS) +
                             " (default: full hift:lr_policy=cycle hift:lr_policy=step)")
    parser.add_argument("--lrs", default=None, help="comma-separated lr grid for methods without lr= (default: the preset's)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated fine-tuning seeds (data order, random strategy)")
    parser.add_argument("--steps", type=int, default=None, help="T: hift's fine-tuning steps (default: the preset's)")
    parser.add_argument("--target-steps", type=int, default=None,
                        help="steps-to-target aims at full's final loss after this many steps (default: T/2)")
    parser.add_argument("--evals", type=int, default=None, help="evaluations along a run (default: the preset's)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="stage 1's steps (default: the preset's)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup steps / run steps (default 0.1)")
    parser.add_argument("--schedule", choices=("cosine", "linear"), default="cosine", help="decay after the warmup")
    parser.add_argument("--cache-dir", default=None, help=f"stage 1 checkpoints (default {DEFAULT_CACHE})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (CPU only)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="instead of running, combine the runs of these --json files (same setting)")
    parser.add_argument("--json", default=None, help="write the runs and the summary to this file")
    parser.add_argument("--plot", default=None, help="PNG of the held-out curves (needs matplotlib)")


def _ints(text: str, what: str):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise FidelityError(f"{what} must be comma-separated integers, got {text!r}") from None
    if len(set(values)) != len(values):
        raise FidelityError(f"{what} has a value twice: {text!r}")
    return values


def _settings(args) -> dict:
    """The run settings from the preset and the options, checked."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FidelityError(f"--device {device}: no CUDA GPU is available here")
    if device.startswith("cuda") and args.jobs != 1:
        raise FidelityError("--jobs > 1 runs processes side by side on CPU cores; on a GPU use --jobs 1")
    if args.jobs < 1:
        raise FidelityError(f"--jobs must be at least 1, got {args.jobs}")
    preset_name = args.preset or ("gpu" if device.startswith("cuda") else "tiny")
    preset = PRESETS[preset_name]
    steps = args.steps if args.steps is not None else preset.steps
    evals = args.evals if args.evals is not None else preset.evals
    target = args.target_steps if args.target_steps is not None else steps // 2
    pretrain = args.pretrain_steps if args.pretrain_steps is not None else preset.pretrain_steps
    if steps < 1 or not 1 <= evals <= steps or not 1 <= target <= steps or pretrain < 1:
        raise FidelityError(f"need 1 <= --evals ({evals}) <= --steps ({steps}), 1 <= --target-steps ({target}) "
                            f"<= --steps and --pretrain-steps ({pretrain}) >= 1")
    if not 0 <= args.warmup_ratio < 1:
        raise FidelityError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    specs = [spec for given in (args.methods or preset.methods) for spec in (PEERS if given == "peers" else [given])]
    methods = [parse_method(spec) for spec in specs]
    if len({m.label for m in methods}) != len(methods):
        raise FidelityError("--methods has a method twice (give one spec a grid: lr=1e-3/3e-3)")
    lrs = _lrs(args.lrs.split(","), "--lrs") if args.lrs else preset.lrs
    if args.plot and not _has_matplotlib():
        raise FidelityError("--plot needs matplotlib (pip install hift_rt[bench])")
    return {"preset": preset_name, "device": device, "steps": steps, "evals": evals, "target_steps": target,
            "pretrain_steps": pretrain, "warmup_ratio": args.warmup_ratio, "schedule": args.schedule,
            "seeds": _ints(args.seeds, "--seeds"), "lrs": list(lrs), "methods": methods}


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _environment(device: str) -> dict:
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
            "threads": torch.get_num_threads()}


def run_benchmark(args, log=print) -> dict:
    """Stage 1 and 2 for the settings in `args`; the report (without the summary)."""
    settings = _settings(args)
    preset = PRESETS[settings["preset"]]
    preset = dataclasses.replace(preset, pretrain_steps=settings["pretrain_steps"])
    corpus_a = corpora.pydoc_topics()
    corpus_b = corpora.stdlib_source(preset.corpus_b_bytes)
    on_cuda = settings["device"].startswith("cuda")
    clock = "cpu" if not on_cuda and torch.get_num_threads() == 1 else "wall"
    setup = Setup(_model_config(preset, preset.seq_len), settings["device"], on_cuda,
                  preset.batch, preset.seq_len, max(1, settings["steps"] // settings["evals"]),
                  settings["warmup_ratio"], settings["schedule"], clock, corpus_b.train,
                  corpora.eval_windows(corpus_a.heldout, preset.seq_len, preset.eval_windows),
                  corpora.eval_windows(corpus_b.heldout, preset.seq_len, preset.eval_windows), checkpoint="")
    methods = settings.pop("methods")
    unavailable = {m.label: registry.METHODS[m.kind].unavailable() for m in methods}
    unavailable = {label: why for label, why in unavailable.items() if why}
    for label, why in unavailable.items():
        log(f"{label}: unavailable, left out ({why})")
    methods = [m for m in methods if m.label not in unavailable]
    groups = {m.label: group_count(m, setup) for m in methods if m.kind != "full"}
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else DEFAULT_CACHE.expanduser()
    stage1_report = stage1(preset, setup, corpus_a, cache_dir, log)
    runs = plan(methods, settings["lrs"], settings["seeds"], settings["steps"], settings["target_steps"], groups)
    log(f"stage 2: {len(runs)} runs, {sum(r.steps for r in runs)} steps in all")
    reports = _execute(setup, runs, args.jobs, log)
    settings.update(clock=clock, model=setup.model_config, batch=setup.batch, seq_len=setup.seq_len, eval_every=setup.eval_every,
                    eval_windows=preset.eval_windows, pretrain_lr=preset.pretrain_lr,
                    shared=dict(SHARED), methods=[m.label for m in methods],
                    grids={m.label: list(m.lrs or settings["lrs"]) for m in methods}, unavailable=unavailable)
    return {"benchmark": "fidelity", "settings": settings, "environment": _environment(settings["device"]),
            "corpora": {"A": corpus_a.describe(), "B": {**corpus_b.describe(), "modules": corpus_b.documents}},
            "stage1": stage1_report, "memory_rule": _memory_rule(methods), "runs": reports}


def _memory_rule(methods) -> dict:
    """memory_rule's bytes for Llama-2-7B's shape, per method (the weights in the method's dtype)
    and for full fine-tuning (fp32), which the fractions divide by."""
    def bytes_of(kind, options, dtype):
        return memory_rule.rule(kind, dict(options), memory_rule.LLAMA_2_7B, DTYPES[dtype].itemsize)

    return {"shape": "Llama-2-7B", "config": memory_rule.LLAMA_2_7B, "full": bytes_of("full", (), "fp32"),
            "methods": {m.label: bytes_of(m.kind, m.options, m.dtype) for m in methods}}


def main(args) -> int:
    try:
        if args.merge:
            if args.plot and not _has_matplotlib():
                raise FidelityError("--plot needs matplotlib (pip install hift_rt[bench])")
            report = fidelity_report.merge(args.merge)
        else:
            report = run_benchmark(args)
    except (FidelityError, corpora.CorpusError, fidelity_report.ReportError) as exc:
        print(f"fidelity: {exc}", file=sys.stderr)
        return 2
    report["summary"] = fidelity_report.summarize(report)
    print(fidelity_report.table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        fidelity_report.plot(report, args.plot)
    return 0
