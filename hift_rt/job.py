"""The main job: fine-tune a causal language model with hift_rt (`python -m hift_rt finetune`).

With no options it trains a small Llama-shaped model from random weights on a corpus that ships
with Python (`pydoc_data.topics`, ~465 KB of English) through a byte-level tokenizer, on CUDA
when there is a GPU and otherwise on the CPU. `--model` takes a local Hugging Face model
directory, `--data` a .txt file or a .jsonl file with a "text" field.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import List, Optional

import torch

STATE_FILE = "hift_rt_state.pt"
DEFAULT_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024)


class JobError(Exception):
    """A problem with the user's input, reported as one line."""


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
    if p.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JobError(f"--data {path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise JobError(f"--data {path}: line {number} has no string field \"text\"")
            texts.append(record["text"])
        if not texts:
            raise JobError(f"--data {path}: no records")
        return "\n\n".join(texts)
    raise JobError(f"--data must be a .txt file or a .jsonl file with a \"text\" field, got {path}")


def tokenize(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long)


class WindowSampler:
    """Random windows of seq_len + 1 tokens from a token stream, from a seeded generator whose
    state travels with checkpoints (a resumed run sees the same batches)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int):
        if tokens.numel() < seq_len + 2:
            raise JobError(f"the training text has {tokens.numel()} tokens, fewer than --seq-len {seq_len} + 2")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=self.generator)
        return torch.stack([self.tokens[s:s + self.seq_len] for s in starts.tolist()])


# ---- model ---------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {name}: no CUDA GPU is available here")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_model(path: Optional[str], device: torch.device, dtype: torch.dtype, seed: int):
    """(model, tokenizer, description). A local HF directory, or the embedded default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if path is None:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL))
        return model.to(device, dtype), ByteTokenizer(), "a small Llama-shaped model from RANDOM weights"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise JobError(f"--model: no such directory: {path}")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise JobError(f"--model {path}: no weights (*.safetensors or *.bin) in this directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise JobError(f"--model {path}: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.model_max_length = int(1e12)  # we cut windows ourselves
    except (OSError, ValueError):
        if model.config.vocab_size < 256:
            raise JobError(f"--model {path}: no tokenizer files and a vocabulary too small for bytes") from None
        tokenizer = ByteTokenizer()
    return model.to(device, dtype), tokenizer, f"{path} ({type(model).__name__})"


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


# ---- one run -------------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, seq_len: int, batch_size: int, device, max_batches: int = 8) -> float:
    """Mean loss over consecutive held-out windows (the same windows for every method)."""
    was_training = model.training
    model.eval()
    windows = [tokens[i:i + seq_len] for i in range(0, tokens.numel() - seq_len, seq_len)][:max_batches * batch_size]
    losses = []
    for i in range(0, len(windows), batch_size):
        batch = torch.stack(windows[i:i + batch_size]).to(device)
        losses.append(model(input_ids=batch, labels=batch).loss.float().item())
    model.train(was_training)
    return statistics.fmean(losses) if losses else float("nan")


def _memory_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def run(args, method: str = "hift", log=print) -> dict:
    """Train with `method` ("hift" or "full") as `args` say; returns the run's figures."""
    import hift_rt

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    resume_state = None
    model_path = args.model
    if args.resume and method == "hift":
        state_file = Path(args.resume) / STATE_FILE
        if not state_file.is_file():
            raise JobError(f"--resume {args.resume}: no {STATE_FILE} (not a directory written by --save)")
        resume_state = torch.load(state_file, map_location="cpu", weights_only=True)
        model_path = args.resume
    model, tokenizer, described = build_model(model_path, device, dtype, args.seed)
    if resume_state is not None and resume_state["tokenizer"] == "bytes":
        tokenizer = ByteTokenizer()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and args.seq_len > max_positions:
        raise JobError(f"--seq-len {args.seq_len} is beyond the model's {max_positions} positions")
    model.config.use_cache = False
    model.train()

    tokens = tokenize(load_text(args.data), tokenizer)
    split = int(tokens.numel() * 0.95)
    train_tokens, heldout_tokens = tokens[:split], tokens[split:]
    sampler = WindowSampler(train_tokens, args.seq_len, args.batch_size, args.seed)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if method == "hift":
        opt = hift_rt.wrap(model, args.optim, lr=args.lr, strategy=args.strategy,
                           units_per_group=args.units_per_group, offload=args.offload,
                           max_grad_norm=args.max_grad_norm, no_decay=("bias", "norm"), seed=args.seed,
                           weight_decay=args.weight_decay)
        groups = len(opt.groups)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                fused=device.type == "cuda")
        groups = 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(args.lr_schedule, args.warmup_steps, args.steps))
    # fp16 weights need loss scaling; hift_rt takes GradScaler's scale into its update kernel.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    start_step, losses, memory = 0, [], []
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        sampler.generator.set_state(resume_state["sampler"])
        start_step, losses, memory = resume_state["step"], list(resume_state["losses"]), list(resume_state["memory"])
        log(f"resumed from {args.resume} at step {start_step}")

    log(f"{method}: {described}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
        f"({dtype}) on {device}; {groups} group(s); {train_tokens.numel()} training tokens")
    heldout_start = heldout_loss(model, heldout_tokens, args.seq_len, args.batch_size, device)

    def save(step: int) -> None:
        if not args.save or method != "hift":
            return
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if not isinstance(tokenizer, ByteTokenizer):
            tokenizer.save_pretrained(out)
        torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "sampler": sampler.generator.get_state(), "losses": losses, "memory": memory,
                    "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else "hf"},
                   out / STATE_FILE)

    bar = _progress(args.steps, start_step, f"{method}")
    step_times = []
    step = start_step
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    try:
        for step in range(start_step, args.steps):
            start = time.perf_counter()
            active = getattr(opt, "active_group", 0)
            lr = opt.param_groups[0]["lr"]
            total = 0.0
            for _ in range(args.grad_accum):
                batch = sampler.next().to(device)
                loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            if method == "full" and args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            if scaler:
                scaler.step(opt)  # hift_rt unscales inside its kernel; an inf step changes nothing
                scaler.update()
            else:
                opt.step()
            scheduler.step()
            opt.zero_grad()
            losses.append(float(total))  # one sync per step, for the log
            memory.append(_memory_gib(device))
            step_times.append(time.perf_counter() - start)
            bar.update(1, loss=losses[-1], lr=lr, group=active, tok_s=tokens_per_step / step_times[-1],
                       mem=memory[-1])
        step = args.steps
    except KeyboardInterrupt:
        bar.close()
        if args.save and method == "hift":
            save(step)
            log(f"interrupted at step {step}: checkpoint saved in {args.save}; continue with --resume {args.save}")
        else:
            log(f"interrupted at step {step} (no --save: nothing kept)")
        raise
    bar.close()
    save(step)
    result = {
        "method": method, "steps": step, "groups": groups,
        "step_s": statistics.median(step_times) if step_times else float("nan"),
        "tokens_per_s": tokens_per_step / statistics.median(step_times) if step_times else float("nan"),
        "peak_GiB": _memory_gib(device),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss": statistics.fmean(losses[-10:]) if losses else float("nan"),
        "heldout_start": heldout_start,
        "heldout_end": heldout_loss(model, heldout_tokens, args.seq_len, args.batch_size, device),
        "losses": losses, "memory_GiB": memory,
    }
    if method == "hift":
        opt.close()
    return result


class _progress:
    """tqdm when installed, else a line every tenth of the run."""

    def __init__(self, total: int, initial: int, desc: str):
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.done = total, initial

    def update(self, n: int, **values) -> None:
        self.done += n
        shown = {"loss": f"{values['loss']:.3f}", "lr": f"{values['lr']:.2e}", "group": values["group"],
                 "tok/s": f"{values['tok_s']:.0f}"}
        if not math.isnan(values["mem"]):
            shown["GPU GiB"] = f"{values['mem']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        elif self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            print(f"step {self.done}/{self.total} " + " ".join(f"{k} {v}" for k, v in shown.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_table(results: List[dict]) -> str:
    rows = [("", *[r["method"] for r in results]),
            ("groups", *[str(r["groups"]) for r in results]),
            ("peak GPU memory (GiB)", *[("-" if math.isnan(r["peak_GiB"]) else f"{r['peak_GiB']:.2f}") for r in results]),
            ("step time (s, median)", *[f"{r['step_s']:.4f}" for r in results]),
            ("tokens/s", *[f"{r['tokens_per_s']:.0f}" for r in results]),
            ("first loss", *[f"{r['first_loss']:.3f}" for r in results]),
            ("final loss (last 10)", *[f"{r['final_loss']:.3f}" for r in results]),
            ("held-out loss start -> end", *[f"{r['heldout_start']:.3f} -> {r['heldout_end']:.3f}" for r in results])]
    width = max(len(r[0]) for r in rows)
    cols = [max(len(row[i]) for row in rows) for i in range(1, len(rows[0]))]
    return "\n".join(f"{row[0]:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row[1:], cols)) for row in rows)


def plot(results: List[dict], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
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
    fig.savefig(path, dpi=120)
    return True


def main(args) -> int:
    results = [run(args, "hift")]
    if args.compare == "full":
        results.append(run(args, "full"))
    if args.model is None and not args.resume:
        print("note: the model started from random weights (no --model given); the loss shows it learning the text")
    print(summary_table(results))
    if args.plot:
        print(f"plot: {args.plot}" if plot(results, args.plot) else "--plot needs matplotlib (pip install hift_rt[cli])")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="a local Hugging Face model directory (default: a small random Llama)")
    parser.add_argument("--data", help="a .txt file, or .jsonl with a \"text\" field (default: Python's pydoc topics)")
    parser.add_argument("--optim", default="adamw", choices=("adamw", "adam", "adagrad", "sgd"))
    parser.add_argument("--strategy", default="bottom_up", choices=("bottom_up", "top_down", "random"))
    parser.add_argument("--units-per-group", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-schedule", default="cosine", choices=("constant", "linear", "cosine"))
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 turns clipping off")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="weights' dtype; bf16/fp16 get fp32 master weights (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--offload", default="auto", choices=("auto", "on", "off"),
                        help="optimizer state of inactive groups in pinned host memory (auto: on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--compare", choices=("full",), help="also run standard full fine-tuning (torch AdamW)")
    parser.add_argument("--save", help="directory for the model (save_pretrained) and optimizer/rotation state")
    parser.add_argument("--resume", help="continue from a directory written by --save")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="PNG with loss curves and GPU memory per step (matplotlib)")
    parser.add_argument("--json", help="write the figures to this file")


def check_arguments(args) -> None:
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "units_per_group"):
        if getattr(args, name) < 1:
            raise JobError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr < 0 or args.warmup_steps < 0 or args.weight_decay < 0 or args.max_grad_norm < 0:
        raise JobError("--lr, --warmup-steps, --weight-decay and --max-grad-norm must be >= 0")
    args.offload = {"auto": "auto", "on": True, "off": False}[args.offload]
    args.max_grad_norm = args.max_grad_norm or None
    if args.compare == "full" and args.dtype == "fp16":
        raise JobError("--compare full needs --dtype fp32 or bf16 (torch's AdamW cannot unscale fp16 gradients)")
    if args.resume and args.model:
        raise JobError("--resume takes the model from the checkpoint; drop --model")
    if args.resume and not Path(args.resume).is_dir():
        raise JobError(f"--resume: no such directory: {args.resume}")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise JobError(f"--save: {args.save} exists and is not a directory")
