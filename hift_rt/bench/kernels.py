"""`python -m hift_rt.bench kernels`: update-kernel bandwidth against a device copy and torch.optim.

One row per kernel and setting: elements, bytes moved per element (read + written, see
`bytes_per_element`), median ms, GB/s, % of the device-to-device copy bandwidth measured in the
same run (`dst.copy_(src)`, read + write counted). Rows with fp32 state also give the speed-up over
torch's best optimizer for the same number of elements laid out as a model's tensor list (~70
tensors): fused AdamW, fused SGD with momentum, foreach Adagrad; where fused is not available the
foreach variant runs, and the row says which. Rows with compact state (bf16 or int8 moments, fp32
master / Kahan compensation / no master) give instead their speed-up over the same kernel with
fp32 state at equal parameter count (for a bf16 param: fp32 state + fp32 master, today's default).
Each timed call rotates to another set of buffers, so that no call finds its inputs in cache.

On CUDA the kernels are the compiled Triton ones. On CPU the torch path runs; the figures only
show that the harness works. The interpreter (TRITON_INTERPRET=1) is a correctness tool, not
something to time: the benchmark refuses to run under it.
"""
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import triton

from ..kernels import Q, _common, adagrad_update, adamw_update, grad_norm, quantize, sgd_update
from . import _timing

LR = 1e-4  # small, so that the repeated updates keep the buffers' values ordinary
STEP = 10  # bias corrections need some step; its value does not change the work


@dataclass
class Row:
    kernel: str
    setting: str
    elements: int
    bytes_per_element: float
    ms: float
    GBps: float
    copy_fraction: float  # GBps / the copy's GB/s in the same run
    torch_baseline: Optional[str]  # what the torch figure runs; None for the copy, compact rows
    torch_ms: Optional[float]
    speedup: Optional[float]  # torch_ms / ms
    fp32_state_setting: Optional[str] = None  # compact rows: the fp32-state row compared with
    fp32_state_speedup: Optional[float] = None  # its ms / this row's ms


def add_arguments(parser):
    parser.add_argument("--elements", type=int, default=None,
                        help=f"elements per buffer, a multiple of {Q} (int8 blocks; default: 64 Mi "
                             "on CUDA, 256 Ki on CPU)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per row (default: 100 on CUDA, 20 on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def model_like_sizes(total):
    """Sizes of a Llama-like model's tensors that add up to `total`: per layer 4 attention
    matrices d x d, 3 MLP matrices d x 8d/3 and 2 norm vectors d, with d picked for about 8
    layers (~70 tensors, like the anchors' torch.optim measurement); the last one is cut short."""
    d = max(64, round(math.sqrt(total / 8 / 12) / 64) * 64)
    layer = [d * d] * 4 + [d * (8 * d // 3)] * 3 + [d] * 2
    sizes, left = [], total
    while left > 0:
        for size in layer:
            sizes.append(min(size, left))
            left -= sizes[-1]
            if left == 0:
                break
    return sizes


def _random(n, device, dtype=torch.float32):
    return torch.randn(n, device=device).to(dtype)


def _tensor_list(flat):
    """The flat buffer's values as model-like tensors, each its own allocation, as in a model."""
    return [part.clone() for part in torch.split(flat, model_like_sizes(flat.numel()))]


def _first_that_runs(candidates):
    """(label, calls) of the first candidate whose build and first call succeed: torch has no
    fused kernel for some optimizers or devices, and says so only when asked to run one."""
    errors = []
    for label, build in candidates:
        try:
            calls = build()
            calls[0]()
            return label, calls
        except (RuntimeError, ValueError) as error:
            errors.append(f"{label}: {error}")
    raise RuntimeError("no torch baseline runs here; " + "; ".join(errors))


def _torch_optimizer_calls(sets, optimizer_class, variant, masters=False, clip=False, **options):
    """One torch.optim step per buffer set over model-like tensor lists.

    masters: the params are bf16 with fp32 masters; torch then needs the gradient cast to fp32
    first and the masters cast back after the step (foreach copies). clip: the gradients are
    multiplied by a device-side coefficient first, as clip_grad_norm_ does."""
    calls = []
    for buffers in sets:
        weights = [t.requires_grad_() for t in _tensor_list(buffers["weights"])]
        grads = _tensor_list(buffers["grad"])
        if masters:
            params = _tensor_list(buffers["param"])
            for weight in weights:
                weight.grad = torch.empty_like(weight)
        else:
            for weight, grad in zip(weights, grads):
                weight.grad = grad
        optimizer = optimizer_class(weights, lr=LR, **{variant: True}, **options)
        weight_grads = [weight.grad for weight in weights]
        coef = buffers["clip_coef"].reshape(()) if clip else None

        @torch.no_grad()
        def call(optimizer=optimizer, weights=weights, weight_grads=weight_grads, grads=grads,
                 params=params if masters else None, coef=coef):
            if masters:
                torch._foreach_copy_(weight_grads, grads)
            if clip:
                torch._foreach_mul_(weight_grads, coef)
            optimizer.step()
            if masters:
                torch._foreach_copy_(params, weights)
        calls.append(call)
    return calls


def _optimizer_baseline(sets, optimizer_class, variants, masters=False, clip=False, **options):
    name = optimizer_class.__name__
    extra = (" on fp32 masters + foreach casts" if masters else "") + \
            (" + foreach clip" if clip else "")
    return _first_that_runs([
        (f"{variant} {name}{extra}",
         lambda variant=variant: _torch_optimizer_calls(sets, optimizer_class, variant, masters,
                                                         clip, **options))
        for variant in variants])


def _norm_baseline(sets):
    def build(foreach):
        calls = []
        for buffers in sets:
            grads = _tensor_list(buffers["grad"])
            calls.append(lambda grads=grads: torch.nn.utils.get_total_norm(grads, 2.0,
                                                                           foreach=foreach))
        return calls
    return _first_that_runs([("foreach get_total_norm", lambda: build(True)),
                             ("get_total_norm", lambda: build(None))])


@dataclass(frozen=True)
class Variant:
    """What one update kernel call moves: param dtype, where the weight lives ("param" for an
    fp32 param, "master", "kahan" or "none" for a bf16 one), its moments and their format."""
    param: torch.dtype
    weights: str
    states: Tuple[str, ...]
    state: str = "fp32"  # "fp32", "bf16" or "int8"

    @property
    def setting(self):
        param = "fp32" if self.param == torch.float32 else \
            "bf16" + ("" if self.weights == "none" else "+" + self.weights)
        return param if self.state == "fp32" else f"{param} {self.state} state"

    @property
    def fp32_state(self):
        """The variant with fp32 state this one is compared with (today's default)."""
        return Variant(self.param, "param" if self.param == torch.float32 else "master", self.states)


def bytes_per_element(variant):
    """Bytes one element moves, read + written: the gradient (read), the param (written; read
    unless an fp32 master holds the weight), the fp32 master (8) or the compensation (2 x the
    param's size), and each moment read and written: fp32 4, bf16 2, int8 1 + 4 / Q (codes and
    absmax). E.g. AdamW: fp32 28, bf16+master 28, bf16+kahan int8 state 14.125, bf16 int8 state
    10.125. The int8 code's 2 KB table is read from L1 and not counted."""
    size = torch.empty((), dtype=variant.param).element_size()
    weights = {"param": 2 * size, "master": size + 8, "kahan": 4 * size, "none": 2 * size}[variant.weights]
    state = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / Q}[variant.state]
    return size + weights + 2 * state * len(variant.states)


def _make_sets(n, device, count, variant, clip=False):
    """`count` independent buffer sets: grad, weights (the fp32 values the torch baselines start
    from), param, master or compensation, and the moments in the variant's format."""
    sets = []
    signed = {"exp_avg": True, "exp_avg_sq": False, "sum": False, "momentum_buffer": True}
    for _ in range(count):
        buffers = {"grad": _random(n, device, variant.param) * 1e-2}
        buffers["weights"] = _random(n, device)
        buffers["param"] = buffers["weights"].to(variant.param)
        if variant.weights == "master":
            buffers["master"] = buffers["weights"]
        elif variant.weights == "kahan":
            buffers["compensation"] = torch.zeros(n, device=device, dtype=variant.param)
        for state in variant.states:
            values = torch.rand(n, device=device) * 1e-4
            if variant.state == "int8":
                buffers[state], buffers[state + "_absmax"] = quantize(values, signed[state])
            else:
                buffers[state] = values.to({"fp32": torch.float32, "bf16": torch.bfloat16}[variant.state])
        if clip:
            # min(1, max_norm / norm) is 1 unless the gradient is too large: the common case,
            # and the torch baseline's in-place multiply then leaves the gradients as they are.
            buffers["clip_coef"] = torch.ones(1, device=device)
        sets.append(buffers)
    return sets


def _adamw(b):
    adamw_update(b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"], step=STEP, lr=LR,
                 weight_decay=0.01, master=b.get("master"), compensation=b.get("compensation"),
                 clip_coef=b.get("clip_coef"), exp_avg_absmax=b.get("exp_avg_absmax"),
                 exp_avg_sq_absmax=b.get("exp_avg_sq_absmax"))


def _adagrad(b):
    adagrad_update(b["param"], b["grad"], b["sum"], step=STEP, lr=LR, master=b.get("master"),
                   compensation=b.get("compensation"), state_sum_absmax=b.get("sum_absmax"))


def _sgd(b):
    sgd_update(b["param"], b["grad"], b["momentum_buffer"], lr=LR, momentum=0.9,
               master=b.get("master"), compensation=b.get("compensation"),
               momentum_buffer_absmax=b.get("momentum_buffer_absmax"))


def _norm(b):
    grad_norm(b["grad"])


def _torch_adagrad(masters):
    return lambda sets: _optimizer_baseline(sets, torch.optim.Adagrad, ("foreach",), masters=masters)


def _torch_sgd(masters):
    return lambda sets: _optimizer_baseline(sets, torch.optim.SGD, ("fused", "foreach"),
                                            masters=masters, momentum=0.9)


def _cases():
    """(kernel, variant, clip, ours, torch baseline or None), fp32-state rows before the compact
    rows that compare with them."""
    f32, bf16, fused = torch.float32, torch.bfloat16, ("fused", "foreach")
    adam = ("exp_avg", "exp_avg_sq")
    cases = [
        ("adamw", Variant(f32, "param", adam), False, _adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, weight_decay=0.01)),
        ("adamw", Variant(f32, "param", adam), True, _adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, clip=True, weight_decay=0.01)),
        ("adamw", Variant(bf16, "master", adam), False, _adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, masters=True, weight_decay=0.01)),
    ]
    for state in ("bf16", "int8"):
        cases.append(("adamw", Variant(f32, "param", adam, state), False, _adamw, None))
        cases += [("adamw", Variant(bf16, weights, adam, state), False, _adamw, None)
                  for weights in ("master", "kahan", "none")]
    for kernel, states, ours, baseline in (("adagrad", ("sum",), _adagrad, _torch_adagrad),
                                           ("sgd-momentum", ("momentum_buffer",), _sgd, _torch_sgd)):
        cases += [
            (kernel, Variant(f32, "param", states), False, ours, baseline(False)),
            (kernel, Variant(bf16, "master", states), False, ours, baseline(True)),
            (kernel, Variant(f32, "param", states, "int8"), False, ours, None),
            (kernel, Variant(bf16, "kahan", states, "int8"), False, ours, None),
        ]
    return cases


def run(elements=None, reps=None, device=None):
    """Measure every row; returns a dict (device, copy_GBps, rows) ready for JSON."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda and _common.TRITON_ON_CPU:
        raise SystemExit("TRITON_INTERPRET=1 sends CPU tensors to Triton's interpreter, which is "
                         "not worth timing: unset it to benchmark the torch path")
    elements = elements or (64 << 20 if cuda else 256 << 10)
    if elements <= 0 or elements % Q != 0:
        raise SystemExit(f"--elements must be a positive multiple of {Q} (int8 blocks), got {elements}")
    reps = reps or (100 if cuda else 20)
    warmup = 10 if cuda else 5

    def time_calls(calls):
        return _timing.median_ms(calls, reps=reps, warmup=warmup, device=device)

    # The copy runs over at least 256 MiB per buffer (64 Mi fp32), whatever --elements says,
    # so that its figure is the device's bandwidth rather than a cache's.
    copy_elements = max(elements, 64 << 20) if cuda else elements
    sources = [_random(copy_elements, device) for _ in range(_timing.buffer_sets(8 * copy_elements))]
    targets = [torch.empty_like(s) for s in sources]
    copy_ms = time_calls([lambda s=s, t=t: t.copy_(s) for s, t in zip(sources, targets)])
    copy_gbps = _timing.gbps(8 * copy_elements, copy_ms)
    del sources, targets
    rows = [Row("copy", "fp32", copy_elements, 8, copy_ms, copy_gbps, 1.0, None, None, None)]

    def measure(kernel, setting, bytes_per_elem, sets, ours, baseline):
        ms = time_calls([lambda b=b: ours(b) for b in sets])
        label, torch_ms = None, None
        if baseline is not None:
            label, torch_calls = baseline(sets)
            torch_ms = time_calls(torch_calls)
            del torch_calls
        speed = _timing.gbps(bytes_per_elem * elements, ms)
        rows.append(Row(kernel, setting, elements, bytes_per_elem, ms, speed, speed / copy_gbps,
                        label, torch_ms, None if torch_ms is None else torch_ms / ms))
        if cuda:
            torch.cuda.empty_cache()

    fp32_ms = {}
    for kernel, variant, clip, ours, baseline in _cases():
        setting = variant.setting + (" clip" if clip else "")
        count = _timing.buffer_sets(bytes_per_element(variant) * elements)
        measure(kernel, setting, bytes_per_element(variant),
                _make_sets(elements, device, count, variant, clip), ours, baseline)
        if variant.state == "fp32" and not clip:
            fp32_ms[kernel, variant] = rows[-1].ms
        else:
            reference = variant.fp32_state
            if variant.state != "fp32":
                rows[-1].fp32_state_setting = reference.setting
                rows[-1].fp32_state_speedup = fp32_ms[kernel, reference] / rows[-1].ms
    for setting, dtype in (("fp32 l2", torch.float32), ("bf16 l2", torch.bfloat16)):
        # Norms read the gradient once.
        variant = Variant(dtype, "none", ())
        sets = _make_sets(elements, device, _timing.buffer_sets(4 * elements), variant)
        measure("grad_norm", setting, torch.empty((), dtype=dtype).element_size(), sets, _norm,
                _norm_baseline)

    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "path": "triton" if cuda else "torch",
        "elements": elements, "reps": reps, "copy_GBps": copy_gbps,
        "rows": [asdict(row) for row in rows],
    }


def _print(result):
    print(f"device {result['device']} ({result['path']} path), torch {result['torch']}, "
          f"triton {result['triton']}, {result['reps']} reps, "
          f"copy {result['copy_GBps']:.0f} GB/s")
    print(f"{'kernel':<13}{'setting':<27}{'elements':>11}{'B/elem':>8}{'ms':>10}{'GB/s':>9}"
          f"{'% copy':>8}{'vs fp32':>9}{'torch ms':>10}{'speed-up':>9}  torch baseline")
    for row in result["rows"]:
        versus = "" if row["fp32_state_speedup"] is None else f"{row['fp32_state_speedup']:.2f}x"
        baseline = "" if row["torch_baseline"] is None else (
            f"{row['torch_ms']:>10.4f}{row['speedup']:>8.2f}x  {row['torch_baseline']}")
        print(f"{row['kernel']:<13}{row['setting']:<27}{row['elements']:>11}"
              f"{row['bytes_per_element']:>8.3f}{row['ms']:>10.4f}{row['GBps']:>9.1f}"
              f"{100 * row['copy_fraction']:>7.1f}%{versus:>9}{baseline}")


def main(args):
    result = run(args.elements, args.reps, args.device)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
