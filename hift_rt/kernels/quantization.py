"""Optimizer-state formats: fp32, bf16 and int8 (blockwise dynamic quantization), in Triton and in
plain torch. This module owns the 8-bit code (its values, its decision boundaries and both
encoders), blockwise quantize/dequantize, and the loads and stores of a state buffer in any
format that the update kernels and their torch paths call. It may call torch and triton only.

int8 format. A state of n elements (n a multiple of Q) is n uint8 codes plus n / Q fp32 absmax,
one per block of Q consecutive elements. An element is stored as code(x) with x = value / absmax
of its block, and read back as VALUES[code] * absmax. The block's largest element has x = 1,
which the code represents exactly, so every block keeps its absmax to fp32 precision (an EMA like
Adam's v with beta2 = 0.999 moves by 0.1% per step, far below one code step: without an exact
top, the largest element would be rounded every step and the rounding bias would compound).

The code is a dynamic (non-linear) one in the sense of Dettmers et al., "8-bit Optimizers via
Block-wise Quantization" (arXiv 2110.02861), as bitsandbytes' and torchao's 8-bit optimizers use:
an exponent plus a linear fraction whose width shrinks with the exponent, so values near the
block's absmax are stored finely and small ones coarsely but over a wide range. Ours is written in
base 2 (theirs in base 10), which makes encoding exact integer work on the fp32 bits instead of a
search. For a magnitude x in (0, 1], binade k holds x in [2^-(k+1), 2^-k); binades come in groups
of four, g = k // 4, and group g stores B - g fraction bits: the grid values are
2^-(k+1) * (1 + j / 2^(B - g)), j < 2^(B - g). The last group (g = B) has 0 fraction bits and
six binades; 1.0 and 0 complete the code.

    signed   (first moment, momentum): B = 4, sign bit + 127 magnitudes; grid from 2^-22 to 1,
             relative spacing 1/16 at the top (x >= 1/16), 1/8 down to 2^-8, ...
    unsigned (second moment, Adagrad sum): B = 5, 255 magnitudes; grid from 2^-26 to 1,
             relative spacing 1/32 at the top, 1/16 down to 2^-8, ...

Encoding rounds to the nearest grid value, ties up (away from zero): with s the number of fp32
mantissa bits to drop for x's group, code = ((bits >> (s - 1)) + 1) >> 1 plus a per-group offset;
rounding up across a binade carries into the exponent bits, which is the next grid value. Two
refinements: the unsigned code never maps a positive value to 0 (a tiny v rounds up to the
smallest grid value, so m / (sqrt(v) + eps) cannot blow up where m was stored and v flushed to
0), and the signed code's sign bit is the fp32 sign bit (-0.0 and small negative values that
round to 0 get code 0x80, which reads back as -0.0). The decision boundaries are the midpoints
of neighbouring grid values, except between 0 and the smallest signed value 2^-22, where it lies
at 0.75 * 2^-22 (the encoder treats the binade below the grid as having a value at 2^-23).
`encode_torch` makes the same decisions in torch by a search over the exact boundaries (the
definition; the torch path and the references use it), and tests check that the Triton `encode`
agrees with it on every boundary and its fp32 neighbours.

Non-finite values. A NaN or inf makes its block's absmax non-finite; the block's elements then
read back as NaN or inf on the next step: NaN spreads over one block of the state (the param
itself gets NaN or inf for the element concerned, as with fp32 state).

Speed. The update kernels are memory bound: on an H200 (4.8 TB/s) int8 AdamW with Kahan moves
14.1 B per element, 340 G elements/s, about 1.3 elements per SM clock (0.77 clocks per element).
The encoder costs about 17 integer ALU operations per element (18 signed) and no memory access;
for AdamW's two moments that is about 0.55 clocks per element on the 64-lane ALU pipe. A binary
search over the 255 sorted midpoints would cost 8 dependent table loads per moment, each up to 8
L1 wavefronts per warp-wide load (a 1 KB table spans 8 lines): up to 4 L1 clocks per element for
two moments, 5x the time the whole update may take. Decoding is one load from the 512-entry fp32
table VALUES (2 KB, stays in L1; the codes of a block cluster in its top binades, about 4
distinct 128-byte lines per warp-wide load, 0.25 L1 clocks per element for two moments), which
runs beside the ALU work; decoding analytically would add about 14 ALU operations per moment to
a pipe that the encoder already half fills.

bf16 state is stored with round-to-nearest-even. Note for Adam's v with beta2 = 0.999: a decay
step of 0.1% is below half a bf16 ulp (0.2% to 0.4%), so a bf16 v decays only through new
gradients; the int8 format decays through its fp32 absmax.
"""
import torch
import triton
import triton.language as tl

Q = 128  # elements per absmax block: 1 + 4/128 bytes per element for an int8 state
SIGNED_FRACTION_BITS = 4  # B of the signed code
UNSIGNED_FRACTION_BITS = 5  # B of the unsigned code
FORMATS = (torch.float32, torch.bfloat16, torch.uint8)  # state dtypes: fp32, bf16, int8 codes


def _magnitudes(top_bits):
    """The 2^(B + 3) magnitudes of the code with B = top_bits, ascending, as Python floats: 0,
    the six binades of group B (no fraction bits), groups B - 1 .. 0, then 1."""
    values = [0.0]
    values += [2.0 ** -(k + 1) for k in range(4 * top_bits + 5, 4 * top_bits - 1, -1)]
    for group in range(top_bits - 1, -1, -1):
        bits = top_bits - group
        for k in range(4 * group + 3, 4 * group - 1, -1):
            values += [2.0 ** -(k + 1) * (1 + j / 2**bits) for j in range(2**bits)]
    values.append(1.0)
    assert len(values) == 2 ** (top_bits + 3)
    return values


def _tables():
    """VALUES (512,) float64, the values of signed codes 0..255 then of unsigned codes 0..255,
    and the decision boundaries of the signed and of the unsigned magnitudes: bounds[c - 1] is
    the smallest magnitude that encodes to c or more."""
    signed = _magnitudes(SIGNED_FRACTION_BITS)
    unsigned = _magnitudes(UNSIGNED_FRACTION_BITS)
    values = signed + [-v for v in signed] + unsigned
    values[128] = -0.0

    def bounds(magnitudes):
        mids = [(a + b) / 2 for a, b in zip(magnitudes, magnitudes[1:])]
        mids[0] = 0.75 * magnitudes[1]  # see the module docstring
        return torch.tensor(mids, dtype=torch.float64)

    return torch.tensor(values, dtype=torch.float64), bounds(signed), bounds(unsigned)


VALUES, SIGNED_BOUNDS, UNSIGNED_BOUNDS = _tables()
UNSIGNED_OFFSET = 256  # where the unsigned code's values start in VALUES

_codebooks = {}


def codebook(device):
    """VALUES as fp32 on `device` (cached): the table the kernels decode with."""
    key = torch.device(device)
    if key not in _codebooks:
        _codebooks[key] = VALUES.to(device=key, dtype=torch.float32)
    return _codebooks[key]


# ---- Triton -------------------------------------------------------------------------------------

@triton.jit
def abs_max(x, axis):
    """max |x| along `axis`, NaN where a NaN is reduced (as torch's amax and norms give). Taken
    over the fp32 bit patterns as int32: for x >= 0 their order is the values' order and NaN's
    patterns sort above inf. (tl.max may drop NaN on a GPU, and a custom NaN-propagating combine
    runs element by element in Python in the interpreter; this runs whole-array in both.)"""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis).to(tl.float32, bitcast=True)


@triton.jit
def _magnitude_code(a, B: tl.constexpr):
    """Magnitude codes (int32, 0..2^(B+3)-1) of fp32 bit patterns a >= 0 (see the module
    docstring); values above 1, inf and NaN give the top code."""
    group = tl.minimum(tl.maximum((126 - (a >> 23)) >> 2, 0), B)
    rounded = ((a >> (group + (22 - B))) + 1) >> 1
    code = rounded + ((4 * group - 119) << (B - group)) - 1
    return tl.minimum(code, (8 << B) - 1)


@triton.jit
def encode(x, SIGNED: tl.constexpr):
    """int32 codes (0..255) of normalized fp32 values x (|x| <= 1 for finite blocks)."""
    bits = x.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    if SIGNED:  # B = SIGNED_FRACTION_BITS; the sign bit is x's
        code = tl.maximum(_magnitude_code(a, 4), 0) | ((bits >> 24) & 0x80)
    else:  # B = UNSIGNED_FRACTION_BITS; a > 0 gives at least code 1
        code = tl.minimum(tl.maximum(_magnitude_code(a, 5), 1), a)
    return code


@triton.jit
def load_state(values_ptr, absmax_ptr, codebook_ptr, rows, offsets, mask, n,
               Q: tl.constexpr, QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """A (rows, Q) tile of a state buffer as fp32: fp32 or bf16 values loaded, or int8 codes
    decoded with their block's absmax (rows indexes the blocks)."""
    if QUANTIZED:
        codes = tl.load(values_ptr + offsets, mask=mask, other=0).to(tl.int32)
        if not SIGNED:
            codes += 256  # UNSIGNED_OFFSET
        unit = tl.load(codebook_ptr + codes)
        absmax = tl.load(absmax_ptr + rows, mask=rows * Q < n, other=0.0)
        return unit * absmax[:, None]
    else:
        return tl.load(values_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_state(value, values_ptr, absmax_ptr, rows, offsets, mask, n,
                Q: tl.constexpr, QUANTIZED: tl.constexpr, SIGNED: tl.constexpr):
    """Store a (rows, Q) fp32 tile: rounded to the buffer's dtype, or as int8 codes with the
    absmax of each row (a block: n is a multiple of Q, so rows are entirely live or dead)."""
    if QUANTIZED:
        absmax = abs_max(value, 1)
        tl.store(absmax_ptr + rows, absmax, mask=rows * Q < n)
        # One IEEE division per block, then a multiply per element; all-zero blocks (and NaN
        # ones, whose absmax already carries the NaN) encode x = 0.
        live = absmax > 0.0
        inverse = tl.where(live, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32),
                                           tl.where(live, absmax, 1.0)), 0.0)
        codes = encode(value * inverse[:, None], SIGNED)
        tl.store(values_ptr + offsets, codes.to(tl.uint8), mask=mask)
    else:
        tl.store(values_ptr + offsets, value.to(values_ptr.dtype.element_ty), mask=mask)


# ---- torch --------------------------------------------------------------------------------------

def encode_torch(x, signed):
    """Codes (uint8) of normalized values x (float32 or float64, any shape), by a search over the
    exact decision boundaries: the definition the Triton encoder is tested against."""
    bounds = (SIGNED_BOUNDS if signed else UNSIGNED_BOUNDS).to(device=x.device, dtype=x.dtype)
    magnitude = x.abs()
    code = torch.searchsorted(bounds, magnitude.contiguous(), right=True)
    code = torch.where(magnitude.isnan(), len(bounds), code)
    if signed:
        code = code | (torch.signbit(x).to(code.dtype) << 7)
    else:
        code = torch.where(magnitude > 0, code.clamp(min=1), code)
    return code.to(torch.uint8)


def _check_blocks(name, x):
    if x.dim() != 1 or x.numel() % Q != 0:
        raise ValueError(f"{name}: the int8 format needs a 1-D tensor of a multiple of {Q} "
                         f"elements, got shape {tuple(x.shape)}")


def quantize(x, signed):
    """Blockwise int8 quantization of x (n,) float32 or float64, n a multiple of Q.

    Returns (codes (n,) uint8, absmax (n / Q,) of x's dtype): absmax_b = max |x_i| over block b
    (NaN if the block holds one), codes_i = encode(x_i * (1 / absmax_b)), or of 0 where absmax
    is 0 or NaN. signed: the first moment / momentum code; unsigned: second moment / sum.
    """
    _check_blocks("x", x)
    blocks = x.view(-1, Q)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return encode_torch(blocks * inverse[:, None], signed).view(-1), absmax


def dequantize(codes, absmax, signed):
    """Values (n,) of int8 codes (n,) uint8 with absmax (n / Q,): VALUES[code] * absmax of the
    block, in absmax's dtype (float32, or float64 for references)."""
    _check_blocks("codes", codes)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes: expected dtype torch.uint8, got {codes.dtype}")
    if absmax.shape != (codes.numel() // Q,):
        raise ValueError(f"absmax: expected shape ({codes.numel() // Q},), got {tuple(absmax.shape)}")
    table = VALUES.to(device=codes.device, dtype=absmax.dtype)
    index = codes.long() + (0 if signed else UNSIGNED_OFFSET)
    return (table[index].view(-1, Q) * absmax[:, None]).view(-1)


class StateBuffer:
    """One state buffer of an update in its format, for validation and for the torch path:
    values (n,) fp32 / bf16, or uint8 codes with absmax (n / Q,) fp32. values None: absent
    (SGD without momentum)."""

    def __init__(self, name, values, absmax, signed):
        self.name, self.values, self.absmax, self.signed = name, values, absmax, signed

    @property
    def quantized(self):
        return self.values is not None and self.values.dtype == torch.uint8

    def load(self):
        """The state as a new fp32 tensor."""
        if self.quantized:
            return dequantize(self.values, self.absmax, self.signed)
        return self.values.to(torch.float32, copy=True)

    def store(self, value):
        """Write fp32 `value` back in the buffer's format."""
        if self.quantized:
            codes, absmax = quantize(value, self.signed)
            self.values.copy_(codes)
            self.absmax.copy_(absmax)
        else:
            self.values.copy_(value)
