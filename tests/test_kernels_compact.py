"""Compact optimizer state: the int8 code, blockwise quantize/dequantize, and every family's
kernel with bf16 and int8 moments and with fp32-master, Kahan or no master weights, checked step
by step against the float64 references of hift_rt.families, element by element; the format
conversions of hift_rt.families; Kahan compensation against plain low-precision updates.

Targets as in test_kernels.py: the Triton kernels in the interpreter, the torch path, and CUDA.

How int8 states are checked. The kernel stores code(x) with x = v / absmax in fp32, the reference
has the exact v. The kernel's fp32 v differs from it by rounding (bounded by `fp32_error`), so for
each element the reference decides the code from x_ref = v_ref / absmax_kernel over the interval
x_ref +- tol (tol = fp32_error / absmax + the rounding of x itself): where the whole interval
falls on one code, the kernel's code must be exactly that code; where a decision boundary lies
inside it (a fraction of a percent of the elements, asserted), the kernel's code must be one of
the codes the interval reaches. The block's absmax must be within fp32_error of the reference's.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from hift_rt.families import FAMILIES, SIGNED, Field, bytes_per_element, slice_state
from hift_rt.kernels import Q, adamw_update, dequantize, quantization, quantize, sgd_update
from test_kernels import (  # noqa: F401 (target is a fixture)
    DEFAULT_OPTIONS, MANTISSA_BITS, Case, assert_within, fp32_budget, random_inputs, rounding_ulps, target,
    ulp,
)

INT8_SIZE = 2 * 2048 + 3 * Q  # int8: 3 programs of 2048, the last one with 3 of its 16 blocks
BF16_SIZE = 2 * 1024 + 37  # bf16: 3 programs of 1024, the last one partial, n not a multiple of 16
STEPS = 3


# ---- the code ----------------------------------------------------------------------------------

def magnitudes(signed):
    values = quantization.VALUES
    return values[:128] if signed else values[256:]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_values(signed):
    mags = magnitudes(signed)
    assert mags[0] == 0.0 and mags[-1] == 1.0
    assert (mags[1:] > mags[:-1]).all()
    assert mags[1] == (2.0**-22 if signed else 2.0**-26)
    assert torch.equal(mags.float().double(), mags)  # exact in fp32
    # relative spacing at the top: 1/16 (signed) or 1/32 (unsigned) of the value
    assert mags[-1] - mags[-2] == (2.0**-5 if signed else 2.0**-6)
    if signed:
        assert torch.equal(quantization.VALUES[128:256], -mags)
    bounds = quantization.SIGNED_BOUNDS if signed else quantization.UNSIGNED_BOUNDS
    assert torch.equal(bounds[1:], (mags[1:-1] + mags[2:]) / 2)
    assert torch.equal(quantization.encode_torch(mags, signed).long(), torch.arange(len(mags)))


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, n, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(codes_ptr + offsets, quantization.encode(x, SIGNED), mask=mask)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_triton_encoder_matches_the_boundaries(signed, target):
    """The bit-level encoder against the search over the exact boundaries: on every boundary
    and its two fp32 neighbours each side, every code value, random values over all binades,
    and the special values."""
    if target.name == "torch":
        pytest.skip("the encoder is Triton code")
    bounds = (quantization.SIGNED_BOUNDS if signed else quantization.UNSIGNED_BOUNDS).float()
    down, up = torch.tensor(0.0), torch.tensor(2.0)
    below, above = torch.nextafter(bounds, down), torch.nextafter(bounds, up)
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([bounds, below, torch.nextafter(below, down), above, torch.nextafter(above, up),
                   magnitudes(signed).float(),
                   torch.exp2(-30 * torch.rand(20000, generator=generator)),
                   torch.tensor([0.0, 1.0, 1.0000001, 1e-30, 1e-40, 2.0**-149, math.inf, math.nan])])
    if signed:
        x = torch.cat([x, -x, torch.tensor([-0.0])])
    x = x.to(target.device)
    codes = torch.empty(x.numel(), dtype=torch.int32, device=target.device)
    _encode_kernel[(triton.cdiv(x.numel(), 1024),)](x, codes, x.numel(), SIGNED=signed, BLOCK=1024)
    expected = quantization.encode_torch(x, signed).int()
    wrong = (codes != expected).nonzero().flatten()
    assert wrong.numel() == 0, (x[wrong[:5]], codes[wrong[:5]], expected[wrong[:5]])


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_round_trip(signed):
    generator = torch.Generator().manual_seed(1)
    n = 64 * Q
    # blocks of very different scales, heavy tails inside each block
    x = torch.randn(n, generator=generator) * torch.exp(4 * torch.randn(n // Q, 1, generator=generator)
                                                       ).expand(-1, Q).reshape(-1)
    x = x * torch.exp(torch.randn(n, generator=generator))
    if not signed:
        x = x * x
    x[:Q] = 0.0  # an all-zero block
    codes, absmax = quantize(x, signed)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32 and absmax.shape == (n // Q,)
    assert torch.equal(absmax, x.view(-1, Q).abs().amax(1))
    assert (codes[:Q] == 0).all()
    back = dequantize(codes, absmax, signed)
    # the largest element of each block is exact
    top = x.view(-1, Q).abs().argmax(1) + torch.arange(0, n, Q)
    assert torch.equal(back[top], x[top])
    # elsewhere: within half the larger gap to a neighbouring code value, relative to the
    # absmax (the bottom codes: whatever flushes to them), plus the fp32 rounding of x and of the
    # product
    mags = magnitudes(signed)
    gaps = mags[1:] - mags[:-1]
    allowed = torch.maximum(torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]])) / 2
    allowed[0] = 0.75 * mags[1]  # the signed code's zero takes magnitudes below 0.75 * mags[1]
    allowed[1] = mags[1]  # the unsigned code's smallest value takes every positive magnitude below
    error_bound = allowed[codes.long() % 128 if signed else codes.long()]
    scale = absmax.repeat_interleave(Q).double()
    budget = error_bound * scale + 2.0**-22 * x.abs().double()
    assert ((back.double() - x.double()).abs() <= budget).all()
    # a positive second moment never reads back as 0
    if not signed:
        assert (back[x > 0] > 0).all()
    # float64 quantize: the reference's
    codes64, absmax64 = quantize(x.double(), signed)
    assert absmax64.dtype == torch.float64 and torch.equal(absmax64, absmax.double())


def test_quantize_nan_block():
    x = torch.ones(3 * Q)
    x[Q + 5] = math.nan
    codes, absmax = quantize(x, True)
    assert absmax[1].isnan() and absmax[[0, 2]].eq(1.0).all()
    back = dequantize(codes, absmax, True)
    assert back[Q:2 * Q].isnan().all() and back[:Q].eq(1.0).all() and back[2 * Q:].eq(1.0).all()


@pytest.mark.parametrize("call, error, match", [
    (lambda: quantize(torch.zeros(100), True), ValueError, "^x: .*multiple of 128"),
    (lambda: quantize(torch.zeros(2, Q), True), ValueError, "^x:"),
    (lambda: dequantize(torch.zeros(Q), torch.zeros(1), True), TypeError, "^codes:"),
    (lambda: dequantize(torch.zeros(Q, dtype=torch.uint8), torch.zeros(2), True), ValueError, "^absmax:"),
], ids=["size", "2d", "dtype", "absmax"])
def test_quantization_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---- every family, format and kind of weights, step by step -----------------------------------

FAMILY_CASES = {
    "adamw": DEFAULT_OPTIONS["adamw"],
    "adam": dict(lr=1e-2, weight_decay=0.1, maximize=True),
    "adagrad": dict(DEFAULT_OPTIONS["adagrad"], lr_decay=0.01),
    "sgd": DEFAULT_OPTIONS["sgd"],
    "sgd-nesterov": dict(lr=1e-2, momentum=0.8, nesterov=True, weight_decay=0.01),
}
WEIGHTS = {  # param dtype, master
    "fp32": (torch.float32, None),
    "bf16-master": (torch.bfloat16, "fp32"),
    "bf16-kahan": (torch.bfloat16, "kahan"),
    "bf16-none": (torch.bfloat16, None),
    "fp16-kahan": (torch.float16, "kahan"),
}


def make_state(case, fields, init, param):
    """The state in the format of `fields` from the family's initial state (SGD's buffer is NaN:
    step 1 must not read it; Adagrad's sum starts at initial_accumulator_value), with an fp32
    master of the exact initial weights."""
    state_fp32 = case.initial_state(init.numel(), init.device)
    state_fp32["master"] = init.clone()
    return case.family.to_format(state_fp32, fields, param)


def fp32_error(old, new):
    """A bound on |fp32 value - exact value| of a moment updated from `old` to `new` (float64):
    a few roundings of the operands and of the result, 2^-21 of their sum."""
    old = torch.nan_to_num(old, nan=0.0)
    return 2.0**-21 * (old.abs() + new.abs() + (new - old).abs())


def check_int8(name, codes, absmax, old, new, signed):
    """The kernel's codes and absmax against the exact new values (see the module docstring)."""
    error = fp32_error(old, new).view(-1, Q)
    absmax_ref = new.view(-1, Q).abs().amax(1)
    assert ((absmax.double() - absmax_ref).abs() <= error.amax(1)).all(), f"{name}_absmax"
    scale = absmax.double()[:, None]
    x = (new.view(-1, Q) / scale).view(-1)
    tol = (error / scale).view(-1) + 2.0**-22 * x.abs()
    low, high = quantization.encode_torch(x - tol, signed), quantization.encode_torch(x + tol, signed)
    exact = low == high
    assert torch.equal(codes[exact], low[exact]), f"{name}: codes differ away from a boundary"
    table = quantization.VALUES.to(codes.device)[0 if signed else quantization.UNSIGNED_OFFSET:]
    values, low_value, high_value = table[codes.long()], table[low.long()], table[high.long()]
    near = ~exact
    assert ((low_value[near] <= values[near]) & (values[near] <= high_value[near])).all(), name
    assert near.double().mean() < 0.01, f"{name}: {near.sum()} codes near a boundary"


def check_weights(dtype, master, param, state, expected, start, target):
    budget = fp32_budget(expected, start, 1)
    if dtype == torch.float32:
        assert_within(param, expected, budget, "param")
        return
    r = rounding_ulps(target, dtype)
    if master == "fp32":
        assert_within(state["master"], expected, budget, "master")
        assert_within(param, state["master"].double(), r * ulp(state["master"].double(), dtype), "param")
    elif master == "kahan":
        compensation = state["compensation"].double()
        assert_within(param.double() + compensation, expected, r * ulp(compensation, dtype) + budget,
                      "param + compensation")
        assert_within(param, expected, r * ulp(expected, dtype) + budget, "param")
    else:
        assert_within(param, expected, r * ulp(expected, dtype) + budget, "param")


def step_and_check(case, fields, param, grad, state, step, target, **extra):
    """One update against the float64 reference from the same state: weights, then each moment
    (bf16 within half an ulp (a whole one when the interpreter truncates) plus the fp32 error;
    int8 by check_int8)."""
    dtype = param.dtype
    master = {"master": "fp32", "compensation": "kahan"}.get(fields[-1].name) if fields else None
    old = case.family.to_fp32(state, fields, param, dtype=torch.float64)
    start = old.get("master", param.double())
    expected, expected_state = case.reference(param, grad, state, step, **extra)
    case.update(param, grad, state, step, **extra)
    check_weights(dtype, master, param, state, expected, start, target)
    for key, new in expected_state.items():
        if state[key].dtype == torch.uint8:
            check_int8(key, state[key], state[key + "_absmax"], old[key], new, SIGNED[key])
        else:
            budget = rounding_ulps(target, torch.bfloat16) * ulp(new, torch.bfloat16) + fp32_error(old[key], new)
            assert_within(state[key], new, budget, f"{key}, step {step}")


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
@pytest.mark.parametrize("name", FAMILY_CASES)
def test_compact_step_matches_reference(name, state_dtype, weights, target):
    case = Case.of(name.split("-")[0], FAMILY_CASES[name])
    dtype, master = WEIGHTS[weights]
    if master == "kahan" and dtype == torch.float16 and name not in ("adamw", "sgd"):
        pytest.skip("fp16 Kahan runs for two families; the weights code is shared")
    n = INT8_SIZE if state_dtype == "int8" else BF16_SIZE
    fields = case.family.fields(case.options, state_dtype, master, dtype)
    init, grads = random_inputs(n, STEPS, dtype, target.device)
    param = init.to(dtype)
    state = make_state(case, fields, init, param)
    clip_coef = torch.tensor([0.7], device=target.device)
    for step, grad in enumerate(grads, start=1):
        step_and_check(case, fields, param, grad, state, step, target, decay_end=1500,
                       clip_coef=clip_coef)


@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_compact_big_buffer(state_dtype, target):
    """Many programs: 64 Ki + 3 blocks of AdamW with Kahan weights, two steps."""
    case = Case.of("adamw", DEFAULT_OPTIONS["adamw"])
    n = 2**16 + 3 * Q
    fields = case.family.fields(case.options, state_dtype, "kahan", torch.bfloat16)
    init, grads = random_inputs(n, 2, torch.bfloat16, target.device)
    param = init.to(torch.bfloat16)
    state = make_state(case, fields, init, param)
    for step, grad in enumerate(grads, start=1):
        step_and_check(case, fields, param, grad, state, step, target)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
def test_int8_nan_and_inf_stay_in_their_blocks(target):
    """A NaN or inf gradient element: its param becomes non-finite as with fp32 state, its
    block's absmax becomes non-finite, and the other blocks are untouched by it."""
    case = Case.of("adamw", DEFAULT_OPTIONS["adamw"])
    n = INT8_SIZE
    fields = case.family.fields(case.options, "int8", "fp32", torch.bfloat16)
    init, grads = random_inputs(n, 2, torch.bfloat16, target.device)
    param = init.to(torch.bfloat16)
    state = make_state(case, fields, init, param)
    grads[1][[5, 3000]] = math.nan
    grads[1][300] = math.inf
    for step, grad in enumerate(grads, start=1):
        case.update(param, grad, state, step)
    bad_blocks = torch.tensor([0, 2, 3000 // Q])
    assert not param[[5, 300, 3000]].isfinite().any()
    for key in ("exp_avg", "exp_avg_sq"):
        absmax = state[key + "_absmax"]
        assert not absmax[bad_blocks].isfinite().any()
        good = torch.ones(n // Q, dtype=torch.bool)
        good[bad_blocks] = False
        assert absmax[good].isfinite().all()
    finite = torch.ones(n, dtype=torch.bool)
    finite[[5, 300, 3000]] = False
    assert param[finite].isfinite().all()


# ---- Kahan compensation ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kahan_tracks_float64_where_plain_updates_stall(dtype, target):
    """100 AdamW steps of about 2e-4 each on weights in [1.1, 1.9], where half an ulp is 2^-8
    (bf16) or 2^-11 (fp16): plain updates lose (or, truncating, overdo) them; param +
    compensation must track the float64 trajectory within the rounding of the compensation
    (r ulp of a value below r ulp of the weight, per step), and plain updates must miss that
    budget by far."""
    case = Case.of("adamw", dict(lr=2e-4, weight_decay=0.0))
    n, steps = 256, 100
    generator = torch.Generator().manual_seed(3)
    init = (1.1 + 0.8 * torch.rand(n, generator=generator)).to(dtype).float().to(target.device)
    direction = torch.randn(n, generator=generator).to(target.device)
    grads = [(direction + 0.1 * torch.randn(n, generator=generator).to(target.device)).to(dtype)
             for _ in range(steps)]
    expected, expected_state = init.double(), case.initial_state(n, target.device)
    for step, grad in enumerate(grads, start=1):
        expected, expected_state = case.reference(expected, grad, expected_state, step)
    errors = {}
    for master in ("kahan", None):
        fields = case.family.fields(case.options, "fp32", master, dtype)
        param = init.to(dtype)
        state = make_state(case, fields, init, param)
        for step, grad in enumerate(grads, start=1):
            case.update(param, grad, state, step)
        weight = param.double() + (state["compensation"].double() if master else 0.0)
        errors[master] = (weight - expected).abs().max().item()
    # per step: r ulp of the compensation, itself below r ulp of the weight (ulp(x) <= 2^-m |x|,
    # m mantissa bits), plus the fp32 update's own rounding
    r = rounding_ulps(target, dtype)
    weight_ulp = ulp(torch.tensor(1.9, dtype=torch.float64), dtype).item()
    budget = steps * (r * r * 2.0 ** -MANTISSA_BITS[dtype] * weight_ulp + 2.0**-20)
    assert errors["kahan"] <= budget, errors
    assert errors[None] > 5 * budget, errors  # measured: 12x (bf16) and 170x (fp16) on the torch path


# ---- hift_rt.families: fields and conversions -------------------------------------------------

def test_host_bytes_per_parameter_targets():
    adamw = FAMILIES["adamw"]
    options = adamw.options({})
    assert bytes_per_element(adamw.fields(options, "int8", "kahan", torch.bfloat16)) <= 4.1
    assert bytes_per_element(adamw.fields(options, "int8", "fp32", torch.bfloat16)) <= 6.1
    assert bytes_per_element(adamw.fields(options, "fp32", "fp32", torch.bfloat16)) == 12
    assert adamw.fields(options, "int8", "kahan", torch.bfloat16) == [
        Field("exp_avg", torch.uint8, 1), Field("exp_avg_absmax", torch.float32, Q),
        Field("exp_avg_sq", torch.uint8, 1), Field("exp_avg_sq_absmax", torch.float32, Q),
        Field("compensation", torch.bfloat16, 1)]
    sgd = FAMILIES["sgd"]
    assert sgd.fields(sgd.options({}), "int8") == []  # no momentum, no state


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("master", [None, "fp32", "kahan"])
@pytest.mark.parametrize("name", ["adamw", "adagrad", "sgd"])
def test_format_conversions(name, state_dtype, master):
    family = FAMILIES[name]
    options = family.options({"momentum": 0.9} if name == "sgd" else {})
    n = 4 * Q
    dtype = torch.float32 if master is None else torch.bfloat16
    generator = torch.Generator().manual_seed(2)
    moments = {key: torch.randn(n, generator=generator) ** (1 if SIGNED[key] else 2)
               for key in family.state_names(options)}
    exact = torch.randn(n, generator=generator)
    param = exact.to(dtype)
    fields = family.fields(options, state_dtype, master, dtype)
    state = family.to_format({**moments, "master": exact}, fields, param)
    assert list(state) == [f.name for f in fields]
    for f in fields:
        assert state[f.name].dtype == f.dtype and state[f.name].shape == (n // f.per,)
    back = family.to_fp32(state, fields, param)
    for key, value in moments.items():
        if state_dtype == "int8":
            codes, absmax = quantize(value, SIGNED[key])
            assert torch.equal(back[key], dequantize(codes, absmax, SIGNED[key]))
        else:
            assert torch.equal(back[key], value.to(fields[0].dtype).float())
    if master == "fp32":
        assert torch.equal(back["master"], exact)
    elif master == "kahan":
        assert torch.equal(state["compensation"], (exact - param.float()).to(dtype))
        # param + compensation: about 16 significant bits of the fp32 master
        assert ((back["master"] - exact).abs() <= 2.0**-16 * exact.abs()).all()
    else:
        assert "master" not in back
    # without a master in the fp32 state, the param is the master
    state = family.to_format(moments, fields, param)
    if master == "fp32":
        assert torch.equal(state["master"], param.float())
    elif master == "kahan":
        assert not state["compensation"].any()


def test_chunks_of_an_int8_state_update_like_the_whole(target):
    """Two chunks of whole blocks, updated one after the other, give the same bits as one
    update over the whole buffer (each block's absmax is its own); a chunk that cuts a block is
    refused."""
    case = Case.of("adamw", DEFAULT_OPTIONS["adamw"])
    n = 6 * Q
    fields = case.family.fields(case.options, "int8", "kahan", torch.bfloat16)
    init, (grad,) = random_inputs(n, 1, torch.bfloat16, target.device)
    results = []
    for cuts in ([0, n], [0, 2 * Q, n]):
        param = init.to(torch.bfloat16)
        state = make_state(case, fields, init, param)
        for start, end in zip(cuts, cuts[1:]):
            case.update(param[start:end], grad[start:end], slice_state(state, fields, start, end), 1)
        results.append([param, *state.values()])
    for whole, chunked in zip(*results):
        assert torch.equal(whole, chunked)
    with pytest.raises(ValueError, match="^exp_avg_absmax: the chunk \\[64, 384\\)"):
        slice_state(state, fields, Q // 2, 3 * Q)


def test_update_takes_master_from_state_or_keyword():
    family = FAMILIES["adamw"]
    options = family.options({})
    init, (grad,) = random_inputs(256, 1, torch.bfloat16, torch.device("cpu"))
    results = []
    for in_state in (True, False):
        param, master = init.to(torch.bfloat16), init.clone()
        state = family.initial_state(256, "cpu", options)
        if in_state:
            family.update(param, grad, {**state, "master": master}, step=1, lr=1e-2, options=options)
        else:
            family.update(param, grad, state, step=1, lr=1e-2, options=options, master=master)
        results.append((param, master, state["exp_avg"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("call, error, match", [
    (lambda f, o: f.fields(o, "int4"), ValueError, "^state_dtype:"),
    (lambda f, o: f.fields(o, "int8", "fp16", torch.bfloat16), ValueError, "^master:"),
    (lambda f, o: f.fields(o, "int8", "kahan", torch.float32), ValueError, "^master:.*own master"),
    (lambda f, o: f.update(torch.zeros(Q), torch.zeros(Q), {"exp_avg": torch.zeros(Q), "exp_avg_sq": torch.zeros(Q),
                                                          "sum": torch.zeros(Q)}, step=1, lr=1.0, options=o),
     ValueError, "^state: .*'sum'"),
    (lambda f, o: f.update(torch.zeros(Q, dtype=torch.bfloat16), torch.zeros(Q, dtype=torch.bfloat16),
                           {"exp_avg": torch.zeros(Q), "exp_avg_sq": torch.zeros(Q), "master": torch.zeros(Q)},
                           step=1, lr=1.0, options=o, master=torch.zeros(Q)), ValueError, "^master: given both"),
    (lambda f, o: f.to_format(f.initial_state(100, "cpu", o), f.fields(o, "int8"), torch.zeros(100)),
     ValueError, "^exp_avg: .*multiple of 128"),
], ids=["state_dtype", "master", "fp32-master", "unknown-field", "master-twice", "int8-size"])
def test_families_bad_input(call, error, match):
    family = FAMILIES["adamw"]
    with pytest.raises(error, match=match):
        call(family, family.options({}))


# ---- the kernels' compact arguments: bad input -------------------------------------------------

def valid_compact_call(n=2 * Q):
    u8 = lambda: torch.zeros(n, dtype=torch.uint8)  # noqa: E731
    return dict(param=torch.zeros(n, dtype=torch.bfloat16), grad=torch.zeros(n, dtype=torch.bfloat16),
                exp_avg=u8(), exp_avg_sq=u8(), exp_avg_absmax=torch.zeros(n // Q),
                exp_avg_sq_absmax=torch.zeros(n // Q), step=1, lr=1e-3)


COMPACT_BAD_INPUTS = [
    (dict(exp_avg_absmax=None), ValueError, "exp_avg_absmax"),
    (dict(exp_avg_sq_absmax=torch.zeros(3)), ValueError, "exp_avg_sq_absmax"),
    (dict(exp_avg_absmax=torch.zeros(2, dtype=torch.float64)), TypeError, "exp_avg_absmax"),
    (dict(exp_avg_absmax=torch.zeros(4)[::2]), ValueError, "exp_avg_absmax"),
    (dict(exp_avg=torch.zeros(2 * Q), exp_avg_absmax=None), TypeError, "exp_avg_sq"),
    (dict(exp_avg=torch.zeros(2 * Q), exp_avg_sq=torch.zeros(2 * Q)), ValueError, "exp_avg_absmax"),
    (dict(exp_avg=torch.zeros(2 * Q, dtype=torch.bfloat16), exp_avg_sq=torch.zeros(2 * Q),
          exp_avg_absmax=None, exp_avg_sq_absmax=None), TypeError, "exp_avg_sq"),
    (dict(param=torch.zeros(100, dtype=torch.bfloat16), grad=torch.zeros(100, dtype=torch.bfloat16),
          exp_avg=torch.zeros(100, dtype=torch.uint8), exp_avg_sq=torch.zeros(100, dtype=torch.uint8)),
     ValueError, "exp_avg"),
    (dict(compensation=torch.zeros(2 * Q)), TypeError, "compensation"),
    (dict(compensation=torch.zeros(Q, dtype=torch.bfloat16)), ValueError, "compensation"),
    (dict(compensation=torch.zeros(2 * Q, dtype=torch.bfloat16), master=torch.zeros(2 * Q)), ValueError,
     "compensation"),
    (dict(param=torch.zeros(2 * Q), grad=torch.zeros(2 * Q), compensation=torch.zeros(2 * Q)), ValueError,
     "compensation"),
]


@pytest.mark.parametrize("change, error, name", COMPACT_BAD_INPUTS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in enumerate(COMPACT_BAD_INPUTS)])
def test_compact_bad_input_raises(change, error, name):
    arguments = valid_compact_call()
    arguments.update(change)
    with pytest.raises(error, match=f"^{name}:"):
        adamw_update(**arguments)


def test_sgd_int8_buffer_needs_its_absmax():
    with pytest.raises(ValueError, match="^momentum_buffer_absmax:"):
        sgd_update(torch.zeros(Q), torch.zeros(Q), torch.zeros(Q, dtype=torch.uint8), lr=0.1, momentum=0.9)
