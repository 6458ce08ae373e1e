"""`python -m hift_rt.bench finetune`: hift_rt beside the ways people fine-tune today, same model,
batch and card, one run.

A Llama-shaped causal LM from a transformers config (random init, no download). Methods:
  full            torch AdamW (fused on CUDA), every parameter trained every step
  lora            peft LoRA r=16 on every linear layer (when peft is installed)
  layerwise-sync  the HiFT reference code's way: one group trainable per step, its AdamW state
                  moved to and from the CPU with synchronous copies
  hift            hift_rt.wrap with the model's weights as they are (fp32)
  hift-bf16       hift_rt.wrap on bf16 weights with fp32 master weights in the offloaded state
  hift-nooffload  hift-bf16 with every group's state kept on the GPU (offload=False)
Per method: step time (the mean over each whole cycle of groups, median over cycles), tokens/s,
peak allocated / reserved GPU memory, a breakdown (weights, gradients, optimizer state on the
GPU, state in host memory, activations = the rest of the peak), and for hift the engine's
transfer figures. Methods run one after another in this process with the GPU memory released
and the peak counters reset in between.
"""
import gc
import json
import resource
import statistics
import time

import torch

from ..engine import EngineError

PRESETS = {
    # name: (hidden, intermediate, layers, heads, vocab, default batch, default seq)
    "tiny": (64, 172, 4, 4, 512, 2, 64),
    "1b": (2048, 5504, 24, 16, 32000, 4, 1024),   # the anchors' 1.35 B shape
    "7b": (4096, 11008, 32, 32, 32000, 2, 1024),  # Llama-2-7B's shape
}
METHODS = ("full", "lora", "layerwise-sync", "hift", "hift-bf16", "hift-nooffload")
GiB = 2 ** 30
MiB = 2 ** 20


def add_arguments(parser):
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model shape (default: 1b on CUDA, tiny on CPU)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated, from {','.join(METHODS)} (default: all; 7b: hift-bf16)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--precision", choices=("bf16-autocast", "fp32"), default=None,
                        help="compute precision (default: bf16-autocast on CUDA, fp32 on CPU)")
    parser.add_argument("--strategy", default="bottom_up", choices=("bottom_up", "top_down", "random"))
    parser.add_argument("--units-per-group", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=2, help="timed cycles of groups (after one warm-up cycle)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--plot", default=None, help="PNG of peak memory per step over one cycle (matplotlib)")


def _config(preset):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, vocab, _, _ = PRESETS[preset]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=4096)


def _build(cfg, device, dtype, checkpointing):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


class _Method:
    """One way of fine-tuning: builds its model and optimizer, runs one step, reports memory."""

    groups = 1  # steps per cycle

    def __init__(self, cfg, device, args):
        self.cfg, self.device, self.args = cfg, device, args

    def breakdown(self):
        raise NotImplementedError

    def close(self):
        pass


class _Full(_Method):
    def __init__(self, cfg, device, args):
        super().__init__(cfg, device, args)
        self.model = _build(cfg, device, torch.float32, args.gradient_checkpointing)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, fused=device.type == "cuda")

    def step(self, i, batch, autocast):
        with autocast():
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def breakdown(self):
        weights = _bytes(self.model.parameters())
        state = _bytes(t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
        return {"weights": weights, "gradients": _bytes(self.params), "state_device": state, "state_host": 0}


class _Lora(_Full):
    def __init__(self, cfg, device, args):
        from peft import LoraConfig, get_peft_model

        _Method.__init__(self, cfg, device, args)
        base = _build(cfg, device, torch.float32, args.gradient_checkpointing)
        self.model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=device.type == "cuda")


class _LayerwiseSync(_Method):
    """As shared/anchors/ft_anchors.py: embeddings, each layer, then norm + head, top-down;
    the state of the group leaving goes to the CPU and the next one's comes back, synchronously."""

    def __init__(self, cfg, device, args):
        super().__init__(cfg, device, args)
        m = self.model = _build(cfg, device, torch.float32, args.gradient_checkpointing)
        per = args.units_per_group
        units = [[m.model.embed_tokens]] + [[layer] for layer in m.model.layers] + [[m.model.norm, m.lm_head]]
        self.gparams = [[p for unit in units[i:i + per] for mod in unit for p in mod.parameters()]
                        for i in range(0, len(units), per)]
        self.groups = len(self.gparams)
        for p in m.parameters():
            p.requires_grad_(False)
        self.opts = [torch.optim.AdamW(ps, lr=1e-5, fused=device.type == "cuda") for ps in self.gparams]

    def _move_state(self, opt, device):
        for state in opt.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)

    def step(self, i, batch, autocast):
        k = self.groups
        g = (k - 1) - (i % k)
        prev = (g + 1) % k
        self._move_state(self.opts[prev], "cpu")
        for p in self.gparams[prev]:
            p.requires_grad_(False)
            p.grad = None
        for p in self.gparams[g]:
            p.requires_grad_(True)
        self._move_state(self.opts[g], self.device)
        with autocast():
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opts[g].step()
        self.opts[g].zero_grad(set_to_none=True)

    def breakdown(self):
        on_device = host = 0
        for opt in self.opts:
            for state in opt.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim():
                        if value.device.type == "cpu":
                            host += _bytes([value])
                        else:
                            on_device += _bytes([value])
        largest = max(_bytes(ps) for ps in self.gparams)
        return {"weights": _bytes(self.model.parameters()), "gradients": largest,
                "state_device": on_device, "state_host": host}


class _HiFT(_Method):
    def __init__(self, cfg, device, args, dtype=torch.float32, offload=True):
        import hift_rt

        super().__init__(cfg, device, args)
        self.model = _build(cfg, device, dtype, args.gradient_checkpointing)
        self.opt = hift_rt.wrap(self.model, "adamw", lr=1e-5, strategy=args.strategy,
                                units_per_group=args.units_per_group, offload=offload)
        self.groups = len(self.opt.groups)

    def step(self, i, batch, autocast):
        with autocast():
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def breakdown(self):
        return self.opt.memory_breakdown()

    def transfers(self):
        return self.opt.transfer_stats()

    def close(self):
        self.opt.close()


FACTORIES = {
    "full": _Full,
    "lora": _Lora,
    "layerwise-sync": _LayerwiseSync,
    "hift": lambda c, d, a: _HiFT(c, d, a, torch.float32, offload=True),
    "hift-bf16": lambda c, d, a: _HiFT(c, d, a, torch.bfloat16, offload=True),
    "hift-nooffload": lambda c, d, a: _HiFT(c, d, a, torch.bfloat16, offload=False),
}


def _sync(device):
    # The compute stream only: a device-wide synchronize would also wait for the engine's
    # copy streams and so put every swap into the step it times, hiding nothing.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _timed_transfers(total, warm):
    """Engine figures of the timed cycles: the totals minus those of the warm-up cycle."""
    out = {"exposed_wait_seconds": total["exposed_wait_seconds"] - warm.get("exposed_wait_seconds", 0.0)}
    for direction in ("h2d", "d2h"):
        t, w = total[direction], warm.get(direction, {})
        d = {key: t[key] - w.get(key, 0) for key in ("bytes", "busy_seconds", "transfers")}
        d["gb_per_s"] = d["bytes"] / d["busy_seconds"] / 1e9 if d["busy_seconds"] > 0 else 0.0
        out[direction] = d
    return out


def run_method(name, cfg, device, args, batch, autocast):
    """Warm-up cycle, then `args.cycles` timed cycles; returns this method's figures."""
    _release(device)
    cuda = device.type == "cuda"
    method = FACTORIES[name](cfg, device, args)
    k = method.groups
    step_times, step_peaks = [], []
    warm = {}
    for i in range((1 + args.cycles) * k):
        if i == k and isinstance(method, _HiFT):
            warm = method.transfers()  # figures of the warm-up cycle, subtracted below
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        method.step(i, batch, autocast)
        _sync(device)
        if i >= k:
            step_times.append(time.perf_counter() - start)
            step_peaks.append(torch.cuda.max_memory_allocated(device) if cuda else 0)
    cycle_means = [statistics.fmean(step_times[c * k:(c + 1) * k]) for c in range(args.cycles)]
    step_s = statistics.median(cycle_means)
    out = {"groups": k, "step_s": step_s, "tokens_per_s": batch.numel() / step_s,
           "peak_per_step_bytes": step_peaks[:k]}
    breakdown = method.breakdown()
    out["breakdown_bytes"] = breakdown
    if cuda:
        peak = max(step_peaks)
        out["peak_allocated_GiB"] = peak / GiB
        out["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / GiB
        out["activations_GiB"] = (peak - breakdown["weights"] - breakdown["gradients"] - breakdown["state_device"]) / GiB
    # Peak resident host memory of this process so far (pinned state included); it only grows,
    # so read it for the first method run or run one method per process.
    out["peak_host_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    if isinstance(method, _HiFT):
        totals = method.transfers()
        if totals:
            stats = _timed_transfers(totals, warm)
            out["transfers"] = stats
            out["exposed_transfer_fraction"] = stats["exposed_wait_seconds"] / sum(step_times)
    method.close()
    del method
    _release(device)
    return out


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("1b" if device.type == "cuda" else "tiny")
    defaults = PRESETS[preset]
    batch_size, seq = args.batch or defaults[5], args.seq or defaults[6]
    precision = args.precision or ("bf16-autocast" if device.type == "cuda" else "fp32")
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    else:
        methods = ["hift-bf16"] if preset == "7b" else list(METHODS)
    cfg = _config(preset)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=gen).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": preset, "batch": [batch_size, seq], "precision": precision,
              "strategy": args.strategy, "units_per_group": args.units_per_group,
              "gradient_checkpointing": args.gradient_checkpointing, "torch": torch.__version__,
              "params_M": None, "methods": {}}
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        report["params_M"] = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) / 1e6
    for name in methods:
        if name == "lora":
            try:
                import peft  # noqa: F401
            except ImportError:
                report["methods"][name] = {"skipped": "peft is not installed (pip install hift_rt[bench])"}
                continue
        try:
            report["methods"][name] = run_method(name, cfg, device, args, batch, autocast)
        except (torch.OutOfMemoryError, EngineError) as exc:  # GPU memory, or pinned host memory
            report["methods"][name] = {"error": str(exc).splitlines()[0]}
            _release(device)
    return report


def _print(report):
    print(f"fine-tuning a {report['params_M']:.2f} M-parameter Llama ({report['preset']}) on {report['device']}, "
          f"batch {report['batch'][0]} x {report['batch'][1]}, {report['precision']}, "
          f"strategy {report['strategy']}, {report['units_per_group']} unit(s)/group"
          + (", gradient checkpointing" if report["gradient_checkpointing"] else ""))
    header = (f"{'method':<16}{'groups':>7}{'step s':>9}{'tok/s':>10}{'peak GiB':>10}{'rsrvd':>8}"
              f"{'weights MiB':>14}{'grads':>9}{'st GPU':>9}{'st host':>9}{'activ':>9}{'h2d GB/s':>10}{'exposed':>9}")
    print(header)
    for name, r in report["methods"].items():
        if "step_s" not in r:
            print(f"{name:<16}  {r.get('skipped') or r.get('error')}")
            continue
        b = {k: v / MiB for k, v in r["breakdown_bytes"].items()}
        peak = f"{r['peak_allocated_GiB']:.2f}" if "peak_allocated_GiB" in r else "-"
        reserved = f"{r['peak_reserved_GiB']:.2f}" if "peak_reserved_GiB" in r else "-"
        act = f"{r['activations_GiB'] * 1024:.1f}" if "activations_GiB" in r else "-"
        h2d = f"{r['transfers']['h2d']['gb_per_s']:.1f}" if "transfers" in r else "-"
        exposed = f"{100 * r['exposed_transfer_fraction']:.1f}%" if "exposed_transfer_fraction" in r else "-"
        print(f"{name:<16}{r['groups']:>7}{r['step_s']:>9.4f}{r['tokens_per_s']:>10.0f}{peak:>10}{reserved:>8}"
              f"{b['weights']:>14.1f}{b['gradients']:>9.1f}{b['state_device']:>9.1f}{b['state_host']:>9.1f}"
              f"{act:>9}{h2d:>10}{exposed:>9}")
    ref = report["methods"].get("full", {}).get("step_s")
    for name, r in report["methods"].items():
        if ref and name.startswith("hift") and "step_s" in r:
            print(f"{name}: step time {r['step_s'] / ref:.2f} x full's")
    if "hift-bf16" in report["methods"] and "hift-nooffload" in report["methods"]:
        on, off = report["methods"]["hift-bf16"].get("step_s"), report["methods"]["hift-nooffload"].get("step_s")
        if on and off:
            print(f"offload on / off step time: {on / off:.3f}")


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
