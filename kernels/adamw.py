"""AdamW / Adam update over one flat buffer: one launch, each element read and written once.

Per element i (fp32 math), with g the gradient and w the weight (the fp32 master when given,
otherwise the param loaded as fp32), in the order of torch.optim's single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    w = w * (1 - lr * wd)                              (decoupled, i < decay_end)
    g = g + wd * w                                     (not decoupled: Adam's L2, i < decay_end)
    m = m + (1 - beta1) * (g - m)                      (torch's lerp_)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

then w is stored, and with a master the param receives w rounded to its dtype. When found_inf is
non-zero nothing is written. Bytes per element: 28 for fp32 (w, m, v read and written, g read);
28 for bf16/fp16 with master (master, m, v read and written, g read, param written: 8+8+8+2+2).
"""
import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _adamw_kernel(
    weight_ptr,  # (n,) weights updated in place: the fp32 master, or the param itself
    param_ptr,  # (n,) bf16/fp16 param, written with the rounded master when HAS_MASTER
    grad_ptr,  # (n,) gradient, param's dtype
    exp_avg_ptr,  # (n,) fp32 first moment
    exp_avg_sq_ptr,  # (n,) fp32 second moment
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    found_inf_ptr,  # 1 fp32 element, non-zero skips the step (read when HAS_FOUND_INF)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    decay_factor,  # 1 - lr * weight_decay, the decoupled weight factor
    weight_decay,  # the L2 coefficient added to the gradient when not decoupled
    one_minus_beta1,  # lerp weight of the first moment
    beta2,
    one_minus_beta2,
    step_size,  # lr / (1 - beta1^step)
    bias_correction2_sqrt,  # sqrt(1 - beta2^step)
    eps,
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    HAS_MASTER: tl.constexpr,  # weights are an fp32 master; without one, no param store
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    DECOUPLED: tl.constexpr,  # AdamW (decay the weights) or Adam (L2 on the gradient)
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
    HAS_FOUND_INF: tl.constexpr,  # without a GradScaler, no load of the flag
):
    offsets, mask = _common.live_elements(n, found_inf_ptr, BLOCK, HAS_FOUND_INF)

    weight = tl.load(weight_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)

    grad = _common.scaled_gradient(grad, clip_coef_ptr, HAS_CLIP, MAXIMIZE)
    if WEIGHT_DECAY:
        decayed = offsets < decay_end
        if DECOUPLED:
            weight = tl.where(decayed, weight * decay_factor, weight)
        else:
            grad = tl.where(decayed, grad + weight_decay * weight, grad)

    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    # IEEE-rounded sqrt and division as torch computes them: on NVIDIA GPUs tl.sqrt and `/` are
    # approximate (up to 2 ulp). The kernel is memory-bound, so the extra instructions are free.
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    weight = weight - tl.div_rn(step_size * exp_avg, denom)

    tl.store(weight_ptr + offsets, weight.to(weight_ptr.dtype.element_ty), mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    if HAS_MASTER:
        tl.store(param_ptr + offsets, weight.to(param_ptr.dtype.element_ty), mask=mask)


def _launch(weights, param, grad, exp_avg, exp_avg_sq, clip_coef, found_inf, decay_end, *,
            lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
            bias_correction2_sqrt):
    """Run _adamw_kernel over all n elements; `weights` is the master, or param itself."""
    n = param.numel()
    _adamw_kernel[_common.grid(n)](
        weights, param, grad, exp_avg, exp_avg_sq, clip_coef, found_inf,
        n, decay_end, 1.0 - lr * weight_decay, weight_decay, 1.0 - beta1, beta2, 1.0 - beta2,
        step_size, bias_correction2_sqrt, eps,
        BLOCK=_common.BLOCK,
        HAS_MASTER=weights is not param,
        WEIGHT_DECAY=weight_decay != 0.0 and decay_end > 0,
        DECOUPLED=decoupled,
        MAXIMIZE=maximize,
        HAS_CLIP=clip_coef is not None,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=_common.NUM_WARPS,
        enable_fp_fusion=_common.FP_FUSION,
    )


def _torch_path(weights, param, grad, exp_avg, exp_avg_sq, clip_coef, found_inf, decay_end, *,
                lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
                bias_correction2_sqrt):
    """The kernel's math in torch ops, fp32, on copies that are committed at the end."""
    weight = weights.to(torch.float32, copy=True)
    g = _common.torch_gradient(grad, clip_coef, maximize)
    exp_avg_new = exp_avg.clone()
    exp_avg_sq_new = exp_avg_sq.clone()
    if weight_decay != 0.0:
        if decoupled:
            weight[:decay_end].mul_(1.0 - lr * weight_decay)
        else:
            g[:decay_end].add_(weight[:decay_end], alpha=weight_decay)
    exp_avg_new.lerp_(g, 1.0 - beta1)
    exp_avg_sq_new.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq_new.sqrt() / bias_correction2_sqrt).add_(eps)
    weight.addcdiv_(exp_avg_new, denom, value=-step_size)
    outputs = [(weights, weight), (exp_avg, exp_avg_new), (exp_avg_sq, exp_avg_sq_new)]
    if weights is not param:
        outputs.append((param, weight))
    _common.commit(outputs, found_inf)


def adamw_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decoupled=True, maximize=False, decay_end=None,
                 master=None, clip_coef=None, found_inf=None):
    """One AdamW step (Adam with L2 when decoupled=False) over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype; exp_avg, exp_avg_sq: (n,) fp32.
    step: update count including this one (1 on the first update), for the bias corrections.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights for a bf16/fp16 param (rejected for fp32): the update runs
    on master and param receives the rounded result (param is not read).
    clip_coef: 1-element fp32 tensor multiplying the gradient. found_inf: 1-element fp32 tensor;
    non-zero leaves every buffer unchanged. Neither is read on the host.
    Matches torch.optim.AdamW (decoupled=True) or torch.optim.Adam (decoupled=False) with
    foreach=False, amsgrad=False; the math is in the module docstring.
    """
    _common.check_update_tensors(param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
                                 master, clip_coef, found_inf)
    _common.check_step(step)
    _common.check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas: each must be in [0, 1), got {betas}")
    decay_end = _common.resolve_decay_end(decay_end, param.numel())
    if param.numel() == 0:
        return
    beta1, beta2 = float(betas[0]), float(betas[1])
    options = dict(
        lr=float(lr), beta1=beta1, beta2=beta2, eps=float(eps),
        weight_decay=float(weight_decay), decoupled=bool(decoupled), maximize=bool(maximize),
        step_size=lr / (1.0 - beta1**step),
        bias_correction2_sqrt=(1.0 - beta2**step) ** 0.5,
    )
    weights = param if master is None else master
    run = _launch if _common.use_triton(param) else _torch_path
    run(weights, param, grad, exp_avg, exp_avg_sq, clip_coef, found_inf, decay_end, **options)


def adamw_ref(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, decoupled=True, maximize=False, decay_end=None, clip_coef=None):
    """Float64 reference of adamw_update; returns new (param, exp_avg, exp_avg_sq), float64.

    The inputs are not modified. For the master variant pass the master as `param` and round
    the result to the param's dtype; a non-zero found_inf returns the inputs unchanged.
    """
    p, g = param.double(), grad.double()
    m, v = exp_avg.double(), exp_avg_sq.double()
    beta1, beta2 = betas
    n = param.numel()
    decayed = torch.arange(n, device=param.device) < (n if decay_end is None else decay_end)
    if clip_coef is not None:
        g = g * float(clip_coef)
    if maximize:
        g = -g
    if weight_decay and decoupled:
        p = torch.where(decayed, p * (1 - lr * weight_decay), p)
    elif weight_decay:
        g = torch.where(decayed, g + weight_decay * p, g)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    # torch adds eps to sqrt(v) / sqrt(1 - beta2^step), i.e. to sqrt(v_hat).
    p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p, m, v
