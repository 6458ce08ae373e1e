"""SGD update (momentum, dampening, Nesterov) over one flat buffer: one launch, each element read
and written once.

Per element i (fp32 math), with g the gradient and w the weight (the fp32 master when given,
otherwise the param loaded as fp32), in the order of torch.optim's single-tensor loop:

    g = g * clip_coef                                  (when clip_coef is given)
    g = -g                                             (maximize)
    g = g + wd * w                                     (i < decay_end)
    b = g                                              (momentum, first_step: torch's new buffer)
    b = momentum * b + (1 - dampening) * g             (momentum, later steps)
    g = g + momentum * b                               (nesterov)
    g = b                                              (momentum, not nesterov)
    w = w - lr * g

then w is stored, and with a master the param receives w rounded to its dtype. When found_inf is
non-zero nothing is written. Bytes per element with momentum: 20 for fp32 (w, b read and
written, g read); 20 for bf16/fp16 with master (master, b read and written, g read, param
written: 8+8+2+2). The first step does not read the buffer (4 bytes fewer), and without momentum
there is no buffer (12 bytes for fp32).
"""
import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _sgd_kernel(
    weight_ptr,  # (n,) weights updated in place: the fp32 master, or the param itself
    param_ptr,  # (n,) bf16/fp16 param, written with the rounded master when HAS_MASTER
    grad_ptr,  # (n,) gradient, param's dtype
    momentum_buffer_ptr,  # (n,) fp32 momentum buffer (used when MOMENTUM)
    clip_coef_ptr,  # 1 fp32 element, the gradient's factor (read when HAS_CLIP)
    found_inf_ptr,  # 1 fp32 element, non-zero skips the step (read when HAS_FOUND_INF)
    n,  # number of elements
    decay_end,  # elements [0, decay_end) get weight decay
    weight_decay,  # the L2 coefficient added to the gradient
    lr,
    momentum,
    one_minus_dampening,  # the gradient's weight in the buffer update
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    HAS_MASTER: tl.constexpr,  # weights are an fp32 master; without one, no param store
    WEIGHT_DECAY: tl.constexpr,  # off when weight_decay or decay_end is 0: no compare, no select
    MOMENTUM: tl.constexpr,  # plain SGD has no buffer to load or store
    FIRST_STEP: tl.constexpr,  # the buffer is initialized to the gradient: written, not read
    NESTEROV: tl.constexpr,  # step along g + momentum * b instead of b
    MAXIMIZE: tl.constexpr,  # ascend: negate the gradient
    HAS_CLIP: tl.constexpr,  # without clipping, no load and no multiply
    HAS_FOUND_INF: tl.constexpr,  # without a GradScaler, no load of the flag
):
    offsets, mask = _common.live_elements(n, found_inf_ptr, BLOCK, HAS_FOUND_INF)

    weight = tl.load(weight_ptr + offsets, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)

    grad = _common.scaled_gradient(grad, clip_coef_ptr, HAS_CLIP, MAXIMIZE)
    if WEIGHT_DECAY:
        grad = tl.where(offsets < decay_end, grad + weight_decay * weight, grad)

    if MOMENTUM:
        if FIRST_STEP:
            buffer = grad
        else:
            buffer = tl.load(momentum_buffer_ptr + offsets, mask=mask)
            buffer = buffer * momentum + one_minus_dampening * grad
        tl.store(momentum_buffer_ptr + offsets, buffer, mask=mask)
        if NESTEROV:
            grad = grad + momentum * buffer
        else:
            grad = buffer

    weight = weight - lr * grad

    tl.store(weight_ptr + offsets, weight.to(weight_ptr.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(param_ptr + offsets, weight.to(param_ptr.dtype.element_ty), mask=mask)


def _launch(weights, param, grad, momentum_buffer, clip_coef, found_inf, decay_end, *,
            lr, momentum, dampening, nesterov, weight_decay, maximize, first_step):
    """Run _sgd_kernel over all n elements; `weights` is the master, or param itself."""
    n = param.numel()
    _sgd_kernel[_common.grid(n)](
        weights, param, grad, momentum_buffer, clip_coef, found_inf,
        n, decay_end, weight_decay, lr, momentum, 1.0 - dampening,
        BLOCK=_common.BLOCK,
        HAS_MASTER=weights is not param,
        WEIGHT_DECAY=weight_decay != 0.0 and decay_end > 0,
        MOMENTUM=momentum != 0.0,
        FIRST_STEP=first_step,
        NESTEROV=nesterov,
        MAXIMIZE=maximize,
        HAS_CLIP=clip_coef is not None,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=_common.NUM_WARPS,
        enable_fp_fusion=_common.FP_FUSION,
    )


def _torch_path(weights, param, grad, momentum_buffer, clip_coef, found_inf, decay_end, *,
                lr, momentum, dampening, nesterov, weight_decay, maximize, first_step):
    """The kernel's math in torch ops, fp32, on copies that are committed at the end."""
    weight = weights.to(torch.float32, copy=True)
    g = _common.torch_gradient(grad, clip_coef, maximize)
    if weight_decay != 0.0:
        g[:decay_end].add_(weight[:decay_end], alpha=weight_decay)
    outputs = [(weights, weight)]
    if momentum != 0.0:
        if first_step:
            buffer = g.clone()
        else:
            buffer = momentum_buffer.clone().mul_(momentum).add_(g, alpha=1.0 - dampening)
        outputs.append((momentum_buffer, buffer))
        if nesterov:
            g = g.add(buffer, alpha=momentum)
        else:
            g = buffer
    weight.add_(g, alpha=-lr)
    if weights is not param:
        outputs.append((param, weight))
    _common.commit(outputs, found_inf)


def sgd_update(param, grad, momentum_buffer, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
               weight_decay=0.0, maximize=False, first_step=False, decay_end=None, master=None,
               clip_coef=None, found_inf=None):
    """One SGD step over a flat buffer, in place.

    param: (n,) fp32, bf16 or fp16; grad: (n,) same dtype; momentum_buffer: (n,) fp32, or None
    when momentum == 0 (a given buffer is then left alone).
    first_step: initialize the buffer to the gradient, as torch does when it has no buffer yet;
    the buffer's old contents are not read.
    decay_end: weight decay applies to elements [0, decay_end) only; None means all n.
    master: (n,) fp32 master weights for a bf16/fp16 param (rejected for fp32): the update runs
    on master and param receives the rounded result (param is not read).
    clip_coef: 1-element fp32 tensor multiplying the gradient. found_inf: 1-element fp32 tensor;
    non-zero leaves every buffer unchanged. Neither is read on the host.
    Matches torch.optim.SGD with foreach=False; the math is in the module docstring.
    """
    states = {} if momentum_buffer is None else {"momentum_buffer": momentum_buffer}
    _common.check_update_tensors(param, grad, states, master, clip_coef, found_inf)
    _common.check_nonnegative(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if momentum != 0.0 and momentum_buffer is None:
        raise ValueError("momentum_buffer: required when momentum != 0")
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov: requires momentum != 0 and dampening == 0")
    decay_end = _common.resolve_decay_end(decay_end, param.numel())
    if param.numel() == 0:
        return
    options = dict(
        lr=float(lr), momentum=float(momentum), dampening=float(dampening),
        nesterov=bool(nesterov), weight_decay=float(weight_decay), maximize=bool(maximize),
        first_step=bool(first_step),
    )
    weights = param if master is None else master
    run = _launch if _common.use_triton(param) else _torch_path
    run(weights, param, grad, momentum_buffer, clip_coef, found_inf, decay_end, **options)


def sgd_ref(param, grad, momentum_buffer, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
            weight_decay=0.0, maximize=False, first_step=False, decay_end=None, clip_coef=None):
    """Float64 reference of sgd_update; returns new (param, momentum_buffer), float64 (the
    buffer is None when momentum == 0).

    The inputs are not modified. For the master variant pass the master as `param` and round
    the result to the param's dtype; a non-zero found_inf returns the inputs unchanged.
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
