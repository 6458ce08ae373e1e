"""Adagrad update over one flat buffer: one launch, each element read and written once.

Per element i (fp32 math), with g the gradient and w the weight (the fp32 master when given,
otherwise the param loaded as fp32), in the order of torch.optim's single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    g = g + wd * w                                     (i < decay_end)
    s = s + g * g
    w = w - lr / (1 + (step - 1) * lr_decay) * g / (sqrt(s) + eps)

then w is stored, and with a master the param receives w rounded to its dtype. When found_inf is
non-zero nothing is written. Bytes per element: 20 for fp32 (w, s read and written, g read); 20
for bf16/fp16 with master (master, s read and written, g read, param written: 8+8+2+2).
torch.optim.Adagrad's initial_accumulator_value is the caller's initial state_sum.
"""
import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _adagrad_kernel(
    weight_ptr,  # (n,) weights updated in place: the fp32 master, or the param itself
    param_ptr,  # (n,) bf16/fp16 param, written with the rounded master when HAS_MASTER
    grad_ptr,  # (n,) gradient, param's dtype
    state_sum_ptr,  # (n,) fp32 running sum of squared gradients
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    found_inf_ptr,  # 1 fp32 element, non-zero skips the step (read when HAS_FOUND_INF)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    weight_decay,  # the L2 coefficient added to the gradient
    clr,  # lr / (1 + (step - 1) * lr_decay)
    eps,
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    HAS_MASTER: tl.constexpr,  # weights are an fp32 master; without one, no param store
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
    HAS_FOUND_INF: tl.constexpr,  # without a GradScaler, no load of the flag
):
    offsets, mask = _common.live_elements(n, found_inf_ptr, BLOCK, HAS_FOUND_INF)

    weight = tl.load(weight_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    state_sum = tl.load(state_sum_ptr + offsets, mask=mask)

    grad = _common.scaled_gradient(grad, clip_coef_ptr, HAS_CLIP, MAXIMIZE)
    if WEIGHT_DECAY:
        grad = tl.where(offsets < decay_end, grad + weight_decay * weight, grad)

    state_sum = state_sum + grad * grad
    # IEEE-rounded sqrt and division as torch computes them: on NVIDIA GPUs tl.sqrt and `/` are
    # approximate (up to 2 ulp). The kernel is memory-bound, so the extra instructions are free.
    std = tl.sqrt_rn(state_sum) + eps
    weight = weight - tl.div_rn(clr * grad, std)

    tl.store(weight_ptr + offsets, weight.to(weight_ptr.dtype.element_ty), mask=mask)
    tl.store(state_sum_ptr + offsets, state_sum, mask=mask)
    if HAS_MASTER:
        tl.store(param_ptr + offsets, weight.to(param_ptr.dtype.element_ty), mask=mask)


def _launch(weights, param, grad, state_sum, clip_coef, found_inf, decay_end, *,
            weight_decay, clr, eps, maximize):
    """Run _adagrad_kernel over all n elements; `weights` is the master, or param itself."""
    n = param.numel()
    _adagrad_kernel[_common.grid(n)](
        weights, param, grad, state_sum, clip_coef, found_inf,
        n, decay_end, weight_decay, clr, eps,
        BLOCK=_common.BLOCK,
        HAS_MASTER=weights is not param,
        WEIGHT_DECAY=weight_decay != 0.0 and decay_end > 0,
        MAXIMIZE=maximize,
        HAS_CLIP=clip_coef is not None,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=_common.NUM_WARPS,
        enable_fp_fusion=_common.FP_FUSION,
    )


def _torch_path(weights, param, grad, state_sum, clip_coef, found_inf, decay_end, *,
                weight_decay, clr, eps, maximize):
    """The kernel's math in torch ops, fp32, on copies that are committed at the end."""
    weight = weights.to(torch.float32, copy=True)
    g = _common.torch_gradient(grad, clip_coef, maximize)
    state_sum_new = state_sum.clone()
    if weight_decay != 0.0:
        g[:decay_end].add_(weight[:decay_end], alpha=weight_decay)
    state_sum_new.addcmul_(g, g, value=1)
    std = state_sum_new.sqrt().add_(eps)
    weight.addcdiv_(g, std, value=-clr)
    outputs = [(weights, weight), (state_sum, state_sum_new)]
    if weights is not param:
        outputs.append((param, weight))
    _common.commit(outputs, found_inf)


def adagrad_update(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0,
                   eps=1e-10, maximize=False, decay_end=None, master=None, clip_coef=None,
                   found_inf=None):
    """One Adagrad step over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype; state_sum: (n,) fp32.
    step: update count including this one (1 on the first update), for the lr decay.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights for a bf16/fp16 param (rejected for fp32): the update runs
    on master and param receives the rounded result (param is not read).
    clip_coef: 1-element fp32 tensor multiplying the gradient. found_inf: 1-element fp32 tensor;
    non-zero leaves every buffer unchanged. Neither is read on the host.
    Matches torch.optim.Adagrad with foreach=False; the math is in the module docstring.
    """
    _common.check_update_tensors(param, grad, {"state_sum": state_sum}, master, clip_coef,
                                 found_inf)
    _common.check_step(step)
    _common.check_nonnegative(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps)
    decay_end = _common.resolve_decay_end(decay_end, param.numel())
    if param.numel() == 0:
        return
    options = dict(
        weight_decay=float(weight_decay), clr=lr / (1.0 + (step - 1) * lr_decay),
        eps=float(eps), maximize=bool(maximize),
    )
    weights = param if master is None else master
    run = _launch if _common.use_triton(param) else _torch_path
    run(weights, param, grad, state_sum, clip_coef, found_inf, decay_end, **options)


def adagrad_ref(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                maximize=False, decay_end=None, clip_coef=None):
    """Float64 reference of adagrad_update; returns new (param, state_sum), float64.

    The inputs are not modified. For the master variant pass the master as `param` and round
    the result to the param's dtype; a non-zero found_inf returns the inputs unchanged.
    """
    p, g, s = param.double(), grad.double(), state_sum.double()
    n = param.numel()
    decayed = torch.arange(n, device=param.device) < (n if decay_end is None else decay_end)
    if clip_coef is not None:
        g = g * float(clip_coef)
    if maximize:
        g = -g
    if weight_decay:
        g = torch.where(decayed, g + weight_decay * p, g)
    s = s + g * g
    clr = lr / (1 + (step - 1) * lr_decay)
    p = p - clr * g / (s.sqrt() + eps)
    return p, s
