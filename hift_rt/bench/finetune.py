"""`python -m hift_rt.bench finetune`: hift_rt beside the ways people fine-tune today, same model,
batch and card, timed as a training loop runs.

A Llama-shaped causal LM from a transformers config (random init, no download), built directly
in its weights' dtype on the device. Methods (hift_rt.methods):
  full            torch AdamW (fused on CUDA) on fp32 weights
  full-bf16       torch AdamW on bf16 weights (bf16 state, no master weights)
  lora            peft LoRA r=16 on every linear layer of the blocks, fp32 base (when peft is installed)
  layerwise-sync  the HiFT reference code's way: one group trainable per step, top-down, its AdamW
                  state moved to and from the CPU with synchronous copies
  hift            hift_rt.wrap with fp32 weights
  hift-bf16       hift_rt.wrap on bf16 weights, fp32 master weights in the offloaded state
  hift-nooffload  hift-bf16 with every group's state kept on the GPU (offload=False)
  hift-bf16-<state>[-kahan]  hift-bf16 with compact state: moments stored as bf16 or int8
                  (wrap's state_dtype), a Kahan compensation instead of the fp32 master with
                  -kahan (master_weights="kahan"): hift-bf16-bf16, hift-bf16-int8,
                  hift-bf16-int8-kahan (4.06 host bytes per parameter against hift-bf16's 12)
  badam, lisa, galore, apollo, adam-mini, adalomo, adamw8bit  the peers (hift_rt.methods.PEERS,
                  the `[peers]` extra) on fp32 weights at their published settings; badam-bf16 on
                  bf16 weights, the way BAdam is meant to run (fp32 master copy of one block)
A method whose package is not installed is reported as skipped.

Loss: the model's own (full logits), or with `--efficient-loss on` hift_rt.efficient_lm_loss (no
full logits) for every method; the `8b` preset uses the efficient loss unless `--efficient-loss off`.

Compile: with `--compile [BACKEND]` (default inductor) every method's model is compiled the same
way, by hift_rt.compile (one region per block and glue module) before the method is built, so
compiled full fine-tuning is compared with compiled hift. The warm-up cycle compiles every graph
(its wall time `warmup_s` includes the compile); the report gives the graphs compiled in it and in
the timed cycles (0 when nothing recompiles).

Timing: one untimed warm-up cycle of k steps (k = the method's groups; 1 for full and lora),
then `--cycles` cycles with no synchronize between steps, only a device-wide synchronize at each
cycle's end, as a training loop runs (the host may run ahead of the GPU; whatever blocks it shows).
Step time = cycle time / k, median over cycles. With `--rounds N` every method runs N times in
interleaved rounds (A B C A B C ...), each on a fresh model; the report gives the median over
rounds and the spread (min and max).

Memory: the peak counters are reset after the model is built, so they show what the method adds:
`setup` = building the optimizer (hift: wrap), `train` = the steps. The breakdown has weights,
gradients, optimizer state on the GPU and in host memory, activations = the rest of the training
peak; host RSS after the steps and the pinned host bytes (hift with offload: its state). When
pinned host memory runs short, the method's entry says how much its state needed instead.

Owns: the presets, the timing and the report. May call: hift_rt.methods, memory_rule (bytes per
state element), hift_rt.engine (EngineError), hift_rt.regional (compile), torch._dynamo (its
graph counters), transformers, peft, matplotlib.
"""
import gc
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import methods
from .memory_rule import MASTER_BYTES, MOMENT_BYTES
from ..engine import EngineError
from ..regional import compile as compile_regions

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass(frozen=True)
class Preset:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int   # default batch size
    seq: int     # default sequence length
    methods: tuple  # default methods
    efficient_loss: bool = False  # default loss: hift_rt.efficient_lm_loss instead of the model's own


ALL = ("full", "full-bf16", "lora", "layerwise-sync", "hift", "hift-bf16", "hift-nooffload", "hift-bf16-int8-kahan")
# On the large shapes: hift-bf16 (fp32 moments and master, the default state window) against the
# whole-group slot (issue 11) and against int8 + kahan at the same window (issue 12).
LARGE = ("full-bf16", "hift-bf16", "hift-bf16-slot", "hift-bf16-int8-kahan")
PRESETS = {
    "tiny": Preset(64, 172, 4, 4, 4, 512, 2, 64, ALL),
    "1b": Preset(2048, 5504, 24, 16, 16, 32000, 4, 1024, ALL),               # 1.35 B
    "7b": Preset(4096, 11008, 32, 32, 32, 32000, 2, 1024, LARGE),           # Llama-2-7B
    # Llama-3-8B: its 128256-entry logits and their fp32 loss outweigh what the state window saves
    "8b": Preset(4096, 14336, 32, 32, 8, 128256, 2, 1024, LARGE, efficient_loss=True),
}


class Variant(NamedTuple):
    """A method as the benchmark runs it: its class, the weights' dtype and its Settings fields."""
    cls: type
    dtype: torch.dtype
    settings: dict


METHODS = {
    "full": Variant(methods.Full, torch.float32, {}),
    "full-bf16": Variant(methods.Full, torch.bfloat16, {}),
    "lora": Variant(methods.Lora, torch.float32, {}),
    "layerwise-sync": Variant(methods.LayerwiseSync, torch.float32, {}),
    "hift": Variant(methods.HiFT, torch.float32, {"offload": True}),
    "hift-bf16": Variant(methods.HiFT, torch.bfloat16, {"offload": True}),
    # the whole group's state on the device in one slot, whatever the window says (issue 11's
    # comparison: the default window's step time against it)
    "hift-bf16-slot": Variant(methods.HiFT, torch.bfloat16, {"offload": True, "state_window": None}),
    "hift-nooffload": Variant(methods.HiFT, torch.bfloat16, {"offload": False}),
    "hift-bf16-bf16": Variant(methods.HiFT, torch.bfloat16, {"offload": True, "state_dtype": "bf16"}),
    "hift-bf16-int8": Variant(methods.HiFT, torch.bfloat16, {"offload": True, "state_dtype": "int8"}),
    "hift-bf16-int8-kahan": Variant(methods.HiFT, torch.bfloat16,
                                    {"offload": True, "state_dtype": "int8", "master_weights": "kahan"}),
    **{name: Variant(methods.METHODS[name], torch.float32, {}) for name in methods.PEERS if name != "lora"},
    "badam-bf16": Variant(methods.BAdam, torch.bfloat16, {}),
}
LR = 1e-5


def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default: 1b on CUDA, tiny on CPU)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {','.join(METHODS)} (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--precision", choices=("bf16-autocast", "fp32"), default=None,
                        help="compute precision (default: bf16-autocast on CUDA, fp32 on CPU)")
    parser.add_argument("--strategy", default="bottom_up", choices=("bottom_up", "top_down", "random"))
    parser.add_argument("--units-per-group", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=2, help="timed cycles of groups (after one warm-up cycle)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every method")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--efficient-loss", choices=("on", "off"), default=None,
                        help="the loss without full logits, hift_rt.efficient_lm_loss (default: the preset's; on for 8b)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="compile every method's model with hift_rt.compile and this torch.compile backend "
                             "(default: inductor)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--plot", default=None, help="PNG of peak memory per step over one cycle (matplotlib)")


def config(preset: Preset):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                       num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                       num_key_value_heads=preset.kv_heads, vocab_size=preset.vocab, max_position_embeddings=4096)


def build(cfg, device, dtype, checkpointing):
    """The model, initialised directly in `dtype` on `device` (no fp32 copy to cast from)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # device-wide: the engine's copy streams too


def host_rss_bytes() -> int:
    """Resident host memory of this process now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes_needed(model, dtype, settings: methods.Settings) -> int:
    """Host bytes of AdamW state for every parameter (all train here) as hift_rt lays it out: m
    and v in `settings.state_dtype`, plus for bf16/fp16 weights the master in
    `settings.master_weights` (fp32 state and master: 12 bytes per parameter, fp32 weights 8;
    int8 + kahan 4.06); the flat buffers' padding (< 64 elements per group) is left out. Not
    requires_grad: a wrap that failed midway may have frozen groups already."""
    master = settings.master_weights
    if master == "auto":
        master = "fp32"
    per_parameter = 2 * MOMENT_BYTES[settings.state_dtype]
    if dtype != torch.float32:
        per_parameter += MASTER_BYTES.get(master, 0)
    return round(per_parameter * sum(p.numel() for p in model.parameters()))


def _timed_transfers(total, warm):
    """Engine figures of the timed cycles: the totals minus those of the warm-up cycle."""
    out = {"exposed_wait_seconds": total["exposed_wait_seconds"] - warm.get("exposed_wait_seconds", 0.0)}
    for direction in ("h2d", "d2h"):
        t, w = total[direction], warm.get(direction, {})
        d = {key: t[key] - w.get(key, 0) for key in ("bytes", "busy_seconds", "transfers")}
        d["gb_per_s"] = d["bytes"] / d["busy_seconds"] / 1e9 if d["busy_seconds"] > 0 else 0.0
        out[direction] = d
    return out


def run_method(name, cfg, device, args, batch, autocast, efficient_loss):
    """One round of one method: build, set up, warm-up cycle, `args.cycles` timed cycles."""
    cls, dtype, variant = METHODS[name]
    cuda = device.type == "cuda"
    _release(device)
    model = build(cfg, device, dtype, args.gradient_checkpointing)
    _release(device)  # the peaks from here on are the method's
    settings = methods.Settings(lr=LR, strategy=args.strategy, units_per_group=args.units_per_group,
                                efficient_loss=efficient_loss, **variant)
    if args.compile:
        torch._dynamo.reset()  # this method's graphs only (the counters go on counting)
        compile_regions(model, backend=args.compile)  # before the method: LayerwiseSync freezes every parameter
    graphs_before = _graphs()
    _sync(device)
    start = time.perf_counter()
    try:
        method = cls(model, settings)
    except EngineError as exc:  # pinned host memory (or the engine) short
        out = {"error": str(exc).splitlines()[0]}
        if settings.offload is True:
            out["state_host_needed_GiB"] = state_bytes_needed(model, dtype, settings) / GiB
        return out
    _sync(device)
    out = {"setup_s": time.perf_counter() - start}
    if cuda:
        out["setup_peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / GiB
        out["setup_peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / GiB
        torch.cuda.reset_peak_memory_stats(device)

    host_ms = {"forward_backward": [], "update": []}

    def train_step(i, timed=False):
        """One step; `timed`: the host's time in the forward + backward calls and in the update
        (no synchronize: where the host blocks, e.g. on a transfer, these grow)."""
        start = time.perf_counter()
        method.before_forward(i)
        with autocast():
            loss = method.model(input_ids=batch, labels=batch).loss
        method.backward(loss)
        issued = time.perf_counter()
        method.update()
        if timed:
            host_ms["forward_backward"].append((issued - start) * 1e3)
            host_ms["update"].append((time.perf_counter() - issued) * 1e3)

    k = method.groups
    start = time.perf_counter()
    for i in range(k):
        train_step(i)
    _sync(device)
    out["warmup_s"] = time.perf_counter() - start
    warm_graphs = _graphs() - graphs_before
    warm = method.transfers()
    cycle_times, step_peaks, reserved = [], [], 0
    for c in range(args.cycles):
        start, counted = time.perf_counter(), method.accounting["wall"]
        for i in range((c + 1) * k, (c + 2) * k):
            if cuda:  # host-side allocator counters: no synchronize
                torch.cuda.reset_peak_memory_stats(device)
            train_step(i, timed=True)
            if cuda:
                step_peaks.append(torch.cuda.max_memory_allocated(device))
                reserved = max(reserved, torch.cuda.max_memory_reserved(device))
        _sync(device)
        cycle_times.append(time.perf_counter() - start - (method.accounting["wall"] - counted))
    step_s = statistics.median(cycle_times) / k
    if args.compile:
        out["graphs_warmup"], out["graphs_timed"] = warm_graphs, _graphs() - graphs_before - warm_graphs
    breakdown = method.breakdown()
    out.update({"groups": k, "step_s": step_s, "tokens_per_s": batch.numel() / step_s,
                "peak_per_step_bytes": step_peaks[:k], "breakdown_bytes": breakdown,
                "host_rss_GiB": host_rss_bytes() / GiB,
                "host_forward_backward_ms": statistics.median(host_ms["forward_backward"]),
                "host_update_ms": statistics.median(host_ms["update"]),
                "pinned_GiB": (breakdown["state_host"] if isinstance(method, methods.HiFT) else 0) / GiB})
    if cuda:
        peak = max(step_peaks)
        out["peak_allocated_GiB"] = peak / GiB
        out["peak_reserved_GiB"] = reserved / GiB
        ours = breakdown["weights"] + breakdown["gradients"] + breakdown["state_device"]
        out["activations_GiB"] = (peak - ours) / GiB
    totals = method.transfers()
    if totals:
        stats = _timed_transfers(totals, warm)
        out["transfers"] = stats
        out["exposed_transfer_fraction"] = stats["exposed_wait_seconds"] / sum(cycle_times)
    method.close()
    del method, model
    _release(device)
    return out


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (0 when it was never imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.utils.counters["stats"]["unique_graphs"] if dynamo is not None else 0


def summarize(rounds):
    """One method's rounds -> the last round's figures with step_s / tokens_per_s as the median
    over rounds and `step_s_min` / `step_s_max`, plus every round's step_s."""
    done = [r for r in rounds if "step_s" in r]
    if not done:
        return rounds[-1]
    times = [r["step_s"] for r in done]
    out = dict(done[-1])
    out.update({"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times),
                "tokens_per_s": done[-1]["tokens_per_s"] * done[-1]["step_s"] / statistics.median(times),
                "rounds_step_s": times})
    return out


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or ("1b" if device.type == "cuda" else "tiny")
    preset = PRESETS[preset_name]
    batch_size, seq = args.batch or preset.batch, args.seq or preset.seq
    precision = args.precision or ("bf16-autocast" if device.type == "cuda" else "fp32")
    efficient_loss = preset.efficient_loss if args.efficient_loss is None else args.efficient_loss == "on"
    if args.rounds < 1 or args.cycles < 1:
        raise SystemExit("--rounds and --cycles must be >= 1")
    if args.methods:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    else:
        names = list(preset.methods)
    cfg = config(preset)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=gen).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": preset_name, "batch": [batch_size, seq], "precision": precision,
              "strategy": args.strategy, "units_per_group": args.units_per_group, "cycles": args.cycles,
              "rounds": args.rounds, "gradient_checkpointing": args.gradient_checkpointing,
              "efficient_loss": efficient_loss, "compile": args.compile,
              "torch": torch.__version__, "params_M": None, "methods": {}}
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        report["params_M"] = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) / 1e6
    rounds = {}
    for name in names:
        missing = METHODS[name].cls.unavailable()
        if missing:
            report["methods"][name] = {"skipped": f"{name} {missing}"}
            continue
        rounds[name] = []
    for _ in range(args.rounds):
        for name, done in rounds.items():
            if done and "error" in done[-1]:
                continue  # it failed once: it would again
            try:
                done.append(run_method(name, cfg, device, args, batch, autocast, efficient_loss))
            except torch.OutOfMemoryError as exc:
                done.append({"error": str(exc).splitlines()[0]})
                _release(device)
    for name, done in rounds.items():
        report["methods"][name] = summarize(done)
    return report


def _gib(r, key, digits=2):
    return f"{r[key]:.{digits}f}" if key in r else "-"


def _print(report):
    print(f"fine-tuning a {report['params_M']:.2f} M-parameter Llama ({report['preset']}) on {report['device']}, "
          f"batch {report['batch'][0]} x {report['batch'][1]}, {report['precision']}, "
          f"strategy {report['strategy']}, {report['units_per_group']} unit(s)/group, "
          f"{report['cycles']} timed cycle(s) x {report['rounds']} round(s)"
          + (", gradient checkpointing" if report["gradient_checkpointing"] else "")
          + (", efficient loss (no full logits)" if report["efficient_loss"] else "")
          + (f", hift_rt.compile (backend {report['compile']})" if report["compile"] else ""))
    print(f"{'method':<22}{'groups':>7}{'step s':>9}{'min..max':>17}{'tok/s':>10}{'setup s':>9}"
          f"{'h2d GB/s':>10}{'exposed':>9}{'host fw+bw ms':>15}{'host step ms':>14}")
    for name, r in report["methods"].items():
        if "step_s" not in r:
            needed = f" (its state needs {r['state_host_needed_GiB']:.3g} GiB of pinned host memory)" \
                if "state_host_needed_GiB" in r else ""
            print(f"{name:<22}  {r.get('skipped') or r.get('error')}{needed}")
            continue
        spread = f"{r['step_s_min']:.4f}..{r['step_s_max']:.4f}"
        h2d = f"{r['transfers']['h2d']['gb_per_s']:.1f}" if "transfers" in r else "-"
        exposed = f"{100 * r['exposed_transfer_fraction']:.1f}%" if "exposed_transfer_fraction" in r else "-"
        print(f"{name:<22}{r['groups']:>7}{r['step_s']:>9.4f}{spread:>17}{r['tokens_per_s']:>10.0f}"
              f"{r['setup_s']:>9.2f}{h2d:>10}{exposed:>9}{r['host_forward_backward_ms']:>15.2f}"
              f"{r['host_update_ms']:>14.2f}")
    print(f"\n{'GiB':<22}{'peak':>7}{'rsrvd':>7}{'setup rsrvd':>12}{'weights':>9}{'grads':>7}{'st GPU':>8}"
          f"{'st host':>8}{'activ':>7}{'pinned':>8}{'RSS':>7}")
    for name, r in report["methods"].items():
        if "step_s" not in r:
            continue
        b = {k: v / GiB for k, v in r["breakdown_bytes"].items()}
        print(f"{name:<22}{_gib(r, 'peak_allocated_GiB'):>7}{_gib(r, 'peak_reserved_GiB'):>7}"
              f"{_gib(r, 'setup_peak_reserved_GiB'):>12}{b['weights']:>9.3f}{b['gradients']:>7.3f}"
              f"{b['state_device']:>8.3f}{b['state_host']:>8.3f}{_gib(r, 'activations_GiB'):>7}"
              f"{r['pinned_GiB']:>8.3f}{r['host_rss_GiB']:>7.2f}")
    ref = report["methods"].get("full", {}).get("step_s")
    for name, r in report["methods"].items():
        if ref and name.startswith("hift") and "step_s" in r:
            print(f"{name}: step time {r['step_s'] / ref:.2f} x full's")
    for name, r in report["methods"].items():
        if "graphs_warmup" in r:
            print(f"{name}: warm-up cycle {r['warmup_s']:.2f} s (compiling included), {r['graphs_warmup']} graphs, "
                  f"{r['graphs_timed']} compiled in the timed cycles")
    on, off = (report["methods"].get(m, {}).get("step_s") for m in ("hift-bf16", "hift-nooffload"))
    if on and off:
        print(f"offload on / off step time: {on / off:.3f}")
    fp32_state = report["methods"].get("hift-bf16", {})
    slot = report["methods"].get("hift-bf16-slot", {})
    if "step_s" in slot and "step_s" in fp32_state:
        print(f"state window / whole slot step time: {fp32_state['step_s'] / slot['step_s']:.3f}")
    for name, r in report["methods"].items():
        if name.startswith("hift-bf16-") and name != "hift-bf16-slot" and "step_s" in r and "step_s" in fp32_state:
            host = r["breakdown_bytes"]["state_host"] / fp32_state["breakdown_bytes"]["state_host"]
            print(f"{name} / hift-bf16 (fp32 state and master): step time {r['step_s'] / fp32_state['step_s']:.3f}, "
                  f"host state {host:.3f}")


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in report["methods"].items():
        peaks = r.get("peak_per_step_bytes")
        if peaks and any(peaks):
            ax.plot(range(1, len(peaks) + 1), [p / GiB for p in peaks], marker="o", label=name)
    ax.set_xlabel("step within one cycle")
    ax.set_ylabel("peak allocated (GiB)")
    ax.set_title(f"{report['params_M']:.0f} M params on {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args):
    report = run(args)
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        if report["device"] == "cpu":
            print("--plot draws GPU memory per step; there is no GPU here")
        else:
            try:
                _plot(report, args.plot)
            except ImportError:
                print("--plot needs matplotlib (pip install hift_rt[bench])")
    return 0
