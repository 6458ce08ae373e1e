"""hift_rt.methods: each way of training against an independent stock-torch loop."""
import copy

import pytest
import torch

from hift_rt import methods
from models import batches, loss_of, merge_units, tiny_llama
from reference_hift import ReferenceHiFT

NO_DECAY = ("bias", "norm")


def train(method, data, steps):
    for step, batch in zip(range(steps), data):
        method.before_forward(step)
        method.backward(loss_of("llama", method.model, batch))
        method.update()


@pytest.mark.parametrize("units_per_group", [1, 2])
def test_layerwise_sync_is_hift_top_down_with_torch_adamw(units_per_group):
    model, units = tiny_llama(seed=3)
    reference_model = copy.deepcopy(model)
    settings = methods.Settings(lr=0.01, weight_decay=0.1, max_grad_norm=0.05, units_per_group=units_per_group)
    method = methods.LayerwiseSync(model, settings)
    groups = merge_units(units, units_per_group)
    assert method.groups == len(groups)
    reference = ReferenceHiFT(reference_model, groups, torch.optim.AdamW, lr=0.01, strategy="top_down",
                              no_decay=NO_DECAY, max_grad_norm=0.05, weight_decay=0.1)
    data = batches("llama", 2 * len(groups) + 1, seed=4)  # two cycles and a step into the third
    train(method, data, len(data))
    for batch in data:
        loss_of("llama", reference_model, batch).backward()
        reference.step()
        reference.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name
    # At its peak a step holds the largest group's gradients and m, v on the device and every other
    # group's m, v in host memory (the smallest group active, after a cycle; here both are the CPU).
    sizes = [sum(p.numel() for p in method.group_params[g]) for g in range(method.groups)]
    total = sum(sizes)
    assert method.breakdown() == {"weights": 4 * total, "gradients": 4 * max(sizes), "state_device": 8 * max(sizes),
                                  "state_host": 8 * (total - min(sizes))}
    method.close()
    assert all(p.requires_grad for p in model.parameters())


def test_full_is_torch_adamw_without_decay_on_biases_and_norms_with_clipping():
    model, _ = tiny_llama(seed=5)
    reference_model = copy.deepcopy(model)
    method = methods.Full(model, methods.Settings(lr=0.02, weight_decay=0.3, max_grad_norm=0.1))
    named = list(reference_model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n]},
                             {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                            lr=0.02, weight_decay=0.3)
    data = batches("llama", 3, seed=6)
    train(method, data, 3)
    for batch in data:
        loss_of("llama", reference_model, batch).backward()
        torch.nn.utils.clip_grad_norm_(reference_model.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name
    assert method.breakdown()["state_device"] == 8 * sum(p.numel() for p in model.parameters())


def test_full_refuses_float16_weights():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="cannot train float16 weights"):
        methods.Full(model.half(), methods.Settings(lr=0.01))


def test_hift_on_float16_weights_checkpoints_its_grad_scaler():
    model, _ = tiny_llama(seed=7)
    model = model.half()
    twin = copy.deepcopy(model)
    settings = methods.Settings(lr=0.01, offload=False)
    method = methods.HiFT(model, settings)
    assert method.scaler is not None and method.groups == 6
    data = batches("llama", 4, seed=8)
    train(method, data, 2)
    state = method.state_dict()
    assert state["grad_scaler"]["scale"] == method.scaler.get_scale()
    with torch.no_grad():
        for p, q in zip(twin.parameters(), model.parameters()):
            p.copy_(q)
    resumed = methods.HiFT(twin, settings)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == method.scaler.get_scale()
    for step, batch in zip(range(2, 4), data[2:]):
        for m in (method, resumed):
            m.before_forward(step)
            m.backward(loss_of("llama", m.model, batch))
            m.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    method.close()
    resumed.close()


def test_hift_passes_the_state_format_to_wrap():
    model, _ = tiny_llama(seed=9)
    method = methods.HiFT(model.to(torch.bfloat16), methods.Settings(lr=0.01, offload=True, state_dtype="int8",
                                                                     master_weights="kahan"))
    train(method, batches("llama", 2, seed=10), 2)
    hift = method.state_dict()["optimizer"]["hift"]
    assert (hift["state_dtype"], hift["master_weights"]) == ("int8", "kahan")
    elements = sum(g["buffer_numel"] for g in method.optimizer.describe_groups())
    assert 4.0625 * elements <= method.breakdown()["state_host"] <= 4.1 * elements  # int8 m, v + bf16 compensation
    method.close()
