"""Update kernels against torch.optim and against their float64 references.

Every check runs on each target: "interpreter" (CPU tensors through the Triton kernels in
Triton's interpreter, when conftest set TRITON_INTERPRET=1), "torch" (CPU tensors through the
torch path) and "cuda" (compiled Triton; skipped without a GPU). The CPU path is picked by setting
hift_rt.kernels._common.TRITON_ON_CPU, the switch the dispatch reads at call time. Without a GPU,
one more test compiles every kernel variant for sm_90 and checks the width of its memory accesses.
"""
import math
from dataclasses import dataclass

import pytest
import torch

from hift_rt.families import FAMILIES
from hift_rt.kernels import _common, adagrad_update, adamw_update, grad_norm, grad_norm_ref, sgd_update
from sm90 import compile_for_sm90

SIZES = [1, 7, 1023, 1025, 4097]
BIG = 2**16 + 3  # 65 programs; the interpreter is slow, so only a few checks use it
STEPS = 6


@dataclass
class Target:
    name: str  # "interpreter", "torch" or "cuda"
    device: torch.device


@pytest.fixture(params=["interpreter", "torch", pytest.param("cuda", marks=pytest.mark.cuda)])
def target(request, monkeypatch):
    if request.param == "cuda":
        return Target("cuda", torch.device("cuda"))
    if request.param == "interpreter" and not _common.TRITON_ON_CPU:
        pytest.skip("TRITON_INTERPRET=1 was not set before hift_rt.kernels was imported")
    monkeypatch.setattr(_common, "TRITON_ON_CPU", request.param == "interpreter")
    return Target(request.param, torch.device("cpu"))


# ---- the cases, in torch's option names (lr apart) -----------------------------------------

DEFAULT_OPTIONS = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "adam": dict(lr=1e-2, weight_decay=0.1),
    "adagrad": dict(lr=1e-2, weight_decay=0.1, initial_accumulator_value=0.1),
    "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
}

TORCH_CASES = [
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.05, maximize=True)),
    ("adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, maximize=True)),
    ("adagrad", dict(lr=1e-2)),
    ("adagrad", dict(lr=1e-2, lr_decay=0.05, weight_decay=0.1)),
    ("adagrad", dict(lr=1e-2, initial_accumulator_value=0.5, eps=1e-6, maximize=True)),
    ("sgd", dict(lr=1e-2)),
    ("sgd", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=1e-2, momentum=0.9)),
    ("sgd", dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", dict(lr=1e-2, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True)),
]


def case_id(case):
    family, given = case
    return family + "-" + "-".join(f"{k}={v}" for k, v in given.items() if k != "lr")


@dataclass
class Case:
    """A family with resolved options: `family` from hift_rt.families, torch's `options`, `lr`."""
    name: str
    lr: float
    options: dict

    @property
    def family(self):
        return FAMILIES[self.name]

    @staticmethod
    def of(name, given):
        family = FAMILIES[name]
        return Case(name, given["lr"], family.options({k: v for k, v in given.items() if k != "lr"}))

    def initial_state(self, n, device):
        """The family's initial fp32 state; SGD's buffer is NaN: the first step must write it
        without reading it."""
        state = self.family.initial_state(n, device, self.options)
        if "momentum_buffer" in state:
            state["momentum_buffer"].fill_(math.nan)
        return state

    def update(self, param, grad, state, step, **extra):
        self.family.update(param, grad, state, step=step, lr=self.lr, options=self.options, **extra)

    def reference(self, param, grad, state, step, **extra):
        return self.family.reference(param, grad, state, step=step, lr=self.lr,
                                     options=self.options, **extra)


def random_inputs(n, steps, dtype, device, seed=0):
    """Initial weights (fp32) and one gradient per step, of `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    init = torch.randn(n, generator=generator)
    grads = [torch.randn(n, generator=generator).to(dtype) for _ in range(steps)]
    return init.to(device), [g.to(device) for g in grads]


def run_torch_optim(case, init, grads, decay_end=None, clip=1.0):
    """torch.optim (foreach=False) over `init` cut at decay_end into two parameter groups, the
    head with the weight decay and the tail without; returns (param, {name: state})
    concatenated."""
    options = dict(case.options)
    weight_decay = options.pop("weight_decay")
    cut = init.numel() if decay_end is None else decay_end
    head, tail = init[:cut].clone().requires_grad_(), init[cut:].clone().requires_grad_()
    groups = [{"params": [head], "weight_decay": weight_decay},
              {"params": [tail], "weight_decay": 0.0}]
    optimizer = case.family.torch_class(groups, lr=case.lr, foreach=False, **options)
    for grad in grads:
        head.grad, tail.grad = (grad * clip)[:cut].clone(), (grad * clip)[cut:].clone()
        optimizer.step()
    states = {key: torch.cat([optimizer.state[head][key], optimizer.state[tail][key]])
              for key in case.family.state_names(case.options)}
    return torch.cat([head.detach(), tail.detach()]), states


def run_ours(case, param, state, grads, **extra):
    for step, grad in enumerate(grads, start=1):
        case.update(param, grad, state, step, **extra)


def assert_close_fp32(actual, expected, equal_nan=False):
    """rtol 1e-5, plus an atol of 1e-6 of the tensor's largest finite value: an element that
    came out of a cancellation (m + (1 - beta1) * (g - m) near 0) carries the rounding of the
    operands, which torch may apply differently (fused multiply-add or not)."""
    scale = expected[expected.isfinite()].abs().max() if expected.isfinite().any() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(scale) + 1e-12,
                               equal_nan=equal_nan)


def assert_matches_torch(case, target, n, decay_end=None, clip=None):
    init, grads = random_inputs(n, STEPS, torch.float32, target.device)
    param = init.clone()
    state = case.initial_state(n, target.device)
    clip_coef = None if clip is None else torch.tensor([clip], device=target.device)
    run_ours(case, param, state, grads, decay_end=decay_end, clip_coef=clip_coef)
    expected_param, expected_state = run_torch_optim(
        case, init, grads, decay_end, 1.0 if clip is None else clip)
    assert_close_fp32(param, expected_param)
    assert state.keys() == expected_state.keys()
    for key in state:
        assert_close_fp32(state[key], expected_state[key])


# ---- against torch.optim, fp32 -------------------------------------------------------------

@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_matches_torch_optim(case, target):
    assert_matches_torch(Case.of(*case), target, n=1025)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sizes(family, n, target):
    assert_matches_torch(Case.of(family, DEFAULT_OPTIONS[family]), target, n)


@pytest.mark.parametrize("family", FAMILIES)
def test_big_buffer(family, target):
    assert_matches_torch(Case.of(family, DEFAULT_OPTIONS[family]), target, BIG)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decay_end(family, where, target):
    n = 1025
    decay_end = {"start": 0, "middle": 600, "end": n}[where]
    assert_matches_torch(Case.of(family, DEFAULT_OPTIONS[family]), target, n, decay_end)


@pytest.mark.parametrize("family", FAMILIES)
def test_clip_coef(family, target):
    assert_matches_torch(Case.of(family, DEFAULT_OPTIONS[family]), target, n=1025, clip=0.37)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_nan_and_inf_in_grad_propagate_as_in_torch(family, target):
    case = Case.of(family, DEFAULT_OPTIONS[family])
    n = 1025
    init, grads = random_inputs(n, 3, torch.float32, target.device)
    grads[1][[3, 1024]] = math.nan
    grads[1][700] = math.inf
    param, state = init.clone(), case.initial_state(n, target.device)
    run_ours(case, param, state, grads)
    expected_param, expected_state = run_torch_optim(case, init, grads)
    assert not param[[3, 700, 1024]].isfinite().any()
    assert_close_fp32(param, expected_param, equal_nan=True)
    for key in state:
        assert_close_fp32(state[key], expected_state[key], equal_nan=True)


# ---- bf16 / fp16 against the float64 references ----------------------------------------------
#
# Error budget. fp32 math: one update is ~10 fp32 operations on values no larger than the step
# (each <= 0.5 ulp, 2^-24 relative), plus the store of the fp32 weight (<= 0.5 ulp of |w|, i.e.
# 2^-24 |w|). Per step and element we allow 2^-23 |w| + 2^-20 * (largest displacement of any
# element), k times over k steps; fp32 state gets 2^-21 of its largest value per step.
# Rounding to bf16/fp16: <= 0.5 ulp (round to nearest even, as on a GPU and in torch); the
# interpreter truncates fp32 -> bf16 toward zero, so there it is < 1 ulp.

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def ulp(x, dtype):
    """Spacing of `dtype` numbers at |x| (float64 tensor)."""
    exponent = torch.frexp(x.abs()).exponent.double()
    finfo = torch.finfo(dtype)
    return torch.clamp(2.0 ** (exponent - 1 - MANTISSA_BITS[dtype]), min=finfo.tiny * finfo.eps)


def rounding_ulps(target, dtype):
    return 1.0 if target.name == "interpreter" and dtype == torch.bfloat16 else 0.5


def fp32_budget(expected, start, steps):
    """Allowed |fp32 result - float64 result| after `steps` updates from `start` (see above)."""
    displacement = (expected - start.double()).abs().max()
    return steps * (2.0**-23 * expected.abs() + 2.0**-20 * displacement)


def assert_within(actual, expected, budget, what):
    error = (actual.double() - expected).abs()
    worst = (error / budget).max().item()
    assert worst <= 1.0, f"{what}: error reaches {worst:.2f} x the budget"


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_with_master(family, dtype, target):
    case = Case.of(family, DEFAULT_OPTIONS[family])
    n, steps = 1025, 5
    init, grads = random_inputs(n, steps, dtype, target.device)
    master, param = init.clone(), init.to(dtype)
    state = case.initial_state(n, target.device)
    run_ours(case, param, state, grads, master=master, decay_end=700)
    expected, expected_state = init.double(), case.initial_state(n, target.device)
    for step, grad in enumerate(grads, start=1):
        expected, expected_state = case.reference(expected, grad, expected_state, step,
                                                  decay_end=700)
    assert_within(master, expected, fp32_budget(expected, init, steps), "master")
    for key in state:
        ref = expected_state[key]
        assert_within(state[key], ref, steps * 2.0**-21 * ref.abs().max(), key)
    # param = round(master): check it against master and, through the budget, against float64.
    r = rounding_ulps(target, dtype)
    assert_within(param, master.double(), r * ulp(master.double(), dtype), "param vs master")
    if r == 0.5:
        assert torch.equal(param, master.to(dtype))
    assert_within(param, expected, r * ulp(expected, dtype)
                  + fp32_budget(expected, init, steps), "param vs float64")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_without_master(family, dtype, target):
    """Each step against the float64 reference from the same inputs: the rounding of the param
    between steps is the kernel's business, not an error to accumulate."""
    case = Case.of(family, DEFAULT_OPTIONS[family])
    n, steps = 1025, 3
    init, grads = random_inputs(n, steps, dtype, target.device)
    param = init.to(dtype)
    state = case.initial_state(n, target.device)
    r = rounding_ulps(target, dtype)
    for step, grad in enumerate(grads, start=1):
        start = param.clone()
        expected, expected_state = case.reference(param, grad, state, step)
        case.update(param, grad, state, step)
        assert_within(param, expected, r * ulp(expected, dtype)
                      + fp32_budget(expected, start, 1), f"param, step {step}")
        for key in state:
            ref = expected_state[key]
            assert_within(state[key], ref, 2.0**-21 * ref.abs().max(), f"{key}, step {step}")


# ---- grad_norm -------------------------------------------------------------------------------

NORMS = [2.0, 1.0, math.inf]


@pytest.mark.parametrize("norm_type", NORMS, ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", SIZES + [BIG])
def test_grad_norm(n, dtype, norm_type, target):
    grad = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(target.device)
    norm = grad_norm(grad, norm_type)
    assert norm.shape == () and norm.dtype == torch.float32 and norm.device == grad.device
    # fp32 accumulation in trees (1024 wide, then over the partials): about log2(n) roundings
    # of 2^-24 each, under 1e-6 relative for these sizes; the max is exact.
    torch.testing.assert_close(norm.double(), grad_norm_ref(grad, norm_type),
                               rtol=0.0 if norm_type == math.inf else 1e-5, atol=0.0)


@pytest.mark.parametrize("norm_type", NORMS, ids=["l2", "l1", "inf"])
def test_grad_norm_nan_and_inf(norm_type, target):
    grad = torch.randn(3000, device=target.device)
    grad[2000] = math.inf
    assert grad_norm(grad, norm_type).item() == math.inf
    grad[100] = math.nan
    assert grad_norm(grad, norm_type).isnan().item()


def test_grad_norm_empty(target):
    assert grad_norm(torch.empty(0, device=target.device)).item() == 0.0


# ---- bad input -------------------------------------------------------------------------------

def valid_call(family, n=8, dtype=torch.float32):
    param, grad = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    if family == "adamw":
        return adamw_update, dict(param=param, grad=grad, exp_avg=torch.zeros(n),
                                  exp_avg_sq=torch.zeros(n), step=1, lr=1e-3)
    if family == "adagrad":
        return adagrad_update, dict(param=param, grad=grad, state_sum=torch.zeros(n), step=1,
                                    lr=1e-3)
    return sgd_update, dict(param=param, grad=grad, momentum_buffer=torch.zeros(n), lr=1e-3,
                            momentum=0.9)


META = torch.device("meta")  # a device other than the CPU that every machine has
BAD_INPUTS = [
    ("adamw", dict(param=[0.0] * 8), TypeError, "param"),
    ("adamw", dict(param=torch.zeros(8, dtype=torch.float64)), TypeError, "param"),
    ("adamw", dict(param=torch.zeros(2, 4)), ValueError, "param"),
    ("adamw", dict(param=torch.zeros(16)[::2]), ValueError, "param"),
    ("adamw", dict(grad=torch.zeros(9)), ValueError, "grad"),
    ("adamw", dict(grad=torch.zeros(8, dtype=torch.bfloat16)), TypeError, "grad"),
    ("adamw", dict(grad=torch.zeros(8, device=META)), ValueError, "grad"),
    ("adamw", dict(exp_avg=torch.zeros(8, dtype=torch.float16)), TypeError, "exp_avg"),
    ("adamw", dict(exp_avg_sq=torch.zeros(7)), ValueError, "exp_avg_sq"),
    ("adamw", dict(exp_avg_sq=torch.zeros(16)[::2]), ValueError, "exp_avg_sq"),
    ("adamw", dict(exp_avg=torch.zeros(8, device=META)), ValueError, "exp_avg"),
    ("adamw", dict(master=torch.zeros(8)), ValueError, "master"),
    ("adamw", dict(step=0), ValueError, "step"),
    ("adamw", dict(step=1.0), TypeError, "step"),
    ("adamw", dict(lr=-1e-3), ValueError, "lr"),
    ("adamw", dict(lr=math.nan), ValueError, "lr"),
    ("adamw", dict(eps=-1e-8), ValueError, "eps"),
    ("adamw", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("adamw", dict(betas=(1.0, 0.999)), ValueError, "betas"),
    ("adamw", dict(betas=(0.9, -0.1)), ValueError, "betas"),
    ("adamw", dict(decay_end=-1), ValueError, "decay_end"),
    ("adamw", dict(decay_end=9), ValueError, "decay_end"),
    ("adamw", dict(clip_coef=0.5), TypeError, "clip_coef"),
    ("adamw", dict(clip_coef=torch.ones(2)), ValueError, "clip_coef"),
    ("adamw", dict(clip_coef=torch.ones(1, dtype=torch.float64)), TypeError, "clip_coef"),
    ("adamw", dict(clip_coef=torch.ones(1, device=META)), ValueError, "clip_coef"),
    ("adagrad", dict(state_sum=torch.zeros(8, dtype=torch.float64)), TypeError, "state_sum"),
    ("adagrad", dict(state_sum=torch.zeros(4)), ValueError, "state_sum"),
    ("adagrad", dict(lr_decay=-0.1), ValueError, "lr_decay"),
    ("adagrad", dict(eps=-1.0), ValueError, "eps"),
    ("adagrad", dict(step=-3), ValueError, "step"),
    ("adagrad", dict(decay_end=100), ValueError, "decay_end"),
    ("sgd", dict(momentum=-0.9), ValueError, "momentum"),
    ("sgd", dict(momentum_buffer=None), ValueError, "momentum_buffer"),
    ("sgd", dict(momentum_buffer=torch.zeros(8, dtype=torch.int8)), TypeError,
     "momentum_buffer"),
    ("sgd", dict(nesterov=True, momentum=0.0, momentum_buffer=None), ValueError, "nesterov"),
    ("sgd", dict(nesterov=True, dampening=0.1), ValueError, "nesterov"),
    ("sgd", dict(lr=-1.0), ValueError, "lr"),
    ("sgd", dict(weight_decay=-1.0), ValueError, "weight_decay"),
]


@pytest.mark.parametrize("family, change, error, name", BAD_INPUTS,
                         ids=[f"{f}-{next(iter(c))}-{i}" for i, (f, c, _, _) in
                              enumerate(BAD_INPUTS)])
def test_bad_input_raises(family, change, error, name):
    update, arguments = valid_call(family)
    arguments.update(change)
    with pytest.raises(error, match=f"^{name}:"):
        update(**arguments)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_master(family):
    update, arguments = valid_call(family, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="^master:"):
        update(**arguments, master=torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="^master:"):
        update(**arguments, master=torch.zeros(9))


@pytest.mark.parametrize("grad, norm_type, error, name", [
    (torch.zeros(8), 3.0, ValueError, "norm_type"),
    (torch.zeros(8), 0.0, ValueError, "norm_type"),
    (torch.zeros(8), "fro", TypeError, "norm_type"),
    (torch.zeros(2, 4), 2.0, ValueError, "grad"),
    (torch.zeros(16)[::2], 2.0, ValueError, "grad"),
    (torch.zeros(8, dtype=torch.int32), 2.0, TypeError, "grad"),
], ids=["3", "0", "fro", "2d", "strided", "int"])
def test_grad_norm_bad_input_raises(grad, norm_type, error, name):
    with pytest.raises(error, match=f"^{name}:"):
        grad_norm(grad, norm_type)


def test_sgd_without_momentum_leaves_a_given_buffer_alone(target):
    buffer = torch.full((7,), 3.0, device=target.device)
    sgd_update(torch.zeros(7, device=target.device), torch.ones(7, device=target.device), buffer,
               lr=0.1, first_step=True)
    assert torch.equal(buffer, torch.full((7,), 3.0, device=target.device))


# ---- compiled for a GPU, without one -------------------------------------------------------

# Runs under tests/sm90.py's stand-in sm_90 driver: the public wrappers drive every kernel variant
# through their launchers. Prints, per variant, the global loads and stores of its PTX and what the
# call asked for: how many int8 states it reads and writes, and whether it clips.
COMPILE_FOR_SM90 = r"""
from hift_rt.kernels import Q, _common, adagrad_update, adamw_update, grad_norm, sgd_update
_common.TRITON_ON_CPU = True  # send CPU tensors to the (compile-only) Triton launch
n, one = 4096, torch.zeros(1)
f32 = lambda: torch.zeros(n)
calls = []  # per compiled variant: (int8 states read, int8 states written, clips)

def compile(update, *args, reads=0, writes=0, **kwargs):
    update(*args, **kwargs)
    calls.append((reads, writes, "clip_coef" in kwargs))

for dtype in (torch.float32, torch.bfloat16, torch.float16):
    pair = lambda: (torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype))
    master = {} if dtype == torch.float32 else {"master": f32()}
    for extra in ({}, dict(clip_coef=one, decay_end=100)):
        compile(adamw_update, *pair(), f32(), f32(), step=1, lr=1e-3, weight_decay=0.1,
                **master, **extra)
        compile(adamw_update, *pair(), f32(), f32(), step=1, lr=1e-3, weight_decay=0.1,
                decoupled=False, maximize=True, **extra)
        compile(adagrad_update, *pair(), f32(), step=1, lr=1e-3, weight_decay=0.1, maximize=True,
                **master, **extra)
        compile(sgd_update, *pair(), f32(), lr=1e-3, momentum=0.9, nesterov=True, first_step=True,
                **master, **extra)
        compile(sgd_update, *pair(), f32(), lr=1e-3, momentum=0.9, dampening=0.1, **extra)
        compile(sgd_update, *pair(), None, lr=1e-3, weight_decay=0.1, **master, **extra)
    for norm_type in (2.0, 1.0, float("inf")):
        compile(grad_norm, torch.zeros(n, dtype=dtype), norm_type)

# Compact states: bf16 and int8 moments with each kind of weights.
def state(fmt, signed=True):
    if fmt == "int8":
        return torch.zeros(n, dtype=torch.uint8), torch.zeros(n // Q)
    return torch.zeros(n, dtype=torch.bfloat16), None

for fmt in ("bf16", "int8"):
    k = 1 if fmt == "int8" else 0
    for dtype, weights in ((torch.float32, {}), (torch.bfloat16, {"master": f32()}),
                           (torch.bfloat16, {"compensation": torch.zeros(n, dtype=torch.bfloat16)}),
                           (torch.bfloat16, {}),
                           (torch.float16, {"compensation": torch.zeros(n, dtype=torch.float16)})):
        pair = (torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype))
        (m, m_absmax), (v, v_absmax) = state(fmt), state(fmt)
        compile(adamw_update, *pair, m, v, step=2, lr=1e-3, weight_decay=0.1, clip_coef=one,
                exp_avg_absmax=m_absmax, exp_avg_sq_absmax=v_absmax, reads=2 * k, writes=2 * k,
                **weights)
        s, s_absmax = state(fmt)
        compile(adagrad_update, *pair, s, step=2, lr=1e-3, state_sum_absmax=s_absmax, reads=k,
                writes=k, **weights)
        b, b_absmax = state(fmt)
        compile(sgd_update, *pair, b, lr=1e-3, momentum=0.9, momentum_buffer_absmax=b_absmax,
                reads=k, writes=k, **weights)
        compile(sgd_update, *pair, b, lr=1e-3, momentum=0.9, first_step=True,
                momentum_buffer_absmax=b_absmax, writes=k, **weights)

assert len(calls) == len(compiled)
print(json.dumps([{"kernel": name, "int8_reads": reads, "int8_writes": writes, "clip": clip, **accesses(kernel)}
                  for (name, kernel), (reads, writes, clip) in zip(compiled, calls)]))
"""


def test_kernels_compile_for_sm90_with_128_bit_accesses():
    """Every variant compiles for an H100/H200 (sm_90), and with n divisible by 16 every access
    to an (n,) buffer is 128 bits wide (16 codes of a uint8 buffer, 8 bf16, 4 fp32): the only
    other accesses are 32-bit ones, exactly clip_coef, per int8 state read one absmax load and 16
    codebook loads (one per element of the thread: the decode's table lookup), per int8 state
    written one absmax store, and grad_norm's partial."""
    variants = compile_for_sm90(COMPILE_FOR_SM90)
    assert {v["kernel"] for v in variants} == {
        "_adamw_kernel", "_adagrad_kernel", "_sgd_kernel", "_grad_norm_partials_kernel"}
    assert len(variants) == 3 * (2 * 6 + 3) + 2 * 5 * 4
    assert sum(v["int8_writes"] > 0 for v in variants) == 5 * 4
    for variant in variants:
        assert any(".v4." in op for op in variant["loads"]), variant
        narrow = [op for op in variant["loads"] + variant["stores"] if ".v4." not in op]
        assert set(narrow) <= {"ld.global.b32", "st.global.b32"}, variant
        scalar_loads = variant["loads"].count("ld.global.b32")
        scalar_stores = variant["stores"].count("st.global.b32")
        if variant["kernel"] == "_grad_norm_partials_kernel":
            assert scalar_loads == 0 and scalar_stores == 1, variant
        else:
            reads = variant["int8_reads"]
            assert scalar_loads == variant["clip"] + 17 * reads, variant
            assert scalar_stores == variant["int8_writes"], variant


# ---- GPU only --------------------------------------------------------------------------------

@pytest.mark.cuda
def test_no_host_sync_with_clip():
    n = 5000
    device = torch.device("cuda")
    grad = torch.randn(n, device=device, dtype=torch.bfloat16)
    param, master = torch.zeros(n, device=device, dtype=torch.bfloat16), torch.zeros(n, device=device)
    exp_avg, exp_avg_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)

    def clipped_step(step):
        clip_coef = torch.clamp(1.0 / (grad_norm(grad) + 1e-6), max=1.0).reshape(1)
        adamw_update(param, grad, exp_avg, exp_avg_sq, step=step, lr=1e-3, master=master,
                     clip_coef=clip_coef)

    clipped_step(1)  # compiles the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clipped_step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
