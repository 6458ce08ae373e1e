"""What the kernel families share: launch parameters, dispatch and argument validation.

Dispatch. A CUDA tensor runs the Triton kernel, compiled. A CPU tensor runs the family's torch
path (the same fp32 math in plain torch ops), unless `TRITON_INTERPRET=1` was in the environment
when this module was imported: then CPU tensors run the Triton kernels in Triton's interpreter,
which is how the CPU test suite checks the Triton code. The variable is read once, at import,
because Triton reads it at the same moment (when `@triton.jit` decorates a kernel): reading it
later could send CPU tensors to kernels that were built for the GPU. Tests pick the path for CPU
tensors by setting `TRITON_ON_CPU`.
"""
import numbers
import os

import torch
import triton
import triton.language as tl

# Elements per Triton program and warps per program for the elementwise update kernels and the
# norm's partial sums. A flat fp32 AdamW with 1024 / 4 reached 4255 GB/s on an H200, the measured
# copy bandwidth (4241 GB/s); 2048 / 8 and 4096 / 8 reached 4139 and 4102 GB/s
# (shared/anchors/gpu_limits.py, h200-limits.json). Tune here, for all families at once.
# Triton specializes an element count divisible by 16: such buffers get 128-bit loads and stores
# (ld/st.global.v4 in the sm_90 PTX), others 32-bit ones, so flat buffers should hold a multiple
# of 16 elements (and start 16-byte aligned).
BLOCK = 1024
NUM_WARPS = 4
# Contract a * b + c into fused multiply-adds, as nvcc does for torch's own CUDA kernels. Set
# explicitly: Triton 3.9 warns that its default turns to "off" in 3.10.
FP_FUSION = True

# True: CPU tensors run the Triton kernels in the interpreter; False: they run the torch path.
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def live_elements(n, found_inf_ptr, BLOCK: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """This program's (BLOCK,) int64 element offsets and the mask of those it updates.

    A non-zero found_inf empties the live range: nothing is loaded or stored, so every buffer
    keeps its bits, and the decision never leaves the device. A scalar select keeps n's
    divisibility by 16 visible, so accesses stay 128-bit (ld.global.v4 in sm_90 PTX).
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = n
    if HAS_FOUND_INF:
        live = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    return offsets, offsets < live


@triton.jit
def scaled_gradient(grad, clip_coef_ptr, HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The fp32 gradient times the clip coefficient (when HAS_CLIP), negated (when MAXIMIZE)."""
    if HAS_CLIP:
        grad = grad * tl.load(clip_coef_ptr)
    if MAXIMIZE:
        grad = -grad
    return grad


def torch_gradient(grad, clip_coef, maximize):
    """The torch path's gradient: an fp32 copy, times clip_coef (when given), negated (maximize)."""
    g = grad.to(torch.float32, copy=True)
    if clip_coef is not None:
        g.mul_(clip_coef)
    if maximize:
        g.neg_()
    return g


def use_triton(tensor):
    """Whether a call on `tensor` runs the Triton kernel (True) or the torch path (False)."""
    return tensor.is_cuda or (TRITON_ON_CPU and tensor.device.type == "cpu")


def grid(n):
    """Launch grid covering n elements with one BLOCK per program."""
    return (triton.cdiv(n, BLOCK),)


def check_flat(name, tensor, *, like=None, dtypes=None):
    """Check that `tensor` is a 1-D contiguous tensor (of one of `dtypes`), and, when `like` is
    given, as long as `like` and on its device. Errors name the argument."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: dtype {tensor.dtype} is not supported (expected {allowed})")
    if tensor.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    if like is not None:
        if tensor.device != like.device:
            raise ValueError(f"{name}: on {tensor.device}, but param is on {like.device}")
        if tensor.numel() != like.numel():
            raise ValueError(f"{name}: has {tensor.numel()} elements, param has {like.numel()}")


def check_update_tensors(param, grad, states, master, clip_coef, found_inf):
    """Validate the tensors of an update call.

    param: (n,) fp32, bf16 or fp16. grad: (n,) of param's dtype. states: {name: (n,) fp32}.
    master: None or (n,) fp32, only for a bf16/fp16 param: an fp32 param is its own master, and a
    second fp32 copy would only double the traffic. clip_coef, found_inf: None or 1-element fp32
    on param's device.
    """
    check_flat("param", param, dtypes=PARAM_DTYPES)
    check_flat("grad", grad, like=param)
    if grad.dtype != param.dtype:
        raise TypeError(f"grad: dtype {grad.dtype} differs from param's dtype {param.dtype}")
    for name, state in states.items():
        check_flat(name, state, like=param, dtypes=(torch.float32,))
    if master is not None:
        check_flat("master", master, like=param, dtypes=(torch.float32,))
        if param.dtype == torch.float32:
            raise ValueError("master: only for a bf16/fp16 param; an fp32 param is its own master")
    for name, scalar in (("clip_coef", clip_coef), ("found_inf", found_inf)):
        if scalar is None:
            continue
        if not isinstance(scalar, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(scalar).__name__}")
        if scalar.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {scalar.dtype}")
        if scalar.numel() != 1:
            raise ValueError(f"{name}: expected 1 element, got {scalar.numel()}")
        if scalar.device != param.device:
            raise ValueError(f"{name}: on {scalar.device}, but param is on {param.device}")


def check_nonnegative(**values):
    """Each value must be a real number >= 0 (NaN fails)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
        if not value >= 0.0:
            raise ValueError(f"{name}: must be >= 0, got {value}")


def check_step(step):
    """step counts updates including this one: an int >= 1."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: expected an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step: must be >= 1 (the count after this update), got {step}")


def resolve_decay_end(decay_end, n):
    """Number of leading elements that get weight decay: decay_end, or all n when None."""
    if decay_end is None:
        return n
    if isinstance(decay_end, bool) or not isinstance(decay_end, numbers.Integral):
        raise TypeError(f"decay_end: expected an int or None, got {type(decay_end).__name__}")
    if not 0 <= decay_end <= n:
        raise ValueError(f"decay_end: must be in [0, {n}], got {decay_end}")
    return int(decay_end)


def commit(pairs, found_inf):
    """Torch path: copy each (destination, new fp32 value) pair into place, rounding to the
    destination's dtype; where found_inf is non-zero, every destination keeps its old bits.
    Uses torch.where, not a Python `if`, so that no value leaves the device."""
    if found_inf is None:
        for dst, new in pairs:
            dst.copy_(new)
        return
    skip = found_inf.reshape(()) != 0
    for dst, new in pairs:
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))
