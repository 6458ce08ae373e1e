"""`python -m hift_rt.bench kernels`: update-kernel bandwidth against a device copy and torch.optim.

One row per kernel and dtype setting: elements, bytes moved per element (read + written), median
ms, GB/s, % of the device-to-device copy bandwidth measured in the same run (`dst.copy_(src)`,
read + write counted), and the speed-up over torch's best optimizer for the same number of
elements laid out as a model's tensor list (~70 tensors): fused AdamW, fused SGD with momentum,
foreach Adagrad; where fused is not available the foreach variant runs, and the row says which.
Each timed call rotates to another set of buffers, so that no call finds its inputs in cache.

On CUDA the kernels are the compiled Triton ones. On CPU the torch path runs; the figures only
show that the harness works. The interpreter (TRITON_INTERPRET=1) is a correctness tool, not
something to time: the benchmark refuses to run under it.
"""
import json
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import triton

from ..kernels import _common, adagrad_update, adamw_update, grad_norm, sgd_update
from . import _timing

LR = 1e-4  # small, so that the repeated updates keep the buffers' values ordinary
STEP = 10  # bias corrections need some step; its value does not change the work


@dataclass
class Row:
    kernel: str
    setting: str
    elements: int
    bytes_per_element: int
    ms: float
    GBps: float
    copy_fraction: float  # GBps / the copy's GB/s in the same run
    torch_baseline: Optional[str]  # what the torch figure runs; None for the copy row
    torch_ms: Optional[float]
    speedup: Optional[float]  # torch_ms / ms


def add_arguments(parser):
    parser.add_argument("--elements", type=int, default=None,
                        help="elements per buffer (default: 64 Mi on CUDA, 256 Ki on CPU)")
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


def _make_sets(n, device, count, *, dtype, master, states, clip=False):
    """`count` independent buffer sets: weights (fp32 master or the param), param, grad and the
    named fp32 states; the torch baselines copy these, so both start from the same values."""
    sets = []
    for _ in range(count):
        buffers = {"grad": _random(n, device, dtype) * 1e-2}
        buffers["weights"] = _random(n, device)
        buffers["param"] = buffers["weights"].to(dtype) if master else buffers["weights"]
        for state in states:
            buffers[state] = torch.rand(n, device=device) * 1e-4
        if clip:
            # min(1, max_norm / norm) is 1 unless the gradient is too large: the common case,
            # and the torch baseline's in-place multiply then leaves the gradients as they are.
            buffers["clip_coef"] = torch.ones(1, device=device)
            buffers["found_inf"] = torch.zeros(1, device=device)
        sets.append(buffers)
    return sets


def _set_bytes(n, dtype, master, states):
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return n * (2 * itemsize + 4 * len(states) + (4 if master else 0))


def _cases():
    """(kernel, setting, bytes/element, dtype, master, states, clip, ours, baseline)."""
    def adamw(b):
        adamw_update(b["param"], b["grad"], b["exp_avg"], b["exp_avg_sq"], step=STEP, lr=LR,
                     weight_decay=0.01, master=b["weights"] if b["weights"] is not b["param"]
                     else None, clip_coef=b.get("clip_coef"), found_inf=b.get("found_inf"))

    def adagrad(b):
        adagrad_update(b["param"], b["grad"], b["sum"], step=STEP, lr=LR)

    def sgd(b):
        sgd_update(b["param"], b["grad"], b["momentum_buffer"], lr=LR, momentum=0.9,
                   master=b["weights"] if b["weights"] is not b["param"] else None)

    def norm(b):
        grad_norm(b["grad"])

    adam_states, bf16 = ("exp_avg", "exp_avg_sq"), torch.bfloat16
    fused = ("fused", "foreach")
    return [
        # 28 B: weights read + written (8), grad read (4), m and v read + written (16).
        ("adamw", "fp32", 28, torch.float32, False, adam_states, False, adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, weight_decay=0.01)),
        ("adamw", "fp32 clip+found_inf", 28, torch.float32, False, adam_states, True, adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, clip=True,
                                       weight_decay=0.01)),
        # 28 B: master 8, bf16 grad read 2, m and v 16, bf16 param written 2.
        ("adamw", "bf16+master", 28, bf16, True, adam_states, False, adamw,
         lambda s: _optimizer_baseline(s, torch.optim.AdamW, fused, masters=True,
                                       weight_decay=0.01)),
        # 20 B: weights 8, grad 4, sum 8.
        ("adagrad", "fp32", 20, torch.float32, False, ("sum",), False, adagrad,
         lambda s: _optimizer_baseline(s, torch.optim.Adagrad, ("foreach",))),
        # 20 B: weights 8, grad 4, buffer 8.
        ("sgd-momentum", "fp32", 20, torch.float32, False, ("momentum_buffer",), False, sgd,
         lambda s: _optimizer_baseline(s, torch.optim.SGD, fused, momentum=0.9)),
        # 20 B: master 8, bf16 grad 2, buffer 8, bf16 param written 2.
        ("sgd-momentum", "bf16+master", 20, bf16, True, ("momentum_buffer",), False, sgd,
         lambda s: _optimizer_baseline(s, torch.optim.SGD, fused, masters=True, momentum=0.9)),
        # Norms read the gradient once.
        ("grad_norm", "fp32 l2", 4, torch.float32, False, (), False, norm, _norm_baseline),
        ("grad_norm", "bf16 l2", 2, bf16, False, (), False, norm, _norm_baseline),
    ]


def run(elements=None, reps=None, device=None):
    """Measure every row; returns a dict (device, copy_GBps, rows) ready for JSON."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if not cuda and _common.TRITON_ON_CPU:
        raise SystemExit("TRITON_INTERPRET=1 sends CPU tensors to Triton's interpreter, which is "
                         "not worth timing: unset it to benchmark the torch path")
    elements = elements or (64 << 20 if cuda else 256 << 10)
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

    for kernel, setting, bytes_per_element, dtype, master, states, clip, ours, baseline \
            in _cases():
        count = _timing.buffer_sets(_set_bytes(elements, dtype, master, states))
        sets = _make_sets(elements, device, count, dtype=dtype, master=master, states=states,
                          clip=clip)
        ms = time_calls([lambda b=b: ours(b) for b in sets])
        label, torch_calls = baseline(sets)
        torch_ms = time_calls(torch_calls)
        speed = _timing.gbps(bytes_per_element * elements, ms)
        rows.append(Row(kernel, setting, elements, bytes_per_element, ms, speed,
                        speed / copy_gbps, label, torch_ms, torch_ms / ms))
        del sets, torch_calls
        if cuda:
            torch.cuda.empty_cache()

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
    header = (f"{'kernel':<13}{'setting':<21}{'elements':>11}{'B/elem':>7}{'ms':>10}"
              f"{'GB/s':>9}{'% copy':>8}{'torch ms':>10}{'speed-up':>9}  torch baseline")
    print(header)
    for row in result["rows"]:
        baseline = "" if row["torch_baseline"] is None else (
            f"{row['torch_ms']:>10.4f}{row['speedup']:>8.2f}x  {row['torch_baseline']}")
        print(f"{row['kernel']:<13}{row['setting']:<21}{row['elements']:>11}"
              f"{row['bytes_per_element']:>7}{row['ms']:>10.4f}{row['GBps']:>9.1f}"
              f"{100 * row['copy_fraction']:>7.1f}%{baseline}")


def main(args):
    result = run(args.elements, args.reps, args.device)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
