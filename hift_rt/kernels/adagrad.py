"""Adagrad update over one flat buffer: one launch, each element read and written once.

Per element i (fp32 math), with g the gradient, w the weight (the fp32 master, param +
compensation, or the param; see _common) and s the running sum read from its format (fp32, bf16,
or int8 codes times their block's absmax; see quantization), in the order of torch.optim's
single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    g = g + wd * w                                     (i < decay_end)
    s = s + g * g
    w = w - lr / (1 + (step - 1) * lr_decay) * g / (sqrt(s) + eps)

then w and s are stored in their formats; the update itself uses the unrounded fp32 s. Bytes per
element (read + written), bf16 param and grad: sum fp32 8, bf16 4, int8 2 + 1/16; weights fp32
master 10, kahan 8, none 4; grad 2. An fp32 param: weights 8, grad 4 (fp32 sum: 20).
torch.optim.Adagrad's initial_accumulator_value is the caller's initial state_sum.
"""
import torch
import triton
import triton.language as tl

from . import _common, quantization


@triton.jit
def _adagrad_kernel(
    param_ptr,  # (n,) param, fp32/bf16/fp16: written, read unless WEIGHTS is MASTER
    master_ptr,  # (n,) fp32 master weights (WEIGHTS == MASTER)
    compensation_ptr,  # (n,) param's dtype, the rounding error of param (WEIGHTS == KAHAN)
    grad_ptr,  # (n,) gradient, param's dtype
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    codebook_ptr,  # (512,) fp32, the int8 code's values (read when QUANTIZED)
    state_sum_ptr,  # (n,) running sum of squared gradients: fp32, bf16, or uint8 codes
    state_sum_absmax_ptr,  # (n / Q,) fp32 block absmax of the sum (QUANTIZED)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    weight_decay,  # the L2 coefficient added to the gradient
    clr,  # lr / (1 + (step - 1) * lr_decay)
    eps,
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    Q: tl.constexpr,  # elements per row of the tile, one int8 absmax block
    WEIGHTS: tl.constexpr,  # PARAM, MASTER or KAHAN (_common): which buffers hold the weight
    QUANTIZED: tl.constexpr,  # int8 state: decode and encode, absmax per row
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
):
    rows, offsets, mask, weight, grad = _common.load_inputs(
        param_ptr, master_ptr, compensation_ptr, grad_ptr, clip_coef_ptr, n, BLOCK, Q, WEIGHTS,
        HAS_CLIP, MAXIMIZE)
    state_sum = quantization.load_state(state_sum_ptr, state_sum_absmax_ptr, codebook_ptr, rows,
                                        offsets, mask, n, Q, QUANTIZED, False)

    if WEIGHT_DECAY:
        grad = tl.where(offsets < decay_end, grad + weight_decay * weight, grad)

    state_sum = state_sum + grad * grad
    # IEEE-rounded sqrt and division as torch computes them: on NVIDIA GPUs tl.sqrt and `/` are
    # approximate (up to 2 ulp). The kernel is memory-bound, so the extra instructions are free.
    std = tl.sqrt_rn(state_sum) + eps
    weight = weight - tl.div_rn(clr * grad, std)

    _common.store_weight(weight, param_ptr, master_ptr, compensation_ptr, offsets, mask, WEIGHTS)
    quantization.store_state(state_sum, state_sum_ptr, state_sum_absmax_ptr, rows, offsets, mask,
                             n, Q, QUANTIZED, False)


def _torch_path(call, *, clr, eps):
    """The kernel's math in torch ops, fp32."""
    weight, g = call.load_weight(), call.load_gradient()
    (state,) = call.states
    state_sum = state.load()
    if call.weight_decay != 0.0:
        g[:call.decay_end].add_(weight[:call.decay_end], alpha=call.weight_decay)
    state_sum.addcmul_(g, g, value=1)
    std = state_sum.sqrt().add_(eps)
    weight.addcdiv_(g, std, value=-clr)
    call.store_weight(weight)
    state.store(state_sum)


def adagrad_update(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0,
                   eps=1e-10, maximize=False, decay_end=None, master=None, compensation=None,
                   clip_coef=None, state_sum_absmax=None):
    """One Adagrad step over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype.
    state_sum: (n,) fp32, bf16, or uint8 int8-codes (unsigned code), then with
    state_sum_absmax (n / Q,) fp32 (n a multiple of quantization.Q).
    step: update count including this one (1 on the first update), for the lr decay.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights, or compensation: (n,) of param's dtype (Kahan), only for
    a bf16/fp16 param; with neither the param is updated in its own precision (see _common).
    clip_coef: 1-element fp32 tensor multiplying the gradient, read on the device only.
    Matches torch.optim.Adagrad with foreach=False for fp32 state; the math is in the module
    docstring.
    """
    call = _common.Update(
        param, grad, [quantization.StateBuffer("state_sum", state_sum, state_sum_absmax, False)],
        master=master, compensation=compensation, clip_coef=clip_coef, decay_end=decay_end,
        weight_decay=weight_decay, maximize=maximize)
    _common.check_step(step)
    _common.check_nonnegative(lr=lr, lr_decay=lr_decay, eps=eps)
    scalars = dict(clr=lr / (1.0 + (step - 1) * lr_decay), eps=float(eps))
    call.run(_adagrad_kernel, _torch_path, scalars)


def adagrad_ref(param, grad, state_sum, *, step, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                maximize=False, decay_end=None, clip_coef=None):
    """Float64 reference of adagrad_update; returns new (weight, state_sum), float64, before any
    rounding to a param dtype or a state format.

    The inputs are not modified. Pass the weight as `param` (the master, or param +
    compensation) and the sum's values (dequantized for int8).
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
