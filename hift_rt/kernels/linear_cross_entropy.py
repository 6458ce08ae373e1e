"""The LM head's cross-entropy without the full logits: a chunked fused linear + cross-entropy,
its Triton row kernel, and its plain-PyTorch float64 reference.

    logits = hidden @ weight.T + bias                      (N, V), never held whole
    loss   = sum_{i: labels_i != ignore_index} (logsumexp_j logits_ij - logits_i,labels_i) / D

with D the number of non-ignored labels (mean reduction, as Hugging Face's ForCausalLMLoss), or
`num_items_in_batch` when given (Trainer's divisor under gradient accumulation). The gradients,
with G = softmax(logits) - onehot(labels) (rows of ignored labels are 0) and g = d out / d loss:

    d hidden = g / D * G @ weight        d weight = g / D * G.T @ hidden        d bias = g / D * sum_i G_i

The tokens are processed in chunks of C rows. Per chunk: the logits in the inputs' dtype (a cuBLAS
matmul, accumulating in fp32), then one Triton program per row (_cross_entropy_rows_kernel) reads
its row in fp32 blocks for the logsumexp and the row's loss and overwrites the row in place with G,
and then the chunk's share of d hidden and d weight (two more matmuls, only those whose input
needs a gradient). The loss is a scalar, so the gradients are computed in the forward and kept
(unscaled: G without the 1 / D, which fp16 could not hold for small probabilities) until the
backward multiplies them in place by g / D, a device scalar: nothing waits for the host.

Chunk rule: C = max(1, min(N, CHUNK_BYTES // (V * itemsize))), so the (C, V) chunk of logits, the
one buffer that grows with V, takes at most CHUNK_BYTES = 256 MiB (Llama-3's V = 128256 in bf16:
1046 tokens per chunk; V = 32000: 4194). Peak extra memory of one call, beyond its inputs
(s = the compute dtype's bytes, 2 for bf16/fp16 and 4 for fp32):

    C * V * s                      the chunk of logits, overwritten by G
    + N * 4                        the per-token losses (fp32)
    + N * H * s                    d hidden, when hidden needs a gradient   } held from the forward
    + V * H * s                    d weight, when weight needs a gradient   } until the backward
    + V * 4                        d bias (fp32 sums), when bias needs one  } hands them over

The torch path (CPU tensors) adds about 3 * C * V * 4 bytes of fp32 temporaries per chunk. Under
autocast, hidden, weight and bias are first cast to the autocast dtype, as F.linear does (for
fp32 parameters that is a V * H * 2 copy of the weight, which the model's own head makes too).
The model's own loss instead keeps the (N, V) logits, their fp32 copy and fp32 log-softmax
(N * V * (s + 8) bytes) and allocates about as much again in its backward.

Precision: the logits are rounded to the inputs' dtype, as a model's own head rounds them;
logsumexp, loss and G are computed in fp32 and G is rounded to the inputs' dtype; d weight is
accumulated over chunks in the weight's dtype (one rounding per chunk in bf16/fp16).

Labels outside [0, V) other than ignore_index raise ValueError for CPU tensors; on a GPU, where
checking would make the host wait for the device, such a row's loss is NaN (the model's own loss
would stop the process with a device-side assert).

Dispatch as every kernel here (see _common.py): CUDA tensors run the Triton kernel compiled; CPU
tensors run the torch path, or the Triton kernel in the interpreter under TRITON_INTERPRET=1. It
may call torch, triton and ._common.
"""
import numbers

import torch
import triton
import triton.language as tl

from . import _common

# Columns per loop iteration of the row kernel, and its warps. A row of Llama-3's 128256 columns is
# 32 iterations of 4096 (16 elements per thread with 8 warps). Not yet tuned on a GPU.
BLOCK_V = 4096
NUM_WARPS = 8
# Bytes of the (C, V) chunk of logits: the chunk rule in the module docstring.
CHUNK_BYTES = 256 * 2 ** 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # (rows, V) contiguous, fp32/bf16/fp16; holds G = softmax - onehot on return when GRAD
    labels_ptr,  # (rows,) int64
    losses_ptr,  # (rows,) fp32 out: logsumexp - logit[label]; 0 when ignored, NaN for a label outside [0, V)
    V,  # columns (vocabulary size)
    ignore_index,  # a label with this value contributes no loss and a zero gradient row
    BLOCK_V: tl.constexpr,  # columns per iteration: tl.arange needs a compile-time size
    GRAD: tl.constexpr,  # overwrite the row with G; False when no input needs a gradient
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * V
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if GRAD:
            for start in range(0, V, BLOCK_V):
                zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < V)
    else:
        # Online logsumexp: running max m and sum s of exp(x - m), one pass over the row.
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        in_range = (label >= 0) & (label < V)
        picked = tl.load(row_ptr + tl.where(in_range, label, 0)).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(in_range, lse - picked, float("nan")))
        if GRAD:
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                x = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
                tl.store(row_ptr + start + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_rows(logits, labels, losses, ignore_index, grad):
    """_cross_entropy_rows_kernel over a (rows, V) chunk, one program per row. Not
    _common.launch: that one cuts a flat buffer into BLOCK-element programs."""
    rows, V = logits.shape
    if rows == 0:
        return
    block = min(BLOCK_V, triton.next_power_of_2(V))
    _cross_entropy_rows_kernel[(rows,)](logits, labels, losses, V, ignore_index, BLOCK_V=block, GRAD=grad,
                                        num_warps=NUM_WARPS, enable_fp_fusion=_common.FP_FUSION)


def _torch_rows(logits, labels, losses, ignore_index, grad):
    """The row kernel's math with torch ops, in fp32 (labels already checked to lie in [0, V))."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    kept = labels != ignore_index
    index = torch.where(kept, labels, 0)[:, None]
    losses.copy_(torch.where(kept, lse - x.gather(1, index)[:, 0], 0.0))
    if grad:
        x.sub_(lse[:, None]).exp_()
        x.scatter_add_(1, index, -torch.ones_like(index, dtype=x.dtype))
        x.mul_(kept[:, None])
        logits.copy_(x)


def _chunked(hidden, weight, bias, labels, ignore_index, chunk, needs):
    """Per-token fp32 losses (N,) and the unscaled gradients (G @ weight, G.T @ hidden, fp32
    sum of G's rows), each None where `needs` (hidden, weight, bias) says no."""
    n, v = hidden.shape[0], weight.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if needs[0] else None
    grad_weight = torch.zeros_like(weight) if needs[1] else None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=hidden.device) if needs[2] else None
    rows_kernel = _launch_rows if _common.runs_triton(hidden) else _torch_rows
    buffer = torch.empty(min(chunk, n), v, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x, logits = hidden[start:end], buffer[:end - start]
        if bias is None:
            torch.mm(x, weight.t(), out=logits)
        else:
            torch.addmm(bias, x, weight.t(), out=logits)
        rows_kernel(logits, labels[start:end], losses[start:end], ignore_index, any(needs))
        if grad_hidden is not None:
            torch.mm(logits, weight, out=grad_hidden[start:end])
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), x)
        if grad_bias is not None:
            grad_bias += logits.sum(0, dtype=torch.float32)
    return losses, (grad_hidden, grad_weight, grad_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    """Inputs already in one dtype, labels int64 on hidden's device; `scale` = 1 / D, or 0 when
    no label counts (then every gradient is 0, as torch's cross_entropy gives)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, divisor, scale, ignore_index, chunk, grad_enabled):
        needs = tuple(grad_enabled and need for need in ctx.needs_input_grad[:3])
        losses, gradients = _chunked(hidden, weight, bias, labels, ignore_index, chunk, needs)
        ctx.gradients, ctx.scale = gradients, scale
        ctx.bias_dtype = None if bias is None else bias.dtype
        return losses.sum() / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if ctx.gradients is None:
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss (retain_graph=True) "
                               "is not supported: its gradients were computed in the forward and handed over "
                               "(scaled in place) by the first backward")
        grad_hidden, grad_weight, grad_bias = ctx.gradients
        ctx.gradients = None  # hand them over: autograd frees them once accumulated
        factor = grad_loss.float() * ctx.scale  # a 0-d fp32 device tensor; mul_ keeps it in fp32
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                grad.mul_(factor)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _check(hidden, weight, labels, bias):
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden (N, H) and weight (V, H) must be 2-D, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden has {hidden.shape[1]} features, weight {weight.shape[1]} (expected (N, H) and (V, H))")
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocabulary is empty (V = 0)")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels: expected shape ({hidden.shape[0]},) (one per row of hidden), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name}: on {tensor.device}, but hidden is on {hidden.device}")
    for name, tensor in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} is not supported (fp32, bf16 or fp16)")


def _divisor(num_items_in_batch, count):
    """D as a 0-d fp32 tensor on count's device: the count of kept labels, or num_items_in_batch."""
    if num_items_in_batch is None:
        return count.float()
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected one number, got a tensor of shape "
                             f"{tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.to(count.device, torch.float32).reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
        raise TypeError(f"num_items_in_batch: expected a number or a tensor, got {type(num_items_in_batch).__name__}")
    if not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch: must be > 0, got {num_items_in_batch}")
    return torch.full((), float(num_items_in_batch), device=count.device)  # a fill: no copy from the host


def check_chunk_size(chunk_size):
    """chunk_size must be None (the chunk rule) or an int >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected an int >= 1 or None, got {chunk_size!r}")


def chunk_rows(n, v, itemsize):
    """Rows per chunk by the chunk rule: max(1, min(n, CHUNK_BYTES // (v * itemsize)))."""
    return max(1, min(n, CHUNK_BYTES // (v * itemsize)))


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, num_items_in_batch=None,
                         chunk_size=None):
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, never materializing the
    (N, V) logits (see the module docstring for the math, the chunk rule and the memory).

    hidden: (N, H) fp32/bf16/fp16, the positions whose next token `labels` holds (shift first);
    weight: (V, H) and bias: (V,) or None, of hidden's dtype (under autocast: any float dtype, all
    cast to the autocast dtype); labels: (N,) integer, ignore_index marks positions without a
    target; num_items_in_batch: the divisor D (a number > 0 or a one-element tensor), default the
    count of labels != ignore_index; chunk_size: rows per chunk, default the chunk rule.

    Returns the loss, a 0-d fp32 tensor, differentiable w.r.t. hidden, weight and bias: only those
    that require grad get one (a frozen head skips the weight's matmul), nothing when grad mode is
    off. Backward can run once per call (retain_graph=True and a second backward raise).
    """
    _check(hidden, weight, labels, bias)
    check_chunk_size(chunk_size)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(f"{name}: dtype {tensor.dtype} differs from hidden's {hidden.dtype} (outside autocast, "
                            "the head's matmul needs one dtype)")
    labels = labels.to(hidden.device, torch.long).contiguous()
    v = weight.shape[0]
    if labels.device.type == "cpu":
        outside = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if outside.any():
            raise ValueError(f"labels: {labels[outside][0].item()} is outside [0, {v}) and is not "
                             f"ignore_index ({ignore_index})")
    count = (labels != ignore_index).sum()
    divisor = _divisor(num_items_in_batch, count)
    scale = torch.where(count > 0, 1.0 / divisor, 0.0)
    chunk = chunk_size or chunk_rows(hidden.shape[0], v, hidden.element_size())
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, divisor, scale, int(ignore_index),
                                         int(chunk), torch.is_grad_enabled())


def linear_cross_entropy_ref(hidden, weight, labels, bias=None, *, ignore_index=-100, num_items_in_batch=None):
    """Float64 reference of linear_cross_entropy with the full logits: (loss, d hidden, d weight,
    d bias), the gradients of the loss w.r.t. each input (d bias None without a bias), float64."""
    hidden, weight = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    bias = None if bias is None else bias.detach().double().requires_grad_()
    logits = torch.nn.functional.linear(hidden, weight, bias)
    total = torch.nn.functional.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    divisor = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    loss = total / divisor
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, inputs)
    return (loss.detach(), grads[0], grads[1], grads[2] if bias is not None else None)
