"""hift_rt.wrap against the straightforward stock-torch HiFT loop (tests/reference_hift.py).

fp32 everywhere here: parameters and states must match at rtol 1e-5 (the kernels' fp32 math and
torch's single-tensor loop differ in rounding only).
"""
import pytest
import torch
from torch import nn

import hift_rt
from hift_rt.families import FAMILIES
from hift_rt.kernels import _common
from models import MODELS, assert_params_close, batches, loss_of, merge_units, mlp, tiny_llama, train_side_by_side
from reference_hift import ReferenceHiFT

@pytest.fixture(autouse=True, params=["torch", "triton"])
def kernel_path(request, monkeypatch):
    """CPU tensors through the kernels' torch path (the same ops as torch.optim's single-tensor
    loop, so results match to the last bit) or through the Triton kernels in the interpreter
    (only where conftest set TRITON_INTERPRET=1: without a GPU; test_runtime_cuda.py runs the
    compiled kernels)."""
    if request.param == "triton" and not _common.TRITON_ON_CPU:
        pytest.skip("TRITON_INTERPRET=1 was not set before hift_rt.kernels was imported (a GPU is present)")
    monkeypatch.setattr(_common, "TRITON_ON_CPU", request.param == "triton")
    return request.param


def run_pair(kind, optim, *, strategy="bottom_up", units_per_group=1, offload=True, cycles=2,
             lr=1e-2, lr_policy="cycle", scheduler=None, no_decay=None, max_grad_norm=None,
             accumulate=1, seed=0, **hyper):
    """The same training on two copies of a model: hift_rt and the reference loop."""
    if (_common.TRITON_ON_CPU or max_grad_norm is not None) and optim in ("adam", "adamw") and "eps" not in hyper:
        # The interpreter rounds lerp and addcmul without torch's fused multiply-add, and our
        # grad norm (one reduction over the flat buffer) rounds differently from clip_grad_norm_'s
        # norm of per-tensor norms, so weights differ from torch's in the last bit after one
        # step. Elements whose gradient is pure
        # rounding noise (e.g. GPT-2's key biases, exactly zero in exact arithmetic) turn that
        # into updates of up to lr * noise / (|noise| + eps): with eps = 1e-8 a 1e-10 change of
        # the noise moves them by ~lr. eps = 1e-3 bounds that at lr * 1e3 * 1e-10, well inside
        # the tolerance, and leaves every other element's update Adam's.
        hyper["eps"] = 1e-3
    ours, units = MODELS[kind]()
    ref, _ = MODELS[kind]()
    opt = hift_rt.wrap(ours, optim, lr=lr, strategy=strategy, units_per_group=units_per_group,
                       offload=offload, lr_policy=lr_policy, no_decay=no_decay,
                       max_grad_norm=max_grad_norm, seed=seed, **hyper)
    reference = ReferenceHiFT(ref, merge_units(units, units_per_group), FAMILIES[optim].torch_class, lr=lr,
                              strategy=strategy, seed=seed, lr_policy=lr_policy,
                              no_decay=no_decay or (), max_grad_norm=max_grad_norm, **hyper)
    assert len(opt.groups) == reference.k
    sched_ours = scheduler(opt) if scheduler else None
    sched_ref = scheduler(reference.lr_driver) if scheduler else None
    steps = cycles * reference.k
    data = batches(kind, steps * accumulate)
    for i in range(steps):
        assert opt.active_group == reference.active
        for j in range(accumulate):
            batch = data[i * accumulate + j]
            (loss_of(kind, ours, batch) / accumulate).backward()
            (loss_of(kind, ref, batch) / accumulate).backward()
        opt.step()
        reference.step()
        opt.zero_grad()
        reference.zero_grad()
        if scheduler:
            sched_ours.step()
            sched_ref.step()
    return ours, ref, opt, reference


def assert_same(ours, ref, opt, reference, optim, rtol=1e-5, atol=1e-6):
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"param {name}: {m}")
    state = opt.state_dict()["state"]
    names = [n for g in opt.describe_groups() for n in g["params"]]
    for index, name in enumerate(names):
        expected = reference.state_of(name)
        if not expected:
            assert index not in state, f"{name} has state but its group never stepped"
            continue
        for key in FAMILIES[optim].state_names(opt.param_groups[0]):
            if key in expected and expected[key] is not None:
                torch.testing.assert_close(state[index][key], expected[key], rtol=rtol, atol=atol,
                                           msg=lambda m: f"state {key} of {name}: {m}")
        if "step" in expected:
            assert float(state[index]["step"]) == float(expected["step"])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mlp"])
@pytest.mark.parametrize("strategy", ["bottom_up", "top_down", "random"])
@pytest.mark.parametrize("units_per_group", [1, 3])
@pytest.mark.parametrize("offload", [True, False])
def test_adamw_matches_reference_loop(kind, strategy, units_per_group, offload):
    ours, ref, opt, reference = run_pair(kind, "adamw", strategy=strategy, units_per_group=units_per_group,
                                         offload=offload, seed=3)
    assert_same(ours, ref, opt, reference, "adamw")
    opt.close()


@pytest.mark.parametrize("optim,hyper", [
    ("adam", {"weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ("adamw", {"weight_decay": 0.1, "maximize": True, "eps": 1e-6}),
    ("adagrad", {"lr_decay": 0.01, "weight_decay": 0.05, "initial_accumulator_value": 0.1}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("sgd", {}),
])
@pytest.mark.parametrize("offload", [True, False])
def test_every_family_matches_reference_loop(optim, hyper, offload):
    ours, ref, opt, reference = run_pair("mlp", optim, strategy="random", offload=offload, cycles=3, **hyper)
    assert_same(ours, ref, opt, reference, optim)


@pytest.mark.parametrize("offload", [True, False])
def test_no_decay_matches_reference_param_groups(offload):
    ours, ref, opt, reference = run_pair("llama", "adamw", offload=offload, no_decay=("norm", "bias"), weight_decay=0.3)
    assert_same(ours, ref, opt, reference, "adamw")
    g = opt.describe_groups()[1]
    assert g["decay_end"] < g["buffer_numel"], "layer norms must sit after the decayed weights"


def test_one_group_equals_plain_adamw_step_for_step():
    ours, _ = tiny_llama()
    ref, _ = tiny_llama()
    opt = hift_rt.wrap(ours, "adamw", lr=1e-2, units_per_group=100, offload=True)
    assert len(opt.groups) == 1
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for batch in batches("llama", 5):
        train_side_by_side("llama", [(ours, opt), (ref, plain)], [batch])
        assert_params_close(ours, ref)


def test_gradient_accumulation_matches_reference():
    ours, ref, opt, reference = run_pair("llama", "adamw", accumulate=3, strategy="top_down")
    assert_same(ours, ref, opt, reference, "adamw")


def test_grad_norm_clipping_equals_clip_grad_norm_over_active_group():
    ours, ref, opt, reference = run_pair("llama", "adamw", max_grad_norm=0.05, strategy="random")
    assert_same(ours, ref, opt, reference, "adamw")


@pytest.mark.parametrize("lr_policy", ["cycle", "step"])
def test_lr_policy_with_scheduler_matches_reference(lr_policy):
    def schedule(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))

    ours, ref, opt, reference = run_pair("mlp", "adamw", lr_policy=lr_policy, scheduler=schedule, cycles=3)
    assert_same(ours, ref, opt, reference, "adamw")


@pytest.mark.parametrize("torch_class", [torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adamax, torch.optim.RAdam])
@pytest.mark.parametrize("offload", [True, False])
def test_torch_optimizer_class_per_group_matches_reference(torch_class, offload):
    ours, units = mlp()
    ref, _ = mlp()
    opt = hift_rt.wrap(ours, torch_class, lr=1e-2, offload=offload, strategy="top_down", foreach=False)
    reference = ReferenceHiFT(ref, units, torch_class, lr=1e-2, strategy="top_down")
    train_side_by_side("mlp", [(ours, opt), (ref, reference)], batches("mlp", 3 * reference.k))
    assert_params_close(ours, ref)
    # state_dict() has torch's per-parameter layout, with the class's own keys.
    state = opt.state_dict()["state"]
    names = [n for g in opt.describe_groups() for n in g["params"]]
    assert sorted(state) == list(range(len(names)))
    for index, name in enumerate(names):
        expected = reference.state_of(name)
        assert state[index].keys() == expected.keys(), name
        for key, value in expected.items():
            torch.testing.assert_close(torch.as_tensor(state[index][key]), torch.as_tensor(value),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} of {name}: {m}")
    mem = opt.memory_breakdown()
    if offload:
        # Every group's state is in host memory; the device holds one group's (the largest).
        per_group = [sum(v.numel() * v.element_size() for i in range(len(names)) if names[i] in g["params"]
                         for v in state[i].values() if torch.is_tensor(v) and v.dim())
                     for g in opt.describe_groups()]
        assert mem["state_host"] >= sum(per_group) and mem["state_device"] >= max(per_group)
        assert mem["state_device"] < mem["state_host"]
        assert opt.transfer_stats()["exposed_wait_seconds"] >= 0.0
    else:
        assert mem["state_host"] == 0 and mem["state_device"] > 0


def test_rotation_and_requires_grad_follow_the_strategy():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "sgd", lr=0.1, strategy="top_down")
    names = [g["params"] for g in opt.describe_groups()]
    seen = []
    for batch in batches("mlp", 8):
        active = opt.active_group
        seen.append(active)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(names[active])
        loss_of("mlp", model, batch).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
    assert seen == [3, 2, 1, 0, 3, 2, 1, 0]
    assert opt.cycle == 2 and opt.group_steps == [2, 2, 2, 2]


def test_random_strategy_draws_one_permutation_per_cycle_from_seed():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "sgd", lr=0.1, strategy="random", seed=7)
    gen = torch.Generator().manual_seed(7)
    expected = [i for _ in range(3) for i in torch.randperm(4, generator=gen).tolist()]
    seen = []
    for batch in batches("mlp", 12):
        seen.append(opt.active_group)
        loss_of("mlp", model, batch).backward()
        opt.step()
    assert seen == expected


def test_gradients_accumulate_into_the_flat_buffer():
    """The active group's .grad are views of one flat buffer at the parameters' flat offsets."""
    model, _ = tiny_llama()
    opt = hift_rt.wrap(model, "adamw", lr=1e-3)
    g = opt.groups[opt.active_group]

    def assert_views_of_one_buffer():
        first = g.params[0][1].grad
        for (_, p), off in zip(g.params, g.offsets):
            assert p.grad.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            assert p.grad.data_ptr() - first.data_ptr() == off * first.element_size()

    loss_of("llama", model, batches("llama", 1)[0]).backward()
    assert_views_of_one_buffer()
    grads = [p.grad.clone() for _, p in g.params]
    # model.zero_grad() drops the views; the hook folds the next gradient back into the buffer.
    model.zero_grad()
    loss_of("llama", model, batches("llama", 1)[0]).backward()
    assert_views_of_one_buffer()
    assert all(torch.equal(p.grad, q) for (_, p), q in zip(g.params, grads))


def test_model_state_dict_and_weights_alias_the_flat_buffers():
    model, _ = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = hift_rt.wrap(model, "adamw", lr=1e-3)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k])
    for g in opt.groups:
        for (_, p), off in zip(g.params, g.offsets):
            assert p.data_ptr() == g.flat[off:].data_ptr()


def test_memory_breakdown_counts_one_group_of_state_on_device():
    model, _ = tiny_llama()
    opt = hift_rt.wrap(model, "adamw", lr=1e-3, offload=True)
    mem = opt.memory_breakdown()
    largest = max(g.numel for g in opt.groups)
    total = sum(g.numel for g in opt.groups)
    assert mem["gradients"] == largest * 4
    assert mem["state_device"] == largest * 2 * 4
    assert mem["state_host"] == total * 2 * 4
    opt.close()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(6, 6)
        self.sometimes = nn.Linear(6, 6)  # only on odd calls
        self.never = nn.Linear(6, 6)


class _PartlyUsed(nn.Module):
    """Parameters without gradients: a unit never used, one used every other step, one never
    used inside used blocks (an unused branch, an expert no token was routed to)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dead_input = nn.Linear(6, 6)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(6, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        for block in self.layers:
            x = torch.tanh(block.used(x))
            if self.calls % 2:
                x = x + block.sometimes(x)
        return self.head(x)


@pytest.mark.parametrize("optim,hyper", [("adamw", {"weight_decay": 0.1}), ("sgd", {"momentum": 0.9, "weight_decay": 0.1})])
@pytest.mark.parametrize("offload", [True, False])
def test_parameters_without_gradients_are_skipped_as_in_torch(optim, hyper, offload):
    ours, ref = _PartlyUsed(), _PartlyUsed()
    units = [["dead_input"], ["layers.0"], ["layers.1"], ["layers.2"], ["head"]]
    opt = hift_rt.wrap(ours, optim, lr=1e-2, offload=offload, strategy="random", units_per_group=2, **hyper)
    reference = ReferenceHiFT(ref, merge_units(units, 2), FAMILIES[optim].torch_class, lr=1e-2, strategy="random", **hyper)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(4 * reference.k)]
    train_side_by_side("mlp", [(ours, opt), (ref, reference)], data)
    assert_same(ours, ref, opt, reference, optim)
    assert torch.equal(ours.dead_input.weight, ref.dead_input.weight)
    state = opt.state_dict()["state"]
    names = [n for g in opt.describe_groups() for n in g["params"]]
    assert names.index("layers.0.never.weight") not in state
    if optim == "adamw":
        used, sometimes = (state[names.index(f"layers.0.{m}.weight")]["step"] for m in ("used", "sometimes"))
        assert used > sometimes > 0


# ---- the state window ---------------------------------------------------------------------------

WINDOW_CASES = [
    ("adamw", {"weight_decay": 0.1}, torch.float32),
    ("adamw", {}, torch.bfloat16),  # with fp32 masters streamed through the window too
    ("adam", {"weight_decay": 0.1}, torch.float32),
    ("adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1}, torch.float32),
    ("sgd", {"momentum": 0.9, "nesterov": True}, torch.float32),
    ("sgd", {}, torch.bfloat16),
]


def _windowed_pair(optim, hyper, dtype, window, strategy, steps, resume_at=None):
    """Whole-slot and windowed runs of the same training; the windowed one optionally saved after
    `resume_at` steps and resumed into a freshly wrapped whole-slot copy."""
    models = []
    for state_window in (None, window):
        model, _ = tiny_llama()
        model.to(dtype)
        opt = hift_rt.wrap(model, optim, lr=1e-2, strategy=strategy, offload=True, state_window=state_window,
                           no_decay=("norm",), **hyper)
        models.append((model, opt))
    data = batches("llama", steps)
    for i, batch in enumerate(data):
        for model, opt in models:
            loss_of("llama", model, batch).backward()
            opt.step()
            opt.zero_grad()
        if i + 1 == resume_at:
            model, opt = models[1]
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
            opt.close()
            fresh, _ = tiny_llama(seed=7)
            fresh.to(dtype)
            fresh.load_state_dict(saved["model"])
            opt = hift_rt.wrap(fresh, optim, lr=1e-2, strategy=strategy, offload=True, state_window=None,
                               no_decay=("norm",), **hyper)
            opt.load_state_dict(saved["opt"])
            models[1] = (fresh, opt)
    return models


# Every family with every strategy and every window size, in 12 runs rather than the 54 of the
# full product (the three are independent: order of groups, chunking, update math).
WINDOW_RUNS = [(*case, strategy, window) for i, case in enumerate(WINDOW_CASES)
               for strategy, window in [(("bottom_up", "top_down", "random")[i % 3], (4096, 3 * 256 * 12 + 1, 16384)[i % 3]),
                                        (("random", "bottom_up", "top_down")[i % 3], (16384, 4096, 3 * 256 * 12 + 1)[i % 3])]]


@pytest.mark.parametrize("optim,hyper,dtype,strategy,window", WINDOW_RUNS,
                         ids=[f"{r[0]}-{r[2]}-{r[3]}-{r[4]}".replace("torch.", "") for r in WINDOW_RUNS])
def test_state_window_is_bit_identical_to_the_whole_slot(optim, hyper, dtype, strategy, window):
    """The update is elementwise: streaming a group's state through a window of any size gives
    exactly the whole slot's weights and state (groups here are 1024, 3072 and 1280 elements; the
    windows give chunks of 256 to 1024 elements, one to four chunk buffers; the 1280-element
    output group is not a multiple of 512 or 1024)."""
    (whole, opt_whole), (windowed, opt_windowed) = _windowed_pair(optim, hyper, dtype, window, strategy, steps=14)
    whole_slot, device = opt_whole.memory_breakdown()["state_device"], opt_windowed.memory_breakdown()["state_device"]
    assert device <= window if window < whole_slot else device == whole_slot  # a group that fits stays whole
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), windowed.parameters()))
    a, b = opt_whole.state_dict()["state"], opt_windowed.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for key, value in a[i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[i][key])), (i, key)


@pytest.mark.parametrize("resume_at", [3, 8])
def test_a_windowed_checkpoint_resumes_in_the_whole_slot_to_the_same_numbers(resume_at):
    (whole, _), (resumed, _) = _windowed_pair("adamw", {}, torch.bfloat16, 5000, "random", steps=15,
                                              resume_at=resume_at)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


def test_a_window_too_small_for_one_chunk_is_refused():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="state_window=1000 bytes is too small"):
        hift_rt.wrap(model, "adamw", lr=1e-2, offload=True, state_window=1000)
    with pytest.raises(ValueError, match="state_window must be"):
        hift_rt.wrap(model, "adamw", lr=1e-2, offload=True, state_window=-5)
