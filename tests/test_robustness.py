"""What a demanding user throws at the optimizer: corrupt or hand-made checkpoints, Ctrl-C in the
middle of a step, two threads, copies, values torch refuses. Each must end in a clear error or a
consistent optimizer, never in silently wrong training."""
import copy
import math
import os
import pickle
import signal
import threading
import time

import pytest
import torch

import hift_rt
from models import batches, loss_of, mlp, tiny_llama


def _train(model, opt, data, kind="mlp"):
    for batch in data:
        loss_of(kind, model, batch).backward()
        opt.step()
        opt.zero_grad()


def _snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()], opt.active_group, opt.cycle, opt.group_steps,
            {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()}
             for i, e in opt.state_dict()["state"].items()})


def _assert_same_snapshot(a, b):
    assert a[1:4] == b[1:4]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[4].keys() == b[4].keys()
    for i in a[4]:
        for key, value in a[4][i].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[4][i][key])), (i, key)


# ---- checkpoints that cannot be valid ----------------------------------------------------------

def _corrupt(state, how):
    entry = state["state"][min(state["state"])]
    if how == "negative second moment":
        entry["exp_avg_sq"].view(-1)[0] = -1e12
    elif how == "nan":
        entry["exp_avg"].view(-1)[1] = math.nan
    elif how == "inf master":
        entry["master"].view(-1)[0] = math.inf
    elif how == "wrong size":
        entry["exp_avg"] = torch.zeros(3)
    elif how == "missing key":
        del entry["exp_avg_sq"]
    elif how == "negative step":
        entry["step"] = torch.tensor(-2.0)
    elif how == "rotation position":
        state["hift"]["rotation"]["position"] = 99
    elif how == "rotation order":
        state["hift"]["rotation"]["order"] = [0, 0, 1, 2, 3, 4]
    elif how == "group_steps length":
        state["hift"]["group_steps"] = [1, 2]
    elif how == "group_steps value":
        state["hift"]["group_steps"][0] = -1
    elif how == "cycle lr":
        state["hift"]["cycle_lr"] = math.nan
    elif how == "lr":
        state["param_groups"][0]["lr"] = math.inf
    elif how == "betas":
        state["param_groups"][0]["betas"] = (0.9, 1.5)
    elif how == "fp16 moment":  # the model is bf16: its moments are fp32, bf16, bf16 (torch's) or int8
        entry["exp_avg"] = entry["exp_avg"].half()
    elif how == "int64 moment":
        entry["exp_avg_sq"] = entry["exp_avg_sq"].long()
    elif how == "fp16 master":
        entry["master"] = entry["master"].half()
    elif how == "transposed moment":
        entry["exp_avg"] = entry["exp_avg"].reshape(-1).flip(0).reshape(entry["exp_avg"].shape[::-1] + (1,))
    elif how == "meta moment":
        entry["exp_avg"] = torch.empty_like(entry["exp_avg"], device="meta")
    elif how == "sparse moment":
        entry["exp_avg"] = entry["exp_avg"].to_sparse()
    elif how == "step a huge tensor":
        entry["step"] = torch.zeros(10 ** 6)
    elif how == "step a huge number":
        entry["step"] = torch.tensor(1e30)
    elif how == "fractional step":
        entry["step"] = torch.tensor(1.5)
    elif how == "step beyond the group's":
        entry["step"] = torch.tensor(float(sum(state["hift"]["group_steps"]) + 1))
    elif how == "string keys":  # a state dict that went through JSON
        state["state"] = {str(i): e for i, e in state["state"].items()}
    elif how == "key out of range":
        state["state"][10 ** 6] = entry
    elif how == "unknown field":
        entry["exp_avg2"] = entry["exp_avg"].clone()
    elif how == "field named by a number":
        entry[7] = entry["exp_avg"].clone()
    elif how == "scales without codes":
        entry["exp_avg_absmax"] = torch.ones(-(-entry["exp_avg"].numel() // 128))
    elif how == "hift not a dict":
        state["hift"] = ["rotation"]
    return state


@pytest.mark.parametrize("how,match", [
    ("negative second moment", r"'exp_avg_sq' of parameter '[\w.]+' has negative values"),
    ("nan", r"'exp_avg' of parameter '[\w.]+' has non-finite values"),
    ("inf master", r"'master' of parameter '[\w.]+' has non-finite values"),
    ("wrong size", r"'exp_avg' of parameter '[\w.]+' has 3 elements"),
    ("missing key", r"parameter '[\w.]+' has no \['exp_avg_sq'\]"),
    ("negative step", r"'step' of parameter '[\w.]+' is"),
    ("rotation position", "rotation state is out of range"),
    ("rotation order", "rotation state is out of range"),
    ("group_steps length", "group_steps"),
    ("group_steps value", "group_steps"),
    ("cycle lr", "cycle lr"),
    ("lr", "lr inf"),
    ("betas", "betas must be"),
    ("fp16 moment", r"'exp_avg' of parameter '[\w.]+' has dtype torch.float16; expected one of"),
    ("int64 moment", r"'exp_avg_sq' of parameter '[\w.]+' has dtype torch.int64; expected one of"),
    ("fp16 master", r"'master' of parameter '[\w.]+' has dtype torch.float16; expected one of \['torch.float32'\]"),
    ("transposed moment", r"'exp_avg' of parameter '[\w.]+' has shape \("),
    ("meta moment", r"'exp_avg' of parameter '[\w.]+' is a meta tensor"),
    ("sparse moment", r"'exp_avg' of parameter '[\w.]+' is a torch.sparse_coo tensor"),
    ("step a huge tensor", r"'step' of parameter '[\w.]+' is a tensor of 1000000 elements"),
    ("step a huge number", r"'step' of parameter '[\w.]+' is tensor\(1.0000e\+30\), not a whole count"),
    ("fractional step", r"'step' of parameter '[\w.]+' is tensor\(1.5000\), not a whole count"),
    ("step beyond the group's", r"'step' of parameter '[\w.]+' is \d+, more updates than its group"),
    ("string keys", r"'state' has key '\d+' \(str\): its keys are parameter indices"),
    ("key out of range", r"'state' has key 1000000 \(int\)"),
    ("unknown field", r"parameter '[\w.]+' has field\(s\) \['exp_avg2'\] that optim='adamw' does not keep"),
    ("field named by a number", r"parameter '[\w.]+' has a field named 7 \(int\)"),
    ("scales without codes", r"'exp_avg_absmax' of parameter '[\w.]+' belongs to int8 codes"),
    ("hift not a dict", "'hift' entry is a list"),
])
@pytest.mark.parametrize("offload", [True, False])
def test_a_checkpoint_that_cannot_be_valid_is_refused_and_changes_nothing(how, match, offload):
    model, _ = tiny_llama()
    model.to(torch.bfloat16)
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, strategy="random", offload=offload)
    _train(model, opt, batches("llama", 8), kind="llama")
    saved = copy.deepcopy(opt.state_dict())
    other, _ = tiny_llama(seed=5)
    other.to(torch.bfloat16)
    target = hift_rt.wrap(other, "adamw", lr=1e-2, strategy="random", offload=offload)
    _train(other, target, batches("llama", 3, seed=4), kind="llama")
    before = _snapshot(target, other)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(_corrupt(saved, how))
    _assert_same_snapshot(before, _snapshot(target, other))
    _train(other, target, batches("llama", 2), kind="llama")  # still usable
    target.load_state_dict(copy.deepcopy(opt.state_dict()))  # and a valid one still loads


def test_a_failed_load_of_another_strategy_leaves_the_rotation_and_steps():
    a, _ = mlp()
    opt_a = hift_rt.wrap(a, "adamw", lr=1e-2, strategy="bottom_up")
    _train(a, opt_a, batches("mlp", 3))
    b, _ = mlp()
    opt_b = hift_rt.wrap(b, "adamw", lr=1e-2, strategy="top_down")
    _train(b, opt_b, batches("mlp", 1))
    before = _snapshot(opt_b, b)
    with pytest.raises(ValueError, match="strategy='bottom_up'"):
        opt_b.load_state_dict(opt_a.state_dict())
    _assert_same_snapshot(before, _snapshot(opt_b, b))


# ---- Ctrl-C inside step() ---------------------------------------------------------------------

def test_ctrl_c_inside_step_lets_the_step_finish_then_raises(monkeypatch):
    model, _ = mlp()
    twin, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, offload=True)
    plain = hift_rt.wrap(twin, "adamw", lr=1e-2, offload=True)
    data = batches("mlp", 6)
    _train(model, opt, data[:2])
    _train(twin, plain, data[:2])
    update = opt._updater.update

    def interrupted_update(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the update
        update(*args, **kwargs)
    monkeypatch.setattr(opt._updater, "update", interrupted_update)
    loss_of("mlp", model, data[2]).backward()
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    monkeypatch.undo()
    loss_of("mlp", twin, data[2]).backward()
    plain.step()
    assert opt.group_steps == plain.group_steps and opt.active_group == plain.active_group
    opt.zero_grad()
    plain.zero_grad()
    _train(model, opt, data[3:])  # the next backward works: the new active group is trainable
    _train(twin, plain, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_ctrl_c_at_random_moments_never_breaks_the_optimizer():
    """Real SIGINTs at random moments of a training loop (zero_grad, forward, backward or step).
    After each, the optimizer is consistent: the step happened entirely or not at all, and exactly
    the active group is trainable. An iteration whose step did not complete is redone from the
    same batch (the loop reads its position from the optimizer), and the end result equals an
    uninterrupted run's, bit for bit.

    One signal per round, sent by a thread only after the loop announced (inside its `try`) that
    it trains until interrupted: every signal is delivered where the test catches it."""
    data = batches("mlp", 400)
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, strategy="random", offload=True)
    twin, _ = mlp()
    plain = hift_rt.wrap(twin, "adamw", lr=1e-2, strategy="random", offload=True)
    names = [set(g["params"]) for g in opt.describe_groups()]
    rng = torch.Generator().manual_seed(0)
    armed, caught = threading.Event(), threading.Event()
    rounds, main = 40, threading.main_thread().ident

    def interrupter():
        for _ in range(rounds):
            if not armed.wait(30):
                return
            armed.clear()
            time.sleep(float(torch.rand(1, generator=rng)) * 1.5 * iteration)  # anywhere in an iteration
            signal.pthread_kill(main, signal.SIGINT)
            if not caught.wait(30):
                return
            caught.clear()

    def train_one():
        i = sum(opt.group_steps)  # every step has gradients: the steps done are the batches used
        opt.zero_grad()
        loss_of("mlp", model, data[i]).backward()
        opt.step()

    start = time.perf_counter()
    for _ in range(3):
        train_one()
    iteration = (time.perf_counter() - start) / 3
    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    for _ in range(rounds):
        try:
            armed.set()
            while True:
                train_one()
        except KeyboardInterrupt:
            caught.set()
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == names[opt.active_group], "a step happened only in part"
    thread.join()
    while sum(opt.group_steps) < len(data):
        train_one()
    _train(twin, plain, data)
    assert opt.group_steps == plain.group_steps and opt.active_group == plain.active_group
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# ---- threads, copies, closing -----------------------------------------------------------------

def test_a_second_thread_calling_step_gets_an_error_and_the_optimizer_stays_usable(monkeypatch):
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2)
    inside, release = threading.Event(), threading.Event()
    update = opt._updater.update

    def slow_update(*args, **kwargs):
        inside.set()
        release.wait(10)
        update(*args, **kwargs)
    monkeypatch.setattr(opt._updater, "update", slow_update)
    loss_of("mlp", model, batches("mlp", 1)[0]).backward()
    first = threading.Thread(target=opt.step)
    first.start()
    assert inside.wait(10)
    for call in (opt.step, opt.zero_grad, opt.state_dict):
        with pytest.raises(RuntimeError, match="another thread is inside this optimizer"):
            call()
    release.set()
    first.join()
    monkeypatch.undo()
    assert opt.group_steps == [1, 0, 0, 0] and opt.active_group == 1
    _train(model, opt, batches("mlp", 4))
    assert opt.group_steps == [2, 1, 1, 1]


def test_copying_or_pickling_the_optimizer_is_refused_clearly():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, offload=True)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(opt)
    _train(model, opt, batches("mlp", 2))


def test_state_dict_after_close_is_a_clear_error():
    model, _ = mlp()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, offload=True)
    _train(model, opt, batches("mlp", 2))
    state = opt.state_dict()
    opt.close()
    with pytest.raises(RuntimeError, match="take state_dict\\(\\) before close"):
        opt.state_dict()
    assert all(torch.isfinite(v).all() for e in state["state"].values() for v in e.values())


def test_a_deep_copy_of_a_wrapped_model_is_wrapped_like_the_original():
    model, _ = tiny_llama()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2)
    _train(model, opt, batches("llama", 2), kind="llama")
    twin = copy.deepcopy(model)
    again = hift_rt.wrap(twin, "adamw", lr=1e-2)
    assert [g["params"] for g in again.describe_groups()] == [g["params"] for g in opt.describe_groups()]
    with pytest.raises(ValueError, match="still open"):
        hift_rt.wrap(model, "adamw", lr=1e-2)


# ---- values torch refuses ---------------------------------------------------------------------

@pytest.mark.parametrize("optim,kwargs,error,match", [
    ("adamw", {"lr": math.inf}, ValueError, "lr must be a finite number"),
    ("adamw", {"lr": math.nan}, ValueError, "lr must be a finite number"),
    ("adamw", {"lr": 1e-3, "eps": math.inf}, ValueError, "eps must be a finite number"),
    ("adamw", {"lr": 1e-3, "weight_decay": math.nan}, ValueError, "weight_decay must be a finite number"),
    ("adagrad", {"lr": 1e-3, "initial_accumulator_value": -1.0}, ValueError, "initial_accumulator_value"),
    ("adamw", {"lr": 1e-3, "no_decay": 5}, TypeError, "no_decay must be"),
    ("adamw", {"lr": 1e-3, "max_grad_norm": math.nan}, ValueError, "max_grad_norm must be"),
    ("adamw", {"lr": 1e-3, "seed": 2 ** 70}, ValueError, "seed must be"),
    ("adamw", {}, TypeError, "needs lr="),
])
def test_values_torch_refuses_are_refused_at_wrap(optim, kwargs, error, match):
    model, _ = mlp()
    with pytest.raises(error, match=match):
        hift_rt.wrap(model, optim, **kwargs)
    hift_rt.wrap(model, optim, lr=1e-3).close()  # the failed wraps left the model free
