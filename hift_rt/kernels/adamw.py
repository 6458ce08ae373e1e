"""AdamW / Adam update over one flat buffer: one launch, each element read and written once.

Per element i (fp32 math), with g the gradient, w the weight (the fp32 master, param +
compensation, or the param; see _common) and m, v the moments read from their format (fp32,
bf16, or int8 codes times their block's absmax; see quantization), in the order of torch.optim's
single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    w = w * (1 - lr * wd)                              (decoupled, i < decay_end)
    g = g + wd * w                                     (not decoupled: Adam's L2, i < decay_end)
    m = m + (1 - beta1) * (g - m)                      (torch's lerp_)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

then w, m and v are stored in their formats; the update itself uses the unrounded fp32 m and v.
Bytes per element (read + written), bf16 param and grad: state fp32 16, bf16 8, int8 4 + 1/8
(codes and absmax); weights fp32 master 8 + 2 (master, param written), kahan 4 + 4 (param and
compensation), none 4; grad 2. E.g. fp32 state + master 28, int8 + kahan 14.125. An fp32 param:
weights 8, grad 4.
"""
import torch
import triton
import triton.language as tl

from . import _common, quantization


@triton.jit
def _adamw_kernel(
    param_ptr,  # (n,) param, fp32/bf16/fp16: written, read unless WEIGHTS is MASTER
    master_ptr,  # (n,) fp32 master weights (WEIGHTS == MASTER)
    compensation_ptr,  # (n,) param's dtype, the rounding error of param (WEIGHTS == KAHAN)
    grad_ptr,  # (n,) gradient, param's dtype
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    codebook_ptr,  # (512,) fp32, the int8 code's values (read when QUANTIZED)
    exp_avg_ptr,  # (n,) first moment: fp32, bf16, or uint8 codes
    exp_avg_absmax_ptr,  # (n / Q,) fp32 block absmax of the first moment (QUANTIZED)
    exp_avg_sq_ptr,  # (n,) second moment, exp_avg's format
    exp_avg_sq_absmax_ptr,  # (n / Q,) fp32 block absmax of the second moment (QUANTIZED)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    weight_decay,  # the L2 coefficient added to the gradient when not decoupled
    decay_factor,  # 1 - lr * weight_decay, the decoupled weight factor
    one_minus_beta1,  # lerp weight of the first moment
    beta2,
    one_minus_beta2,
    step_size,  # lr / (1 - beta1^step)
    bias_correction2_sqrt,  # sqrt(1 - beta2^step)
    eps,
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    Q: tl.constexpr,  # elements per row of the tile, one int8 absmax block
    WEIGHTS: tl.constexpr,  # PARAM, MASTER or KAHAN (_common): which buffers hold the weight
    QUANTIZED: tl.constexpr,  # int8 state: decode and encode, absmax per row
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
    DECOUPLED: tl.constexpr,  # AdamW (decay the weights) or Adam (L2 on the gradient)
):
    rows, offsets, mask, weight, grad = _common.load_inputs(
        param_ptr, master_ptr, compensation_ptr, grad_ptr, clip_coef_ptr, n, BLOCK, Q, WEIGHTS,
        HAS_CLIP, MAXIMIZE)
    exp_avg = quantization.load_state(exp_avg_ptr, exp_avg_absmax_ptr, codebook_ptr, rows,
                                      offsets, mask, n, Q, QUANTIZED, True)
    exp_avg_sq = quantization.load_state(exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, codebook_ptr,
                                         rows, offsets, mask, n, Q, QUANTIZED, False)

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

    _common.store_weight(weight, param_ptr, master_ptr, compensation_ptr, offsets, mask, WEIGHTS)
    quantization.store_state(exp_avg, exp_avg_ptr, exp_avg_absmax_ptr, rows, offsets, mask, n,
                             Q, QUANTIZED, True)
    quantization.store_state(exp_avg_sq, exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, rows, offsets,
                             mask, n, Q, QUANTIZED, False)


def _torch_path(call, *, decay_factor, one_minus_beta1, beta2, one_minus_beta2, step_size,
                bias_correction2_sqrt, eps, DECOUPLED):
    """The kernel's math in torch ops, fp32."""
    weight, g = call.load_weight(), call.load_gradient()
    exp_avg_state, exp_avg_sq_state = call.states
    exp_avg, exp_avg_sq = exp_avg_state.load(), exp_avg_sq_state.load()
    decayed = slice(0, call.decay_end)
    if call.weight_decay != 0.0:
        if DECOUPLED:
            weight[decayed].mul_(decay_factor)
        else:
            g[decayed].add_(weight[decayed], alpha=call.weight_decay)
    exp_avg.lerp_(g, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    weight.addcdiv_(exp_avg, denom, value=-step_size)
    call.store_weight(weight)
    exp_avg_state.store(exp_avg)
    exp_avg_sq_state.store(exp_avg_sq)


def adamw_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decoupled=True, maximize=False, decay_end=None,
                 master=None, compensation=None, clip_coef=None, exp_avg_absmax=None,
                 exp_avg_sq_absmax=None):
    """One AdamW step (Adam with L2 when decoupled=False) over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype.
    exp_avg, exp_avg_sq: (n,) in one format: fp32, bf16, or uint8 int8-codes, then with
    exp_avg_absmax, exp_avg_sq_absmax (n / Q,) fp32 (n a multiple of quantization.Q; the first
    moment has the signed code, the second the unsigned one).
    step: update count including this one (1 on the first update), for the bias corrections.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights, or compensation: (n,) of param's dtype (Kahan), only for
    a bf16/fp16 param; with neither the param is updated in its own precision (see _common).
    clip_coef: 1-element fp32 tensor multiplying the gradient, read on the device only.
    Matches torch.optim.AdamW (decoupled=True) or torch.optim.Adam (decoupled=False) with
    foreach=False, amsgrad=False for fp32 state; the math is in the module docstring.
    """
    call = _common.Update(
        param, grad, [quantization.StateBuffer("exp_avg", exp_avg, exp_avg_absmax, True),
                      quantization.StateBuffer("exp_avg_sq", exp_avg_sq, exp_avg_sq_absmax, False)],
        master=master, compensation=compensation, clip_coef=clip_coef, decay_end=decay_end,
        weight_decay=weight_decay, maximize=maximize)
    _common.check_step(step)
    _common.check_nonnegative(lr=lr, eps=eps)
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas: each must be in [0, 1), got {betas}")
    beta1, beta2 = float(betas[0]), float(betas[1])
    scalars = dict(
        decay_factor=1.0 - lr * weight_decay, one_minus_beta1=1.0 - beta1, beta2=beta2,
        one_minus_beta2=1.0 - beta2, step_size=lr / (1.0 - beta1**step),
        bias_correction2_sqrt=(1.0 - beta2**step) ** 0.5, eps=float(eps),
    )
    call.run(_adamw_kernel, _torch_path, scalars, DECOUPLED=bool(decoupled))


def adamw_ref(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, decoupled=True, maximize=False, decay_end=None, clip_coef=None):
    """Float64 reference of adamw_update; returns new (weight, exp_avg, exp_avg_sq), float64,
    before any rounding to a param dtype or a state format.

    The inputs are not modified. Pass the weight as `param` (the master, or param +
    compensation) and the moments' values (dequantized for int8).
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
