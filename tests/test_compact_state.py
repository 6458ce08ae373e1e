"""Compact optimizer state in the runtime (state_dtype "bf16"/"int8", master_weights "kahan"/False):
the store, the window, offload and checkpoints work with every format; checkpoints resume
bit-exactly and convert between formats; memory is what the memory model says. The kernels' own
math is checked against float64 references in tests/test_kernels_compact.py."""
import copy
import io

import pytest
import torch

import hift_rt
from hift_rt.families import FAMILIES, SIGNED
from hift_rt.kernels import Q, dequantize
from models import batches, loss_of, tiny_llama

FORMATS = [("fp32", "fp32"), ("bf16", "fp32"), ("int8", "fp32"), ("int8", "kahan"), ("bf16", "kahan"),
           ("int8", False)]


def _run(state_dtype, master, *, steps=10, optim="adamw", dtype=torch.bfloat16, seed=0, model_seed=0, **kwargs):
    model, _ = tiny_llama(seed=model_seed)
    model.to(dtype)
    opt = hift_rt.wrap(model, optim, lr=1e-2, strategy="random", seed=seed, state_dtype=state_dtype,
                       master_weights=master, no_decay=("norm",), **kwargs)
    for batch in batches("llama", steps):
        loss_of("llama", model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys()
        for key, value in a[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[i][key])), (i, key)


@pytest.mark.parametrize("state_dtype,master", FORMATS)
def test_every_format_is_the_same_offloaded_windowed_or_on_the_device(state_dtype, master):
    runs = [_run(state_dtype, master, offload=False), _run(state_dtype, master, offload=True, state_window=None),
            _run(state_dtype, master, offload=True, state_window=5000)]
    (ref_model, ref_opt), others = runs[0], runs[1:]
    for model, opt in others:
        assert all(torch.equal(p, q) for p, q in zip(ref_model.parameters(), model.parameters()))
        _same_state(ref_opt.state_dict()["state"], opt.state_dict()["state"])
    assert others[1][1].memory_breakdown()["state_device"] <= 5000


@pytest.mark.parametrize("offload", [True, False])
@pytest.mark.parametrize("state_dtype,master", FORMATS)
def test_every_format_resumes_bit_exactly_mid_cycle_through_torch_save(state_dtype, master, offload):
    whole, opt_whole = _run(state_dtype, master, steps=13, offload=offload)
    part, opt_part = _run(state_dtype, master, steps=5, offload=offload)
    blob = io.BytesIO()  # fields of several dtypes must each be a storage of their own to save
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    assert saved["opt"]["hift"]["state_dtype"] == state_dtype
    resumed, _ = tiny_llama(seed=9)
    resumed.to(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt = hift_rt.wrap(resumed, "adamw", lr=1e-2, strategy="random", state_dtype=state_dtype, master_weights=master,
                       no_decay=("norm",), offload=offload)
    opt.load_state_dict(saved["opt"])
    for batch in batches("llama", 13)[5:]:
        loss_of("llama", resumed, batch).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    _same_state(opt_whole.state_dict()["state"], opt.state_dict()["state"])


def test_the_int8_state_dict_holds_codes_and_block_absmax_per_parameter():
    model, opt = _run("int8", "kahan")
    state = opt.state_dict()["state"]
    params = opt.param_groups[0]["params"]
    for i, entry in state.items():
        p = params[i]
        assert set(entry) == {"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax", "compensation"}
        assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg"].shape == p.shape
        assert entry["exp_avg_absmax"].shape == (-(-p.numel() // Q),)
        assert entry["compensation"].dtype == torch.bfloat16 and entry["compensation"].shape == p.shape


def _fp32_moments(entry, name):
    value = torch.as_tensor(entry[name]).reshape(-1)
    if value.dtype != torch.uint8:
        return value.float()
    absmax = entry[name + "_absmax"]
    padded = torch.zeros(absmax.numel() * Q, dtype=torch.uint8)
    padded[:value.numel()] = value
    return dequantize(padded, absmax.float(), SIGNED[name])[:value.numel()]


@pytest.mark.parametrize("source,target", [(("fp32", "fp32"), ("int8", "kahan")), (("int8", "kahan"), ("fp32", "fp32")),
                                           (("bf16", "fp32"), ("int8", "fp32")), (("int8", False), ("bf16", "kahan"))])
def test_a_state_of_another_format_loads_converted(source, target):
    """Moments are requantized (or cast) and the master is carried over: the loaded state reads
    back as the saved one within the target format's rounding, and training continues."""
    model, opt = _run(*source, steps=8)
    saved = copy.deepcopy(opt.state_dict())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin, _ = tiny_llama(seed=4)
    twin.to(torch.bfloat16)
    twin.load_state_dict(model.state_dict())
    loaded = hift_rt.wrap(twin, "adamw", lr=1e-2, strategy="random", state_dtype=target[0],
                          master_weights=target[1], no_decay=("norm",))
    loaded.load_state_dict(saved)
    back = loaded.state_dict()["state"]
    names = [n for g in loaded.describe_groups() for n in g["params"]]
    for i, entry in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            expected, got = _fp32_moments(entry, name), _fp32_moments(back[i], name)
            scale = expected.abs().max()
            # int8: half a code step near a block's top (1/32 of the absmax for the signed code,
            # 1/64 unsigned); bf16: half an ulp (2^-9 relative); fp32: exact.
            budget = {"int8": scale / 16, "bf16": expected.abs() * 2 ** -8 + 1e-30, "fp32": 0}[target[0]]
            assert ((got - expected).abs() <= budget).all(), (names[i], name)
        if target[1] == "fp32":
            master = entry.get("master")
            if master is None:
                master = weights[names[i]].float() + (entry["compensation"].float() if "compensation" in entry else 0)
            torch.testing.assert_close(back[i]["master"], master.float(), rtol=0, atol=0)
        elif target[1] == "kahan" and "master" in entry:
            exact = entry["master"].float() - weights[names[i]].float()
            torch.testing.assert_close(back[i]["compensation"].float(), exact, rtol=2 ** -8, atol=1e-12)
    for batch in batches("llama", 4, seed=3):
        loss_of("llama", twin, batch).backward()
        loaded.step()
        loaded.zero_grad()
    assert all(torch.isfinite(p).all() for p in twin.parameters())


@pytest.mark.parametrize("state_dtype,master,per_param", [
    ("fp32", "fp32", 12), ("int8", "fp32", 6 + 8 / Q), ("int8", "kahan", 4 + 8 / Q), ("bf16", "kahan", 6),
    ("bf16", False, 4), ("int8", False, 2 + 8 / Q)])
def test_host_bytes_per_parameter_of_each_format(state_dtype, master, per_param):
    """AdamW on bf16 weights: the memory model's bytes per parameter (targets: int8 + fp32 master
    <= 6.1, int8 + kahan <= 4.1)."""
    model, opt = _run(state_dtype, master, steps=1, offload=True, state_window=None)
    elements = sum(g["buffer_numel"] for g in opt.describe_groups())
    # Each field is padded to 64 bytes in a group's blob; the tiny model has 6 groups.
    padding = 64 * len(FAMILIES["adamw"].fields(opt.defaults, state_dtype, master or None, torch.bfloat16)) * 6
    assert elements * per_param <= opt.memory_breakdown()["state_host"] <= elements * per_param + padding


def test_int8_with_kahan_trains_close_to_fp32():
    """Quality on the tiny model: after 3 cycles the loss of int8 + kahan is within 1% of fp32's."""
    def final_loss(state_dtype, master):
        model, opt = _run(state_dtype, master, steps=18, seed=1)
        with torch.no_grad():
            return sum(float(loss_of("llama", model, b)) for b in batches("llama", 4, seed=11)) / 4
    fp32, int8 = final_loss("fp32", "fp32"), final_loss("int8", "kahan")
    assert abs(int8 - fp32) <= 0.01 * fp32, (int8, fp32)


def test_format_options_are_checked():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        hift_rt.wrap(model, lr=1e-3, state_dtype="fp8")
    with pytest.raises(ValueError, match="master_weights='kahan' needs bfloat16 or float16"):
        hift_rt.wrap(model, lr=1e-3, master_weights="kahan")
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="need a fused optimizer"):
        hift_rt.wrap(model, torch.optim.RMSprop, lr=1e-3, state_dtype="int8")
