"""hift_rt.compile: one compiled region per unit, graphs shared by the blocks, no recompile at
HiFT's steps, and the eager run's numbers (CPU, torch.compile's backend "aot_eager").

Graphs are counted by the backend itself (dynamo calls it once per graph it compiles) and checked
against dynamo's own counter. The expected count is derived here from HiFT's semantics, not from
hift_rt: a module's graph is fixed by whether its parameters train and whether its input needs a
gradient (some unit below it trains), and blocks of one class and shape share their graphs.

Tolerance: none. aot_eager runs the ATen operators that eager's forward and autograd dispatch,
with the same kernels, in the same order (no fusion, no reordering of reductions; the composite
operators it decomposes are the ones eager decomposes), so losses and weights are bit-identical;
measured: 0 difference in every configuration here. (Inductor fuses and reorders reductions: it
would need a tolerance: measured within 5e-7, see README; and its C++ compile takes about a
minute per run on two cores.)
"""
import contextlib
import io
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import hift_rt
from hift_rt.kernels import _common
from hift_rt.regional import compiled_modules
from models import mlp, tiny_gpt2, tiny_llama

LAYERS = 4
CYCLES = 3


class CountingBackend:
    """aot_eager, counting the graphs dynamo hands it."""

    def __init__(self):
        self.graphs = 0
        self._aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._aot_eager(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Every test starts without compiled graphs, turns a recompile-limit hit into an error
    (instead of a silent fall back to eager) and gets back the settings hift_rt.compile raises.
    The update kernels take their torch path (the Triton interpreter would take minutes here;
    tests/test_kernels.py checks both)."""
    monkeypatch.setattr(_common, "TRITON_ON_CPU", False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8,
                                    accumulated_recompile_limit=256,
                                    skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        yield
    torch._dynamo.reset()


def expected_graphs(units_per_group):
    """Graphs of tiny_llama(LAYERS) compiled by regions, over cycles visiting every group: the
    blocks' (parameters train, input needs a gradient) states, shared by all blocks, plus the final
    norm's. Unit u (0 = embeddings, 1..LAYERS = blocks, LAYERS + 1 = norm and head) trains when the
    active group holds it and its input needs a gradient when the group starts below it."""
    units = LAYERS + 2
    groups = [range(u, min(u + units_per_group, units)) for u in range(0, units, units_per_group)]
    blocks = {(u in g, g[0] < u) for g in groups for u in range(1, LAYERS + 1)}
    norm = {(LAYERS + 1 in g, g[0] < LAYERS + 1) for g in groups}
    return len(blocks) + len(norm)


def train(model, opt, data, scaler=None, amp=False):
    """One HiFT step per batch of `data`; returns the losses. `scaler`: a GradScaler (its scale
    and found_inf reach hift_rt's kernel, as for fp16 weights); `amp`: bf16 autocast."""
    losses = []
    for ids in data:
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.detach().float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
    return losses


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 9), generator=gen) for _ in range(n)]


CASES = {
    # weights' dtype, wrap's arguments, compile before wrap, efficient loss, GradScaler, bf16 autocast
    "fp32-autocast-gradscaler-offload": (torch.float32, {"strategy": "top_down", "offload": True,
                                                         "state_window": 4096}, False, False, True, True),
    "bf16-upg2-random-clip-efficient-loss": (torch.bfloat16, {"strategy": "random", "units_per_group": 2,
                                                              "max_grad_norm": 0.1}, True, True, False, False),
}


def run(case, compiled, backend=None):
    dtype, options, before_wrap, efficient, scaled, amp = CASES[case]
    model, _ = tiny_llama(layers=LAYERS)
    model.to(dtype)
    if efficient:
        hift_rt.efficient_lm_loss(model)
    if compiled and before_wrap:
        hift_rt.compile(model, backend=backend)
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, weight_decay=0.1, no_decay=("norm",), **options)
    if compiled and not before_wrap:
        hift_rt.compile(model, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
    k = len(opt.groups)
    data = batches(CYCLES * k)
    losses = train(model, opt, data[:k], scaler, amp)
    first_cycle_graphs = backend.graphs if compiled else 0
    losses += train(model, opt, data[k:], scaler, amp)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return model, losses, weights, first_cycle_graphs


@pytest.mark.parametrize("case", sorted(CASES))
def test_three_cycles_compile_few_graphs_and_match_the_eager_run(case):
    _, eager_losses, eager_weights, _ = run(case, compiled=False)
    backend = CountingBackend()
    unique_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    model, losses, weights, first_cycle_graphs = run(case, compiled=True, backend=backend)
    assert compiled_modules(model) == [f"model.layers.{i}" for i in range(LAYERS)] + ["model.norm"]
    upg = CASES[case][1].get("units_per_group", 1)
    units = LAYERS + 2
    # The exact count (3 or 4 block graphs for all blocks, 2 for the norm: under the bound
    # of 2 per block + glue units, and under dynamo's default limit of 8 per code object), all
    # compiled in the first cycle: the next two compile nothing.
    assert backend.graphs == expected_graphs(upg) <= 2 * LAYERS + 2, (backend.graphs, expected_graphs(upg))
    assert first_cycle_graphs == backend.graphs
    assert counters["stats"]["unique_graphs"] - unique_before == backend.graphs
    assert sum(counters["graph_break"].values()) == breaks_before  # whole blocks, whole norm
    assert len(losses) == CYCLES * -(-units // upg)
    for step, (a, b) in enumerate(zip(eager_losses, losses)):
        assert torch.equal(a, b), (step, a, b)
    for (name, _), a, b in zip(model.named_parameters(), eager_weights, weights):
        assert torch.equal(a, b), name


def test_resume_mid_cycle_under_compile_matches_an_uninterrupted_run():
    """A run saved mid-cycle and resumed into a fresh model, compiled before wrap this time, ends
    with the uninterrupted run's weights, and the resumed run compiles nothing new: its blocks and
    norm meet the same states, whose graphs dynamo already holds."""
    backend = CountingBackend()
    data = batches(2 * (LAYERS + 2))
    saved_at = 4  # of 6 groups: mid-cycle; the resumed run finishes the cycle and runs one more
    model_a, _ = tiny_llama(layers=LAYERS)
    opt_a = hift_rt.wrap(model_a, "adamw", lr=1e-2, strategy="random", seed=3)
    hift_rt.compile(model_a, backend=backend)
    train(model_a, opt_a, data[:saved_at])
    saved_model = {n: t.clone() for n, t in model_a.state_dict().items()}
    saved_opt = torch.load(_roundtrip(opt_a.state_dict()), weights_only=False)
    active_at_save = opt_a.active_group
    train(model_a, opt_a, data[saved_at:])
    assert backend.graphs == expected_graphs(1)

    model_b, _ = tiny_llama(layers=LAYERS, seed=7)
    model_b.load_state_dict(saved_model)
    hift_rt.compile(model_b, backend=backend)
    opt_b = hift_rt.wrap(model_b, "adamw", lr=1e-2, strategy="random", seed=3)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.active_group == active_at_save
    train(model_b, opt_b, data[saved_at:])
    assert backend.graphs == expected_graphs(1)  # nothing recompiled
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    assert opt_b.group_steps == opt_a.group_steps and opt_b.active_group == opt_a.active_group


def _roundtrip(state):
    """`state` through torch.save, as a checkpoint file holds it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_gradient_checkpointing_blocks_compile_and_match_eager():
    """Hugging Face's checkpointed layers set a Python attribute in their forward, a graph break
    inside the checkpoint unless hift_rt.compile lets dynamo skip replaying it: the blocks would
    run eagerly (only the norm's 2 graphs were compiled)."""
    breaks_before = sum(counters["graph_break"].values())
    results = []
    for compiled in (False, True):
        backend = CountingBackend()
        model, _ = tiny_llama(layers=2)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = hift_rt.wrap(model, "adamw", lr=1e-2)
        if compiled:
            hift_rt.compile(model, backend=backend)
        k = len(opt.groups)
        losses = train(model, opt, batches(k))
        results.append((losses, [p.detach().clone() for p in model.parameters()], backend.graphs))
        opt.close()
    (eager_losses, eager_weights, _), (losses, weights, graphs) = results
    assert sum(counters["graph_break"].values()) == breaks_before
    assert graphs > 2  # the blocks' graphs besides the norm's 2
    assert all(torch.equal(a, b) for a, b in zip(eager_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(eager_weights, weights))


def test_compiled_modules_are_the_units_modules_before_or_after_wrap():
    llama = ["model.layers.0", "model.layers.1", "model.layers.2", "model.norm"]
    model, _ = tiny_llama(layers=3)
    opt = hift_rt.wrap(model, "adamw", lr=1e-3)
    hift_rt.compile(model, backend="aot_eager")  # after wrap: only the active group requires grad
    assert compiled_modules(model) == llama
    assert torch._dynamo.config.recompile_limit == 4 * 4  # raised to 4 per compiled module
    opt.close()
    model, _ = tiny_llama(layers=3)
    assert compiled_modules(hift_rt.compile(model, backend="aot_eager")) == llama
    # GPT-2: its glue is nn.Embedding and nn.LayerNorm (one operator each): only the blocks
    gpt2, _ = tiny_gpt2(layers=3)
    hift_rt.compile(gpt2, backend="aot_eager")
    assert compiled_modules(gpt2) == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert torch._dynamo.config.recompile_limit == 4 * 4  # never lowered
    # units that are torch.nn layers without children: nothing to compile, and it says so
    net, _ = mlp()
    with pytest.warns(UserWarning, match="found nothing to compile"):
        assert hift_rt.compile(net, backend="aot_eager") is net
    assert compiled_modules(net) == []


def test_whole_model_compile_is_refused_by_compile_and_warned_by_wrap():
    model, _ = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="not compiled as a whole"):
        hift_rt.compile(torch.compile(model, backend="aot_eager"))
    with pytest.raises(TypeError, match="takes an nn.Module"):
        hift_rt.compile("model")
    with pytest.warns(UserWarning, match="compiled as a whole.*hift_rt.compile"):
        opt = hift_rt.wrap(torch.compile(model, backend="aot_eager"), "adamw", lr=1e-3)
    opt.close()
    model.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="not compiled as a whole"):
        hift_rt.compile(model)
    with pytest.warns(UserWarning, match="compiled as a whole"):
        hift_rt.wrap(model, "adamw", lr=1e-3).close()
    plain, _ = tiny_llama(layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hift_rt.wrap(hift_rt.compile(plain, backend="aot_eager"), "adamw", lr=1e-3).close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_on_cuda_compiles_few_graphs_and_tracks_eager():
    """The GPU path: inductor's Triton kernels for the blocks, bf16 weights with fp32 masters,
    offloaded state through the CUDA engine. The graph count is exact; the numbers within
    inductor's reordering of bf16 reductions: each step's loss within 2e-2 of eager's (a bf16
    ulp at the loss's size, ~4.2, is 1.6e-2) and the weights within a few bf16 ulps."""
    def one(compiled):
        model, _ = tiny_llama(layers=LAYERS, hidden_size=64, intermediate_size=128)
        model.to("cuda", torch.bfloat16)
        opt = hift_rt.wrap(model, "adamw", lr=1e-3, offload=True, strategy="top_down")
        if compiled:
            hift_rt.compile(model)  # inductor
        data = [ids.cuda() for ids in batches(CYCLES * len(opt.groups))]
        losses = train(model, opt, data)
        weights = [p.detach().float().clone() for p in model.parameters()]
        opt.close()
        return torch.stack(losses).cpu(), weights

    eager_losses, eager_weights = one(False)
    unique_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    losses, weights = one(True)
    assert counters["stats"]["unique_graphs"] - unique_before == expected_graphs(1)
    assert sum(counters["graph_break"].values()) == breaks_before
    assert torch.allclose(losses, eager_losses, rtol=0, atol=2e-2), (losses - eager_losses).abs().max()
    for a, b in zip(eager_weights, weights):
        assert torch.allclose(a, b, rtol=4 * 2 ** -8, atol=1e-5), (a - b).abs().max()
