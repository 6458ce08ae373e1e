"""What the kernel families share: launch parameters and the one launch helper, the update
prologue (argument validation, decay_end, weights and state formats, dispatch to Triton or the
torch path), and the Triton helpers every update kernel calls for its tile, gradient and
weights. It may call torch, triton and .quantization (the state formats).

Dispatch. A CUDA tensor runs the Triton kernel, compiled. A CPU tensor runs the family's torch
path (the same fp32 math in plain torch ops), unless `TRITON_INTERPRET=1` was in the environment
when this module was imported: then CPU tensors run the Triton kernels in Triton's interpreter,
which is how the CPU test suite checks the Triton code. The variable is read once, at import,
because Triton reads it at the same moment (when `@triton.jit` decorates a kernel): reading it
later could send CPU tensors to kernels that were built for the GPU. Tests pick the path for CPU
tensors by setting `TRITON_ON_CPU`.

Weights. A param of fp32 is its own weight. A bf16/fp16 param has one of: an fp32 master (the
update runs on the master, the param receives it rounded); a compensation buffer in the param's
dtype ("kahan": the weight is param + compensation in fp32, and after the update the param gets
the rounded weight and the compensation the rounding error, rounded: param + compensation
carries about 16 significant bits, and updates far below the param's ulp accumulate instead of
being lost); or neither (plain low-precision update: lossy, an update below half an ulp of the
param is lost).
"""
import numbers
import os

import torch
import triton
import triton.language as tl

from . import quantization

# Elements per Triton program and warps per program for the elementwise update kernels and the
# norm's partial sums. A flat fp32 AdamW with 1024 / 4 reached 4255 GB/s on an H200, the measured
# copy bandwidth (4241 GB/s); 2048 / 8 and 4096 / 8 reached 4139 and 4102 GB/s. Tune here, for
# all families at once.
# Triton specializes an element count divisible by 16: such buffers get 128-bit loads and stores
# (ld/st.global.v4 in the sm_90 PTX), others 32-bit ones, so flat buffers should hold a multiple
# of 16 elements (and start 16-byte aligned).
BLOCK = 1024
# int8 states: 128-bit accesses to a uint8 buffer need 16 elements per thread, 2048 per program
# of 4 warps (with 1024, each thread would move 8 codes in 64-bit accesses).
QUANTIZED_BLOCK = 2048
NUM_WARPS = 4
# Contract a * b + c into fused multiply-adds, as nvcc does for torch's own CUDA kernels. Set
# explicitly: Triton 3.9 warns that its default turns to "off" in 3.10.
FP_FUSION = True

# True: CPU tensors run the Triton kernels in the interpreter; False: they run the torch path.
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The WEIGHTS constexpr of the update kernels: where the weight lives.
PARAM, MASTER, KAHAN = 0, 1, 2


# ---- Triton helpers ---------------------------------------------------------------------------

@triton.jit
def tile(n, BLOCK: tl.constexpr, Q: tl.constexpr):
    """This program's rows (BLOCK // Q,) int64, its (BLOCK // Q, Q) element offsets and the mask
    of those below n. A row of Q elements is one absmax block of an int8 state; rows are
    contiguous, so accesses stay 128-bit (ld/st.global.v4 in sm_90 PTX)."""
    rows = tl.program_id(0).to(tl.int64) * (BLOCK // Q) + tl.arange(0, BLOCK // Q)
    offsets = rows[:, None] * Q + tl.arange(0, Q)[None, :]
    return rows, offsets, offsets < n


@triton.jit
def load_inputs(param_ptr, master_ptr, compensation_ptr, grad_ptr, clip_coef_ptr, n,
                BLOCK: tl.constexpr, Q: tl.constexpr, WEIGHTS: tl.constexpr,
                HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr):
    """This program's tile (rows, offsets, mask, see tile), the fp32 weight (the master
    (MASTER), param + compensation (KAHAN) or the param (PARAM)) and the fp32 gradient times the
    clip coefficient (when HAS_CLIP), negated (when MAXIMIZE)."""
    rows, offsets, mask = tile(n, BLOCK, Q)
    if WEIGHTS == 1:  # MASTER
        weight = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    elif WEIGHTS == 2:  # KAHAN
        weight = (tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                  + tl.load(compensation_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
    else:
        weight = tl.load(param_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_CLIP:
        grad = grad * tl.load(clip_coef_ptr)
    if MAXIMIZE:
        grad = -grad
    return rows, offsets, mask, weight, grad


@triton.jit
def store_weight(weight, param_ptr, master_ptr, compensation_ptr, offsets, mask,
                 WEIGHTS: tl.constexpr):
    """Store the updated fp32 weight: param = round(weight), and the master (MASTER) or the
    compensation = round(weight - param) (KAHAN; the difference is exact in fp32)."""
    param = weight.to(param_ptr.dtype.element_ty)
    tl.store(param_ptr + offsets, param, mask=mask)
    if WEIGHTS == 1:  # MASTER
        tl.store(master_ptr + offsets, weight, mask=mask)
    elif WEIGHTS == 2:  # KAHAN
        compensation = weight - param.to(tl.float32)
        tl.store(compensation_ptr + offsets, compensation.to(compensation_ptr.dtype.element_ty),
                 mask=mask)


def runs_triton(tensor):
    """Whether a call on `tensor` runs a Triton kernel (True) or the torch path (False)."""
    return tensor.is_cuda or (TRITON_ON_CPU and tensor.device.type == "cpu")


def launch(kernel, n, block, *args, **constexprs):
    """Run `kernel` over n elements with `block` elements per program (passed as BLOCK)."""
    kernel[(triton.cdiv(n, block),)](*args, BLOCK=block, num_warps=NUM_WARPS,
                                     enable_fp_fusion=FP_FUSION, **constexprs)


# ---- the prologue -----------------------------------------------------------------------------

def check_flat(name, tensor, *, like=None, dtypes=None, numel=None):
    """Check that `tensor` is a 1-D contiguous tensor (of one of `dtypes`), and, when `like` is
    given, on its device and as long as `like` (or `numel`). Errors name the argument."""
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
        expected = like.numel() if numel is None else numel
        if tensor.numel() != expected:
            raise ValueError(f"{name}: has {tensor.numel()} elements, expected {expected}")


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


def _resolve_decay_end(decay_end, n):
    """Number of leading elements that get weight decay: decay_end, or all n when None."""
    if decay_end is None:
        return n
    if isinstance(decay_end, bool) or not isinstance(decay_end, numbers.Integral):
        raise TypeError(f"decay_end: expected an int or None, got {type(decay_end).__name__}")
    if not 0 <= decay_end <= n:
        raise ValueError(f"decay_end: must be in [0, {n}], got {decay_end}")
    return int(decay_end)


def _check_states(param, states):
    """Every present state buffer: (n,) in one format (fp32, bf16, or uint8 codes with an
    (n / Q,) fp32 absmax, n a multiple of Q)."""
    present = [s for s in states if s.values is not None]
    for state in present:
        check_flat(state.name, state.values, like=param, dtypes=quantization.FORMATS)
        absmax_name = state.name + "_absmax"
        if state.quantized:
            if param.numel() % quantization.Q != 0:
                raise ValueError(f"{state.name}: the int8 format needs a multiple of "
                                 f"{quantization.Q} elements, got {param.numel()}")
            if state.absmax is None:
                raise ValueError(f"{absmax_name}: required for a uint8 {state.name} (one fp32 "
                                 f"absmax per {quantization.Q} elements)")
            check_flat(absmax_name, state.absmax, like=param, dtypes=(torch.float32,),
                       numel=param.numel() // quantization.Q)
        elif state.absmax is not None:
            raise ValueError(f"{absmax_name}: only for a uint8 {state.name}, "
                             f"got one for a {state.values.dtype} {state.name}")
    for state in present[1:]:
        if state.values.dtype != present[0].values.dtype:
            raise TypeError(f"{state.name}: dtype {state.values.dtype} differs from "
                            f"{present[0].name}'s {present[0].values.dtype} (the state buffers "
                            f"of one update share a format)")


def _check_weights(param, master, compensation):
    for name, buffer, dtypes in (("master", master, (torch.float32,)),
                                 ("compensation", compensation, (param.dtype,))):
        if buffer is None:
            continue
        check_flat(name, buffer, like=param, dtypes=dtypes)
        if param.dtype == torch.float32:
            raise ValueError(f"{name}: only for a bf16/fp16 param; an fp32 param is its own master")
    if master is not None and compensation is not None:
        raise ValueError("compensation: give master or compensation, not both")


def _check_clip_coef(param, clip_coef):
    if clip_coef is None:
        return
    if not isinstance(clip_coef, torch.Tensor):
        raise TypeError(f"clip_coef: expected a torch.Tensor, got {type(clip_coef).__name__}")
    if clip_coef.dtype != torch.float32:
        raise TypeError(f"clip_coef: expected dtype torch.float32, got {clip_coef.dtype}")
    if clip_coef.numel() != 1:
        raise ValueError(f"clip_coef: expected 1 element, got {clip_coef.numel()}")
    if clip_coef.device != param.device:
        raise ValueError(f"clip_coef: on {clip_coef.device}, but param is on {param.device}")


class Update:
    """One validated update call over flat buffers: the prologue every family's wrapper runs.

    param: (n,) fp32, bf16 or fp16; grad: (n,) of param's dtype; states: StateBuffers in the
    order of the kernel's state arguments; master: (n,) fp32 or compensation: (n,) of param's
    dtype, only for a bf16/fp16 param; clip_coef: None or a 1-element fp32 tensor on param's
    device (read on the device only); decay_end: elements [0, decay_end) get weight decay
    (None: all); weight_decay, maximize: the options every family has.
    """

    def __init__(self, param, grad, states, *, master, compensation, clip_coef, decay_end,
                 weight_decay, maximize):
        check_flat("param", param, dtypes=PARAM_DTYPES)
        check_flat("grad", grad, like=param)
        if grad.dtype != param.dtype:
            raise TypeError(f"grad: dtype {grad.dtype} differs from param's dtype {param.dtype}")
        _check_states(param, states)
        _check_weights(param, master, compensation)
        _check_clip_coef(param, clip_coef)
        check_nonnegative(weight_decay=weight_decay)
        self.param, self.grad, self.states = param, grad, states
        self.master, self.compensation, self.clip_coef = master, compensation, clip_coef
        self.n = param.numel()
        self.decay_end = _resolve_decay_end(decay_end, self.n)
        self.weight_decay, self.maximize = float(weight_decay), bool(maximize)
        self.weights = MASTER if master is not None else KAHAN if compensation is not None else PARAM
        self.quantized = any(s.quantized for s in states)

    def run(self, kernel, torch_path, scalars, **flags):
        """Dispatch: nothing for n = 0; the Triton kernel with `scalars` (the family's runtime
        arguments, in the kernel's order after n, decay_end, weight_decay) and `flags` (its
        own constexprs); or torch_path(self, **scalars, **flags)."""
        if self.n == 0:
            return
        if not runs_triton(self.param):
            torch_path(self, **scalars, **flags)
            return
        state_pointers = [t for s in self.states for t in (s.values, s.absmax)]
        launch(kernel, self.n, QUANTIZED_BLOCK if self.quantized else BLOCK,
               self.param, self.master, self.compensation, self.grad, self.clip_coef,
               quantization.codebook(self.param.device), *state_pointers,
               self.n, self.decay_end, self.weight_decay, *scalars.values(),
               Q=quantization.Q, WEIGHTS=self.weights, QUANTIZED=self.quantized,
               WEIGHT_DECAY=self.weight_decay != 0.0 and self.decay_end > 0,
               MAXIMIZE=self.maximize, HAS_CLIP=self.clip_coef is not None, **flags)

    # -- the torch path's side of the same steps --------------------------------------------
    def load_gradient(self):
        """An fp32 copy of the gradient, times clip_coef (when given), negated (maximize)."""
        g = self.grad.to(torch.float32, copy=True)
        if self.clip_coef is not None:
            g.mul_(self.clip_coef)
        if self.maximize:
            g.neg_()
        return g

    def load_weight(self):
        """An fp32 copy of the weight (see load_inputs above)."""
        if self.weights == MASTER:
            return self.master.clone()
        weight = self.param.to(torch.float32, copy=True)
        if self.weights == KAHAN:
            weight += self.compensation
        return weight

    def store_weight(self, weight):
        """Store the fp32 weight (see store_weight above)."""
        self.param.copy_(weight)
        if self.weights == MASTER:
            self.master.copy_(weight)
        elif self.weights == KAHAN:
            self.compensation.copy_(weight - self.param.float())
