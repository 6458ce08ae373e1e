"""SGD update (momentum, dampening, Nesterov) over one flat buffer: one launch, each element read
and written once.

Per element i (fp32 math), with g the gradient, w the weight (the fp32 master, param +
compensation, or the param; see _common) and b the momentum buffer read from its format (fp32,
bf16, or int8 codes times their block's absmax; see quantization), in the order of torch.optim's
single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    g = g + wd * w                                     (i < decay_end)
    b = g                                              (momentum, first_step: torch's new buffer)
    b = momentum * b + (1 - dampening) * g             (momentum, later steps)
    g = g + momentum * b                               (nesterov)
    g = b                                              (momentum, not nesterov)
    w = w - lr * g

then w and b are stored in their formats; the update itself uses the unrounded fp32 b. Bytes per
element (read + written) with momentum, bf16 param and grad: buffer fp32 8, bf16 4, int8 2 +
1/16; weights fp32 master 10, kahan 8, none 4; grad 2. An fp32 param: weights 8, grad 4 (fp32
buffer: 20). The first step does not read the buffer, and without momentum there is no buffer.
"""
import torch
import triton
import triton.language as tl

from . import _common, quantization


@triton.jit
def _sgd_kernel(
    param_ptr,  # (n,) param, fp32/bf16/fp16: written, read unless WEIGHTS is MASTER
    master_ptr,  # (n,) fp32 master weights (WEIGHTS == MASTER)
    compensation_ptr,  # (n,) param's dtype, the rounding error of param (WEIGHTS == KAHAN)
    grad_ptr,  # (n,) gradient, param's dtype
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    codebook_ptr,  # (512,) fp32, the int8 code's values (read when QUANTIZED)
    momentum_buffer_ptr,  # (n,) momentum buffer: fp32, bf16, or uint8 codes (when MOMENTUM)
    momentum_buffer_absmax_ptr,  # (n / Q,) fp32 block absmax of the buffer (QUANTIZED)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    weight_decay,  # the L2 coefficient added to the gradient
    lr,
    momentum,
    one_minus_dampening,  # the gradient's weight in the buffer update
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    Q: tl.constexpr,  # elements per row of the tile, one int8 absmax block
    WEIGHTS: tl.constexpr,  # PARAM, MASTER or KAHAN (_common): which buffers hold the weight
    QUANTIZED: tl.constexpr,  # int8 state: decode and encode, absmax per row
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
    MOMENTUM: tl.constexpr,  # plain SGD has no buffer to load or store
    FIRST_STEP: tl.constexpr,  # the buffer is initialized to the gradient: written, not read
    NESTEROV: tl.constexpr,  # step along g + momentum * b instead of b
):
    rows, offsets, mask, weight, grad = _common.load_inputs(
        param_ptr, master_ptr, compensation_ptr, grad_ptr, clip_coef_ptr, n, BLOCK, Q, WEIGHTS,
        HAS_CLIP, MAXIMIZE)

    if WEIGHT_DECAY:
        grad = tl.where(offsets < decay_end, grad + weight_decay * weight, grad)

    if MOMENTUM:
        if FIRST_STEP:
            buffer = grad
        else:
            buffer = quantization.load_state(momentum_buffer_ptr, momentum_buffer_absmax_ptr,
                                             codebook_ptr, rows, offsets, mask, n, Q, QUANTIZED,
                                             True)
            buffer = buffer * momentum + one_minus_dampening * grad
        quantization.store_state(buffer, momentum_buffer_ptr, momentum_buffer_absmax_ptr, rows,
                                 offsets, mask, n, Q, QUANTIZED, True)
        if NESTEROV:
            grad = grad + momentum * buffer
        else:
            grad = buffer

    weight = weight - lr * grad
    _common.store_weight(weight, param_ptr, master_ptr, compensation_ptr, offsets, mask, WEIGHTS)


def _torch_path(call, *, lr, momentum, one_minus_dampening, MOMENTUM, FIRST_STEP, NESTEROV):
    """The kernel's math in torch ops, fp32."""
    weight, g = call.load_weight(), call.load_gradient()
    if call.weight_decay != 0.0:
        g[:call.decay_end].add_(weight[:call.decay_end], alpha=call.weight_decay)
    if MOMENTUM:
        (state,) = call.states
        if FIRST_STEP:
            buffer = g.clone()
        else:
            buffer = state.load().mul_(momentum).add_(g, alpha=one_minus_dampening)
        state.store(buffer)
        g = g.add(buffer, alpha=momentum) if NESTEROV else buffer
    weight.add_(g, alpha=-lr)
    call.store_weight(weight)


def sgd_update(param, grad, momentum_buffer, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
               weight_decay=0.0, maximize=False, first_step=False, decay_end=None, master=None,
               compensation=None, clip_coef=None, momentum_buffer_absmax=None):
    """One SGD step over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype.
    momentum_buffer: (n,) fp32, bf16, or uint8 int8-codes (signed code), then with
    momentum_buffer_absmax (n / Q,) fp32 (n a multiple of quantization.Q); None when
    momentum == 0 (a given buffer is then left alone).
    first_step: initialize the buffer to the gradient, as torch does when it has no buffer yet;
    the buffer's old contents are not read.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights, or compensation: (n,) of param's dtype (Kahan), only for
    a bf16/fp16 param; with neither the param is updated in its own precision (see _common).
    clip_coef: 1-element fp32 tensor multiplying the gradient, read on the device only.
    Matches torch.optim.SGD with foreach=False for fp32 state; the math is in the module
    docstring.
    """
    _common.check_nonnegative(lr=lr, momentum=momentum)
    if momentum != 0.0 and momentum_buffer is None:
        raise ValueError("momentum_buffer: required when momentum != 0")
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov: requires momentum != 0 and dampening == 0")
    used = momentum != 0.0  # without momentum the buffer is absent (values None)
    buffer = quantization.StateBuffer("momentum_buffer", momentum_buffer if used else None,
                                      momentum_buffer_absmax if used else None, True)
    call = _common.Update(param, grad, [buffer], master=master, compensation=compensation,
                          clip_coef=clip_coef, decay_end=decay_end, weight_decay=weight_decay,
                          maximize=maximize)
    scalars = dict(lr=float(lr), momentum=float(momentum), one_minus_dampening=1.0 - dampening)
    call.run(_sgd_kernel, _torch_path, scalars, MOMENTUM=used,
             FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov))


def sgd_ref(param, grad, momentum_buffer, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
            weight_decay=0.0, maximize=False, first_step=False, decay_end=None, clip_coef=None):
    """Float64 reference of sgd_update; returns new (weight, momentum_buffer), float64, before
    any rounding to a param dtype or a state format (the buffer is None when momentum == 0).

    The inputs are not modified. Pass the weight as `param` (the master, or param +
    compensation) and the buffer's values (dequantized for int8).
    """
    p, g = param.double(), grad.double()
    n = param.numel()
    decayed = torch.arange(n, device=param.device) < (n if decay_end is None else decay_end)
    if clip_coef is not None:
        g = g * float(clip_coef)
    if maximize:
        g = -g
    if weight_decay:
        g = torch.where(decayed, g + weight_decay * p, g)
    b = None
    if momentum:
        b = g if first_step else momentum * momentum_buffer.double() + (1 - dampening) * g
        g = g + momentum * b if nesterov else b
    p = p - lr * g
    return p, b
