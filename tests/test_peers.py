"""The peers of hift in hift_rt.methods (badam, lisa, galore, apollo, adam-mini, adalomo, adamw8bit,
and full, lora, hift beside them): each trains what it claims and only that, the memory rule
counted from the tensors against hand counts and against memory_rule's formulas, LISA against a
straightforward loop, and the benchmark and the job with a peer. The peers' packages are part of
the [test] extra: a missing one fails here, it is never skipped."""
import argparse
import copy
import json
import re
import time

import pytest
import torch

from hift_rt import methods
from hift_rt.bench import fidelity, memory_rule
from hift_rt.bench.__main__ import main as bench_main
from hift_rt.cli import main as cli_main
from models import batches, loss_of, tiny_llama

MICRO = fidelity._model_config(fidelity.PRESETS["micro"], fidelity.PRESETS["micro"].seq_len)
H, I, V, LAYERS = MICRO["hidden_size"], MICRO["intermediate_size"], MICRO["vocab_size"], MICRO["num_hidden_layers"]
# Options that make "only those" mean something on the 2-layer micro model: LISA draws 1 of 2
# layers; BAdam (every 50 steps) and hift (4 groups) train a part of it in 3 steps anyway.
OPTIONS = {"hift": {"offload": True}, "lisa": {"layers": 1}}


def micro_model():
    return fidelity._build_model(MICRO, "cpu", torch.float32)


def train_three_steps(name, lr=1e-3):
    """The method over a fresh micro model after 3 steps; the names of the parameters it said it
    trained (requires_grad after before_forward) and of those that changed."""
    method = methods.METHODS[name](micro_model(), methods.Settings(lr=lr, max_grad_norm=1.0,
                                                                   options=tuple(OPTIONS.get(name, {}).items())))
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    claimed = set()
    for step, batch in enumerate(torch.randint(0, V, (3, 4, 32), generator=torch.Generator().manual_seed(1))):
        method.before_forward(step)
        claimed |= {n for n, p in method.model.named_parameters() if p.requires_grad}
        loss = method.model(input_ids=batch, labels=batch).loss
        assert torch.isfinite(loss)
        method.backward(loss)
        method.update()
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(p, before[n])}
    return method, claimed, changed


# Hand counts of the micro model (hidden H = 32, MLP I = 64, vocabulary V = 256, 2 layers, 2
# heads), fp32 everywhere, in elements; bytes are 4 per element (uint8 codes: 1).
LAYER = 4 * H * H + 3 * H * I + 2 * H                     # q, k, v, o; gate, up, down; 2 norms
GLUE = 2 * V * H + H                                      # embeddings, head, final norm
N = GLUE + LAYERS * LAYER
RANK = H // 4                                             # GaLore's and APOLLO's r = width / 4
HAND = {
    "full": (4 * N, 8 * N, 0),
    # r = 16 adapters (r x in, out x r) on q, k, v, o (H -> H), gate, up (H -> I), down (I -> H)
    "lora": (4 * LAYERS * 16 * (4 * 2 * H + 3 * (H + I)), 8 * LAYERS * 16 * (4 * 2 * H + 3 * (H + I)), 0),
    # offloaded: the largest group (a layer: its matrices are multiples of 256 elements, its 2
    # norms are rounded up to 256 each) on the device, every group's m and v in host memory
    # (embeddings; 2 layers; final norm + head)
    "hift": (4 * (LAYER - 2 * H + 2 * 256), 8 * (LAYER - 2 * H + 2 * 256),
             8 * (V * H + 2 * (LAYER - 2 * H + 2 * 256) + V * H + 256)),
    # one layer: its fp32 gradients; m, v and the fp32 master copy
    "badam": (4 * LAYER, 12 * LAYER, 0),
    # embeddings, final norm, head and 1 drawn layer
    "lisa": (4 * (GLUE + LAYER), 8 * (GLUE + LAYER), 0),
    # per layer: q, k, v, o, gate, up (m >= n) keep m x r moments and the H x H factor Vh they
    # slice their projection from; down (H x I) r x I moments and the H x H factor U
    "galore": (4 * N, 4 * (LAYERS * (4 * (H * H + 2 * H * RANK) + 2 * (H * H + 2 * I * RANK) + H * H + 2 * RANK * I)
                           + 2 * (GLUE + 2 * LAYERS * H)), 0),
    # per projected weight: the random r x n (or m x r) projection, the moments, one norm
    "apollo": (4 * N, 4 * (LAYERS * (4 * (RANK * H + 2 * H * RANK + 1) + 2 * (RANK * H + 2 * I * RANK + 1)
                                     + H * RANK + 2 * RANK * I + 1) + 2 * (GLUE + 2 * LAYERS * H)), 0),
    # m everywhere; second moments: 2 heads for q and for k, a row per output neuron of v, o,
    # gate, up, down, embeddings and head, one per norm
    "adam-mini": (4 * N, 4 * (N + LAYERS * (2 + 2 + H + H + I + I + H + 2) + V + V + 1), 0),
    # the head's gradient and the final norm's; row + column second moments per matrix
    "adalomo": (4 * (V * H + H), 4 * (2 * (V + H) + LAYERS * (4 * 2 * H + 3 * (H + I) + 2 * H) + H), 0),
    # embeddings and head (>= 4096 elements): 8-bit m and v, an fp32 absmax per 256, the two
    # shared 256-entry code tables; the rest fp32 m and v
    "adamw8bit": (4 * N, 2 * (2 * V * H + 2 * 4 * V * H // 256) + 2 * 256 * 4 + 8 * (N - 2 * V * H), 0),
}


@pytest.mark.parametrize("name", ["full", "lora", "hift", *[p for p in methods.PEERS if p != "lora"]])
def test_each_method_trains_what_it_claims_and_holds_the_hand_counted_memory(name):
    assert methods.METHODS[name].unavailable() is None  # the [test] extra installs every peer
    method, claimed, changed = train_three_steps(name)
    all_names = {n for n, _ in method.model.named_parameters()}
    assert claimed and changed == claimed, (sorted(claimed - changed), sorted(changed - claimed))
    if name in ("hift", "badam", "lisa", "lora"):
        assert claimed < all_names  # the part it trains, not everything
    memory = method.breakdown()
    gradients, device, host = HAND[name]
    assert (memory["gradients"], memory["state_device"], memory["state_host"]) == (gradients, device, host)
    # memory_rule works out the same bytes from the shapes alone
    assert memory_rule.rule(name, OPTIONS.get(name, {}), MICRO) == {
        "gradients": gradients, "state_device": device, "state_host": host}
    method.close()


def test_memory_rule_for_llama_2_7b_by_hand():
    n, layer = 6738415616, 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    assert n == 32000 * 4096 * 2 + 4096 + 32 * layer
    full = memory_rule.rule("full", {}, memory_rule.LLAMA_2_7B)
    assert full == {"gradients": 4 * n, "state_device": 8 * n, "state_host": 0}
    assert memory_rule.rule("badam", {}, memory_rule.LLAMA_2_7B)["state_device"] == 12 * layer
    # hift, bf16 weights with an fp32 master: a layer's bf16 gradients and 12 bytes of state per
    # element of it on the device; 12 bytes per parameter (plus padding) in host memory
    hift = memory_rule.rule("hift", {}, memory_rule.LLAMA_2_7B, weight_bytes=2)
    assert hift["gradients"] == 2 * layer and hift["state_device"] == 12 * layer
    assert 12 * n <= hift["state_host"] < 12 * n * 1.0001
    assert memory_rule.rule("lisa", {}, memory_rule.LLAMA_2_7B)["gradients"] == 4 * (n - 32 * layer + 2 * layer)


def straightforward_lisa(model, steps_data, layers, interval, seed, lr, weight_decay, max_grad_norm):
    """LISA as the paper's loop says it, one torch AdamW per parameter: every `interval` steps
    draw `layers` of the model's layers (uniformly, without replacement), freeze the others and
    forget the optimizers of the layers frozen again; embeddings, final norm and head always train."""
    blocks = [list(layer.parameters()) for layer in model.model.layers]
    always = [p for n, p in model.named_parameters() if ".layers." not in n]
    names = {id(p): n for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    optimizers, active = {}, []
    for step, batch in enumerate(steps_data):
        if step % interval == 0:
            drawn = sorted(torch.randperm(len(blocks), generator=generator)[:layers].tolist())
            for i in active:
                if i not in drawn:
                    for p in blocks[i]:
                        optimizers.pop(id(p), None)
            active = drawn
        chosen = {id(p) for p in always + [p for i in active for p in blocks[i]]}
        trained = [p for p in model.parameters() if id(p) in chosen]  # the model's order: one norm sum
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        loss_of("llama", model, batch).backward()
        torch.nn.utils.clip_grad_norm_(trained, max_grad_norm)
        for p in trained:
            decay = 0.0 if ("norm" in names[id(p)] or "bias" in names[id(p)]) else weight_decay
            if id(p) not in optimizers:
                optimizers[id(p)] = torch.optim.AdamW([p], lr=lr, weight_decay=decay)
            optimizers[id(p)].step()
            p.grad = None
    return optimizers


def test_lisa_is_the_papers_loop_and_resumes_to_the_same_numbers():
    model, _ = tiny_llama(seed=11, layers=5)  # 5 layers of odd-sized 16-wide blocks
    reference_model, resumed_model = copy.deepcopy(model), copy.deepcopy(model)
    settings = methods.Settings(lr=0.01, weight_decay=0.1, max_grad_norm=0.05, seed=3,
                                options=(("layers", 2), ("interval", 3)))
    method = methods.LISA(model, settings)
    data = batches("llama", 8, seed=12)  # three draws, the last mid-interval
    for step, batch in enumerate(data):
        method.before_forward(step)
        method.backward(loss_of("llama", method.model, batch))
        method.update()
        if step == 4:
            saved = copy.deepcopy(method.state_dict())
            with torch.no_grad():
                for p, q in zip(resumed_model.parameters(), model.parameters()):
                    p.copy_(q)
    optimizers = straightforward_lisa(reference_model, data, 2, 3, 3, 0.01, 0.1, 0.05)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name
    # the state held is that of the always-trained parameters and of the 2 active layers
    held = {n for n, p in model.named_parameters() if p in method.optimizer.state}
    assert held == {n for n, p in reference_model.named_parameters() if id(p) in optimizers}
    assert len(held) == 3 + 2 * 9
    resumed = methods.LISA(resumed_model, settings)
    resumed.load_state_dict(saved)
    for step, batch in enumerate(data[5:], start=5):
        resumed.before_forward(step)
        resumed.backward(loss_of("llama", resumed.model, batch))
        resumed.update()
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    method.close()
    assert all(p.requires_grad for p in model.parameters())


def test_adalomo_updates_in_backward_refuses_accumulation_and_close_removes_its_hooks():
    method, _, _ = train_three_steps("adalomo")
    batch = torch.randint(0, V, (2, 16))
    method.backward(method.model(input_ids=batch, labels=batch).loss)
    with pytest.raises(ValueError, match="cannot accumulate gradients"):
        method.backward(method.model(input_ids=batch, labels=batch).loss)
    method.update()
    method.close()
    before = [p.detach().clone() for p in method.model.parameters()]
    method.model(input_ids=batch, labels=batch).loss.backward()  # a plain model again: no update
    assert all(torch.equal(p, q) for p, q in zip(method.model.parameters(), before))


def test_a_missing_package_makes_a_method_unavailable_not_a_failed_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(methods.GaLore, "module", "hift_rt_no_such_package")
    assert "needs the package galore-torch (pip install 'hift_rt[peers]')" in methods.GaLore.unavailable()
    with pytest.raises(methods.Unavailable, match="galore needs the package galore-torch"):
        methods.GaLore(micro_model(), methods.Settings(lr=1e-3))
    out = tmp_path / "run.json"
    assert bench_main(["fidelity", "--preset", "micro", "--cache-dir", str(tmp_path / "cache"), "--methods", "full",
                       "galore", "lisa:layers=1", "--seeds", "0", "--steps", "4", "--evals", "2", "--pretrain-steps",
                       "3", "--json", str(out)]) == 0
    assert re.search(r"galore +unavailable: needs the package galore-torch", capsys.readouterr().out)
    report = json.loads(out.read_text())
    assert set(report["settings"]["unavailable"]) == {"galore"} and {r["method"] for r in report["runs"]} == {
        "full", "lisa:layers=1"}
    rows = {row["method"]: row for row in report["summary"]["rows"]}
    assert rows["full"]["memory_fraction"] == {"device": 1.0, "host": 0.0}
    assert rows["lisa:layers=1"]["memory_fraction"]["device"] == pytest.approx(
        (4 + 8) * (GLUE + LAYER) / (12 * N))
    assert rows["lisa:layers=1"]["rule_fraction"]["device"] == pytest.approx(
        (6738415616 - 31 * 202383360) / 6738415616)
    assert rows["lisa:layers=1"]["time_vs_full"] > 0 and rows["lisa:layers=1"]["equal"]["updates"]["full"] is None


def test_job_compares_hift_with_a_peer_and_refuses_what_a_peer_cannot_do(tmp_path, capsys):
    from test_cli import FAST, tiny_hf_model

    model = tmp_path / "model"
    tiny_hf_model(model)
    out = tmp_path / "runs.json"
    assert cli_main(["finetune", *FAST, "--steps", "3", "--model", str(model), "--compare", "badam",
                     "--json", str(out)]) == 0
    hift, badam = json.loads(out.read_text())
    assert (hift["method"], badam["method"], badam["groups"]) == ("hift", "badam", 2)
    assert all(torch.isfinite(torch.tensor(badam["losses"])))
    capsys.readouterr()
    assert cli_main(["finetune", *FAST, "--steps", "3", "--model", str(model), "--compare", "adalomo",
                     "--grad-accum", "2"]) == 2
    err = capsys.readouterr().err
    assert "--compare adalomo updates inside the backward pass: it cannot take --grad-accum 2" in err


@pytest.mark.parametrize("name", ["full", "adalomo"])
def test_counting_memory_is_left_out_of_the_benchmarks_step_times(name, monkeypatch):
    """Every method but hift counts its memory inside its steps (after each optimizer step;
    AdaLomo in every gradient hook): the fidelity benchmark's step times must not include it.
    Counting is made to take 0.2 s here; a step of the micro model takes milliseconds."""
    real_count = methods.Method._count

    def slow_count(self, *args, **kwargs):
        time.sleep(0.2)
        return real_count(self, *args, **kwargs)

    monkeypatch.setattr(methods.Method, "_count", slow_count)
    method = methods.METHODS[name](micro_model(), methods.Settings(lr=1e-3))
    setup = argparse.Namespace(device="cpu", clock="wall", autocast=False, eval_every=10 ** 6)
    data = fidelity._Batches(torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(0)), 32, 2, 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(method.optimizer, lambda step: 1.0)
    step_times, _ = fidelity._train(method, schedule, data, 2, setup)
    assert method.accounting["wall"] >= 2 * 0.2
    assert all(t < 0.2 for t in step_times), step_times
