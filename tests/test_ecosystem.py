"""What hift_rt must not break: checkpoints and resume, LR schedulers, autocast and GradScaler,
saving models after wrap, gradient checkpointing; and the errors bad input gets."""
import io

import pytest
import torch
from torch import nn

import hift_rt
from models import MODELS, assert_params_close, batches, loss_of, mlp, tiny_gpt2, tiny_llama, train_side_by_side
from reference_hift import ReferenceHiFT


# ---- checkpoints -----------------------------------------------------------------------------

def _train(kind, model, opt, data, sched=None):
    for batch in data:
        loss_of(kind, model, batch).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def _schedule(o):
    return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s)


@pytest.mark.parametrize("kind,optim,kwargs", [
    ("llama", "adamw", {"strategy": "random", "offload": True}),
    ("gpt2", "adamw", {"strategy": "top_down", "offload": False, "no_decay": ("bias", "ln")}),
    ("mlp", "sgd", {"strategy": "random", "offload": True, "momentum": 0.9}),
    ("mlp", "adagrad", {"offload": True}),
    ("mlp", torch.optim.RMSprop, {"offload": True, "strategy": "random"}),
])
@pytest.mark.parametrize("stop_at", [1, 5, 6])
def test_checkpoint_at_any_step_resumes_to_the_same_numbers(kind, optim, kwargs, stop_at):
    """Uninterrupted run vs. a run saved after `stop_at` steps (mid-cycle included), loaded into
    a freshly built and wrapped copy of the model, and continued: bit-identical at the end."""
    total = 11
    data = batches(kind, total)
    model_a, _ = MODELS[kind]()
    opt_a = hift_rt.wrap(model_a, optim, lr=1e-2, **kwargs)
    sched_a = _schedule(opt_a)
    _train(kind, model_a, opt_a, data, sched_a)

    model_b, _ = MODELS[kind]()
    opt_b = hift_rt.wrap(model_b, optim, lr=1e-2, **kwargs)
    sched_b = _schedule(opt_b)
    _train(kind, model_b, opt_b, data[:stop_at], sched_b)
    blob = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, blob)
    saved_position = (opt_b.active_group, opt_b.cycle, opt_b.group_steps)
    opt_b.close()
    del model_b, opt_b, sched_b

    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    model_c, _ = MODELS[kind](seed=123)  # different initial weights: everything must come from the checkpoint
    model_c.load_state_dict(saved["model"])
    opt_c = hift_rt.wrap(model_c, optim, lr=1e-2, **kwargs)
    sched_c = _schedule(opt_c)  # before loading: a new scheduler resets the lr (torch's order)
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    assert (opt_c.active_group, opt_c.cycle, opt_c.group_steps) == saved_position
    _train(kind, model_c, opt_c, data[stop_at:], sched_c)

    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    assert opt_c.active_group == opt_a.active_group and opt_c.cycle == opt_a.cycle
    assert opt_c.group_steps == opt_a.group_steps
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert sa["state"].keys() == sc["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(value, sc["state"][i][key]), f"state {key} of parameter {i}"


def test_state_dict_loads_into_stock_adamw_and_back():
    """fp32 AdamW: our state_dict has torch's layout, so torch.optim.AdamW takes it as is."""
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, units_per_group=10)
    _train("mlp", model, opt, batches("mlp", 3))
    twin, _ = mlp()
    twin.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    plain.load_state_dict(opt.state_dict())
    fresh = hift_rt.wrap(twin, "adamw", lr=1e-2, units_per_group=10)
    fresh.load_state_dict(plain.state_dict())  # a plain torch state dict: state and steps carried over
    assert fresh.group_steps == [3]
    data = batches("mlp", 2, seed=9)
    _train("mlp", model, opt, data)
    _train("mlp", twin, fresh, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_stock_state_dict_with_an_option_we_do_not_run_is_refused():
    """torch's amsgrad=True changes the math, so its state dict must not load as if it did not;
    foreach=True changes only torch's implementation and loads."""
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, units_per_group=10)
    amsgrad = torch.optim.AdamW(mlp()[0].parameters(), lr=1e-2, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        opt.load_state_dict(amsgrad.state_dict())
    assert opt.param_groups[0].get("amsgrad") is None
    foreach = torch.optim.AdamW(mlp()[0].parameters(), lr=3e-3, foreach=True)
    opt.load_state_dict(foreach.state_dict())
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0].get("foreach") is None


def test_load_state_dict_rejects_another_layout():
    a, _ = tiny_llama()
    b, _ = tiny_llama()
    opt_a = hift_rt.wrap(a, "adamw", lr=1e-3, units_per_group=1)
    opt_b = hift_rt.wrap(b, "adamw", lr=1e-3, units_per_group=2)
    with pytest.raises(ValueError, match="another group layout"):
        opt_b.load_state_dict(opt_a.state_dict())
    c, _ = tiny_llama()
    opt_c = hift_rt.wrap(c, "adagrad", lr=1e-3)
    with pytest.raises(ValueError, match="is for optim 'adamw'"):
        opt_c.load_state_dict(opt_a.state_dict())


# ---- schedulers ------------------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda s: 0.9),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20, cycle_momentum=False),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum=False),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5, min_lr=0.005),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("lr_policy", ["cycle", "step"])
def test_every_lr_scheduler_drives_the_update(name, lr_policy):
    """Plain SGD moves w by exactly -lr * g, so the lr each update used can be read back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    opt = hift_rt.wrap(model, "sgd", lr=0.05, lr_policy=lr_policy, offload=False)
    sched = SCHEDULERS[name](opt)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected_cycle_lr = None
    k = len(opt.describe_groups())
    for step in range(9):
        scheduled = opt.param_groups[0]["lr"]
        if step % k == 0:
            expected_cycle_lr = scheduled
        expected_cycle_lr = max(expected_cycle_lr, scheduled)  # held while it decays, followed while it rises
        expected = expected_cycle_lr if lr_policy == "cycle" else scheduled
        group = opt.groups[opt.active_group]
        before = group.flat.clone()
        loss = model(x).pow(2).sum()
        loss.backward()
        grad = torch.zeros_like(group.flat)
        for (_, p), off in zip(group.params, group.offsets):
            grad[off:off + p.numel()] = p.grad.reshape(-1)
        opt.step()
        # Read back where the update is >= 1e-4: the weights' rounding (<= 1.2e-7 for |w| < 2)
        # then perturbs the recovered lr by at most 1.2e-3 of itself.
        if expected == 0.0:
            assert torch.equal(before, group.flat)
        else:
            readable = grad.abs() * expected >= 1e-4
            assert readable.any()
            used = ((before - group.flat) / grad)[readable]
            torch.testing.assert_close(used, torch.full_like(used, expected), rtol=2e-3, atol=0)
        assert opt.last_lr == pytest.approx(expected, rel=1e-12)
        if name == "ReduceLROnPlateau":
            sched.step(1.0)
        else:
            sched.step()


# ---- mixed precision -------------------------------------------------------------------------

def test_bf16_autocast_matches_reference():
    ours, units = tiny_llama()
    ref, _ = tiny_llama()
    opt = hift_rt.wrap(ours, "adamw", lr=1e-2, eps=1e-3)
    reference = ReferenceHiFT(ref, units, torch.optim.AdamW, lr=1e-2, eps=1e-3)
    train_side_by_side("llama", [(ours, opt), (ref, reference)], batches("llama", 12),
                       autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert_params_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_bf16_parameters_train_with_fp32_master_weights():
    model, _ = tiny_llama()
    model.to(torch.bfloat16)
    opt = hift_rt.wrap(model, "adamw", lr=1e-3, offload=True)
    assert opt.master_weights and opt.memory_breakdown()["state_host"] == 3 * 4 * sum(g.numel for g in opt.groups)
    for batch in batches("llama", 8):
        loss_of("llama", model, batch).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    for i, entry in state["state"].items():
        p = opt.param_groups[0]["params"][i]
        assert entry["master"].dtype == torch.float32
        # The parameter is the master rounded to bf16 (within one bf16 ulp: the Triton
        # interpreter truncates where a GPU rounds to nearest).
        torch.testing.assert_close(p.float(), entry["master"].to(p.device), rtol=2 ** -7, atol=1e-6)


def _scaler_run(model, opt_factory, data, inject_inf_at=None):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    opt = opt_factory(model)
    history = []
    dtype = next(model.parameters()).dtype
    for i, (x, y) in enumerate(data):
        loss = loss_of("mlp", model, (x.to(dtype), y.to(dtype)))
        scaler.scale(loss).backward()
        if i == inject_inf_at:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("inf")
                    break
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        history.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return opt, history


def test_grad_scaler_matches_reference_and_an_inf_step_changes_nothing():
    ours, units = mlp()
    ref, _ = mlp()
    data = batches("mlp", 10)
    opt, unchanged = _scaler_run(ours, lambda m: hift_rt.wrap(m, "adamw", lr=1e-2), data, inject_inf_at=3)
    reference = None

    def make_ref(m):
        nonlocal reference
        reference = ReferenceHiFT(m, units, torch.optim.AdamW, lr=1e-2)
        return _RefAsOptimizer(reference)

    _, ref_unchanged = _scaler_run(ref, make_ref, data, inject_inf_at=3)
    assert unchanged[3] and not any(unchanged[:3]) and not any(unchanged[4:])
    assert ref_unchanged == unchanged
    assert opt.group_steps == [3, 2, 2, 2]  # 9 updates: the skipped step did not count or rotate
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _RefAsOptimizer(torch.optim.Optimizer):
    """The reference loop behind the Optimizer interface GradScaler expects."""

    def __init__(self, reference):
        self.reference = reference
        super().__init__([p for g in reference.groups for _, p in g], {"lr": 0.0})

    def step(self, closure=None):
        self.reference.step()

    def zero_grad(self, set_to_none=True):
        self.reference.zero_grad()


def test_grad_scaler_with_fp16_parameters():
    """torch refuses to unscale fp16 gradients itself; hift_rt takes the scale into its kernel."""
    model, _ = mlp()
    model.half()
    _, unchanged = _scaler_run(model, lambda m: hift_rt.wrap(m, "adamw", lr=1e-3), batches("mlp", 6), inject_inf_at=2)
    assert unchanged == [False, False, True, False, False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- saving models after wrap ----------------------------------------------------------------

def test_torch_save_safetensors_and_save_pretrained_after_wrap(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model, _ = tiny_llama()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2)
    _train("llama", model, opt, batches("llama", 8))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt")
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())

    # The parameters are disjoint views of one buffer per group: save_file writes each as its
    # own tensor. (safetensors' save_model refuses any tensor that is a partial view of its
    # storage, so it refuses a wrapped model; save_file and save_pretrained are the ways.)
    save_file(model.state_dict(), str(tmp_path / "plain.safetensors"))
    loaded = load_file(str(tmp_path / "plain.safetensors"))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    model.save_pretrained(tmp_path / "hf")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in again.state_dict().items():
        assert torch.equal(v, expected[k]), k


# ---- gradient checkpointing ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_checkpointing_with_frozen_lower_layers(kind):
    ours, units = MODELS[kind]()
    ref, _ = MODELS[kind]()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours.train()
    ref.train()
    opt = hift_rt.wrap(ours, "adamw", lr=1e-2, strategy="top_down", eps=1e-3)
    reference = ReferenceHiFT(ref, units, torch.optim.AdamW, lr=1e-2, strategy="top_down", eps=1e-3)
    train_side_by_side(kind, [(ours, opt), (ref, reference)], batches(kind, 2 * reference.k))
    assert_params_close(ours, ref)


# ---- bad input -------------------------------------------------------------------------------

def test_model_without_trainable_parameters():
    model, _ = mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hift_rt.wrap(model, lr=1e-3)


def test_groups_must_cover_every_parameter_once():
    model, _ = mlp()
    with pytest.raises(ValueError, match="in no group"):
        hift_rt.wrap(model, lr=1e-3, groups=[["0", "1"], ["3"]])
    with pytest.raises(ValueError, match="more than one group"):
        hift_rt.wrap(model, lr=1e-3, groups=[["0", "1"], ["1", "3", "5"]])
    with pytest.raises(ValueError, match="match no trainable parameter"):
        hift_rt.wrap(model, lr=1e-3, groups=[["0", "1", "3", "5"], ["nothing"]])
    opt = hift_rt.wrap(model, lr=1e-3, groups=[["0", "1"], ["3", "5.weight", "5.bias"]])
    assert [g["params"] for g in opt.describe_groups()] == [["0.weight", "0.bias", "1.weight", "1.bias"],
                                                            ["3.weight", "3.bias", "5.weight", "5.bias"]]


@pytest.mark.parametrize("optim,kwargs,match", [
    ("lion", {}, "unknown optim 'lion'"),
    (nn.Linear, {}, "unknown optim"),
    ("adamw", {"betas2": 0.9}, r"has no option\(s\) \['betas2'\]"),
    ("adamw", {"amsgrad": True}, "amsgrad=True is not supported"),
    ("adamw", {"fused": True}, "fused=True is not supported"),
    ("sgd", {"nesterov": True}, "nesterov needs momentum"),
    ("adamw", {"betas": (0.9, 1.0)}, "betas must be"),
    ("adagrad", {"eps": -1.0}, "eps must be a finite number >= 0"),
    (torch.optim.AdamW, {"not_an_option": 1}, "not_an_option"),
])
def test_unknown_optimizer_or_option(optim, kwargs, match):
    model, _ = mlp()
    with pytest.raises(ValueError, match=match):
        hift_rt.wrap(model, optim, lr=1e-3, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be"),
    ({"lr": 1e-3, "strategy": "sideways"}, "strategy must be"),
    ({"lr": 1e-3, "lr_policy": "epoch"}, "lr_policy must be"),
    ({"lr": 1e-3, "offload": "yes"}, "offload must be"),
    ({"lr": 1e-3, "master_weights": True}, "master_weights=True needs"),
    ({"lr": 1e-3, "max_grad_norm": 0}, "max_grad_norm must be"),
    ({"lr": 1e-3, "units_per_group": 0}, "units_per_group must be"),
])
def test_bad_wrap_arguments(kwargs, match):
    model, _ = mlp()
    with pytest.raises(ValueError, match=match):
        hift_rt.wrap(model, **kwargs)


def test_sparse_gradients_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"\['0'\] have sparse=True"):
        hift_rt.wrap(model, "sgd", lr=0.1)
    # A sparse gradient from elsewhere (functional embedding) is refused at step().
    weight = nn.Parameter(torch.randn(10, 4))
    model = nn.ParameterList([weight])
    opt = hift_rt.wrap(model, "sgd", lr=0.1)
    weight.grad = None
    nn.functional.embedding(torch.tensor([1, 2]), weight, sparse=True).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def test_parameters_on_several_devices_or_dtypes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].to("meta")
    with pytest.raises(ValueError, match="several devices"):
        hift_rt.wrap(model, lr=1e-3)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="several dtypes"):
        hift_rt.wrap(model, lr=1e-3)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        hift_rt.wrap(nn.Linear(2, 2).double(), lr=1e-3)


@pytest.mark.parametrize("move", [lambda m: m.double(), lambda m: m.to(torch.bfloat16),
                                  lambda m: m[0].float().to("meta")])
def test_model_moved_or_recast_after_wrap(move):
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-3)
    move(model)
    with pytest.raises(RuntimeError, match="moved or re-cast after hift_rt.wrap"):
        opt.step()


def test_add_param_group_is_refused():
    model, _ = mlp()
    opt = hift_rt.wrap(model, lr=1e-3)
    with pytest.raises(RuntimeError, match="add_param_group is not supported"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_closed_optimizer_refuses_to_step():
    model, _ = mlp()
    opt = hift_rt.wrap(model, lr=1e-3, offload=True)
    opt.close()
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    opt.close()


def test_gpt2_tied_head_counts_once_in_the_input_group():
    model, _ = tiny_gpt2()
    opt = hift_rt.wrap(model, lr=1e-3)
    names = [n for g in opt.describe_groups() for n in g["params"]]
    assert "lm_head.weight" not in names and names.count("transformer.wte.weight") == 1
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_wrapping_again_needs_close_and_close_hands_the_model_back():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-3)
    with pytest.raises(ValueError, match="still open; call its close"):
        hift_rt.wrap(model, "adamw", lr=1e-3)
    opt.close()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    model(torch.randn(3, model[0].in_features)).sum().backward()  # a plain model: gradients of its own
    assert all(p.grad is not None and p.grad._base is None for p in model.parameters())
    opt.zero_grad()  # as torch's: every .grad None, none a view of the closed optimizer's buffer
    assert all(p.grad is None for p in model.parameters())
    again = hift_rt.wrap(model, "sgd", lr=1e-3)
    assert len(again.groups) == 4
    del again  # dropped without close: collected, and the model is free again
    hift_rt.wrap(model, "adamw", lr=1e-3).close()


def test_no_decay_as_a_function():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-3, no_decay=lambda name: name.endswith("bias"))
    for g in opt.describe_groups():
        assert g["params"][-1].endswith("bias") and not g["params"][0].endswith("bias")
        assert g["decay_end"] < g["buffer_numel"]
