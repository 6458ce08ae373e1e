"""Triton update kernels over flat 1-D buffers, with their plain-PyTorch float64 references, the
optimizer-state formats (fp32, bf16, blockwise int8) they read and write, and the LM head's
chunked linear + cross-entropy (linear_cross_entropy).

CUDA tensors run the Triton kernels; CPU tensors run the same fp32 math in torch ops, or the
Triton kernels in Triton's interpreter when TRITON_INTERPRET=1 was set before this package was
imported (see _common.py).
"""
from .adagrad import adagrad_ref, adagrad_update
from .adamw import adamw_ref, adamw_update
from .grad_norm import grad_norm, grad_norm_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .quantization import Q, dequantize, quantize
from .sgd import sgd_ref, sgd_update

__all__ = [
    "adamw_update", "adagrad_update", "sgd_update", "grad_norm",
    "adamw_ref", "adagrad_ref", "sgd_ref", "grad_norm_ref",
    "Q", "quantize", "dequantize",
    "linear_cross_entropy", "linear_cross_entropy_ref",
]
