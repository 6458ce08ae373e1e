"""Norm of a flat gradient, left on the device: per-program partials from one Triton launch,
then a device-side reduction of the partials (one per BLOCK elements, 0.1% extra traffic).

    norm_type 2:   sqrt(sum_i g_i^2)
    norm_type 1:   sum_i |g_i|
    norm_type inf: max_i |g_i|

Accumulation is in fp32 whatever the gradient's dtype; NaN propagates for every norm type. A
caller clips with coef = min(1, max_norm / (norm + 1e-6)) computed from the result with torch
ops, and passes coef to an update as clip_coef, all without a host sync.
"""
import math

import torch
import triton
import triton.language as tl

from . import _common
from .quantization import abs_max

NORM_TYPES = (2.0, 1.0, math.inf)


@triton.jit
def _grad_norm_partials_kernel(
    grad_ptr,  # (n,) gradient, fp32/bf16/fp16
    partials_ptr,  # (programs,) fp32, one partial per program
    n,  # number of elements
    BLOCK: tl.constexpr,  # elements per program: tl.arange needs a compile-time size
    NORM: tl.constexpr,  # 2: sum of squares, 1: sum of |g|, 0: max of |g| (inf); picks the reduction
):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # Masked lanes load 0, which changes none of the three reductions.
    grad = tl.load(grad_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    if NORM == 2:
        partial = tl.sum(grad * grad, axis=0)
    elif NORM == 1:
        partial = tl.sum(tl.abs(grad), axis=0)
    else:
        partial = abs_max(grad, 0)  # NaN-propagating, as torch's norm
    tl.store(partials_ptr + program, partial)


def _launch(grad, norm_type):
    """Partials from _grad_norm_partials_kernel, reduced with torch ops on the same device."""
    n = grad.numel()
    partials = torch.empty(triton.cdiv(n, _common.BLOCK), dtype=torch.float32, device=grad.device)
    norm = {2.0: 2, 1.0: 1, math.inf: 0}[norm_type]
    _common.launch(_grad_norm_partials_kernel, n, _common.BLOCK, grad, partials, n, NORM=norm)
    if norm == 2:
        return partials.sum().sqrt()
    if norm == 1:
        return partials.sum()
    return partials.max()


def _torch_path(grad, norm_type):
    """The same norm with torch ops, accumulated in fp32."""
    return torch.linalg.vector_norm(grad, norm_type, dtype=torch.float32)


def grad_norm(grad, norm_type=2.0):
    """Norm of a flat gradient as a 0-d fp32 tensor on grad's device, without a host sync.

    grad: (n,) fp32, bf16 or fp16, contiguous. norm_type: 2.0, 1.0 or inf (others raise
    ValueError). Equals torch.linalg.vector_norm(grad.float(), norm_type) up to fp32 summation
    order; an empty gradient has norm 0.
    """
    _common.check_flat("grad", grad, dtypes=_common.PARAM_DTYPES)
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type: expected a number, got {type(norm_type).__name__}")
    if float(norm_type) not in NORM_TYPES:
        raise ValueError(f"norm_type: must be one of 2.0, 1.0, inf, got {norm_type}")
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=grad.device)
    run = _launch if _common.runs_triton(grad) else _torch_path
    return run(grad, float(norm_type))


def grad_norm_ref(grad, norm_type=2.0):
    """Float64 reference of grad_norm: a 0-d float64 tensor."""
    return torch.linalg.vector_norm(grad.double(), norm_type)
