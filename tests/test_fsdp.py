"""HiFT over FSDP2 (hift_rt.fsdp): gloo ranks on the CPU, spawned as subprocesses
(tests/fsdp_worker.py), against one process of hift_rt on the global batch; the memory planner
on a meta-device Llama-2-70B, with no process group.

Tolerances. fp32: as in tests/test_distributed.py, a rank's gradient is the mean over its
micro-batch and FSDP2 averages the ranks' shards, while one process sums the same terms in
another order: rounding (~1e-7 relative per step), which Adam can amplify where a gradient is
rounding noise (eps = 1e-3 bounds that); 12 steps stay within 2e-5 absolute (weights are
O(0.1)). bf16 weights: their gradients are computed in bf16, so another split of the batch
rounds them differently (2^-8 relative), and int8 moments on other blocks (each rank quantizes
its own shard) can flip a code: either moves an element's update (at most lr = 1e-2 per step)
by a fraction of it, so those runs are held to lr / 2; on top, the stored bf16 weight is a
rounding of an fp32 trajectory (master or Kahan) that differs by that much, so it may land one
bf16 ulp away: the worker subtracts the reference weight's ulp before the comparison. FSDP2's
mixed precision (bf16 copies of fp32 weights) is compared with FSDP2 on a mesh of one rank, held
to lr / 2 for the same bf16 reasons. SGD with momentum is linear in the gradient's scale and
catches a wrong mean over ranks.
"""
import math

import pytest
import torch

import ranks
from hift_rt import fsdp

LR = 1e-2


def launch(scenario, world, out, timeout=600):
    """Run `scenario` of tests/fsdp_worker.py on `world` gloo ranks; each rank's report."""
    # The kernels' torch path: their Triton code is checked by the kernel tests, and the
    # interpreter would take minutes here (one launch per parameter and step).
    return ranks.launch("fsdp_worker.py", scenario, world, out, timeout, env={"TRITON_INTERPRET": "0"})


# With 2 ranks every config; with 3 (uneven and empty shards, a third rank) those whose mechanics
# differ most. The 3-rank launch resumes the 2-rank launch's checkpoint.
WORLDS = {2: ["bottom_up", "top_down-clip-accumulate", "random-upg2", "sgd-momentum", "adagrad-bf16-state-no-offload",
              "bf16-master-no-offload", "bf16-int8-kahan-window", "cpu-offload-policy", "mixed-precision-bf16"],
          3: ["random-upg2", "bf16-int8-kahan-window", "sgd-momentum", "mlp-int8-window", "mixed-precision-bf16"]}


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """world -> rank 0's report, with every rank's equivalence figures merged in."""
    directory = tmp_path_factory.mktemp("fsdp")
    results = {}
    for world, configs in WORLDS.items():
        reports = launch(f"suite:{directory}:{','.join(configs)}", world, str(directory / f"out{world}"))
        merged = dict(reports[0])
        merged["equivalence"] = {name: figures for report in reports for name, figures in report["equivalence"].items()}
        merged["ranks"] = reports
        results[world] = merged
    return results


@pytest.mark.parametrize("world,config", [(w, c) for w, configs in WORLDS.items() for c in configs])
def test_ranks_on_their_micro_batches_equal_one_process_on_the_global_batch(suites, world, config):
    r = suites[world]["equivalence"][config]
    tolerance = LR / 2 if any(s in config for s in ("bf16", "int8")) else 2e-5  # see the module docstring
    assert r["max_abs"] <= tolerance, r
    assert r["steps"] == 12
    assert r["describe"] == r["reference_describe"]  # the same groups, names and sizes (global)
    if r["rank"] == 0:  # rank 0's full state dict holds every parameter's state
        assert r["state_params"] == r["reference_state_params"] > 0


def test_only_the_active_groups_gradients_are_reduce_scattered(suites):
    """FSDP2 reduce-scatters, before each step, exactly the active group's gradients (its own
    reduce-scatter, counted by a custom ReduceScatter): frozen modules send nothing."""
    r = suites[2]["equivalence"]["bottom_up"]
    assert len(r["reduce_scatter_bytes"]) == 12
    for active, sent in r["reduce_scatter_bytes"]:
        assert sum(sent) == r["group_bytes"][active], (active, sent)  # even shards on 2 ranks: no padding


def test_memory_breakdown_is_the_planners_and_fsdps_own_storage(suites):
    """Per rank, opt.memory_breakdown() equals what memory_breakdown(model, shards=R, rank=r) plans
    for the unsharded model, and its weights are the bytes FSDP2 allocated for the local shards."""
    for world in WORLDS:
        for report in suites[world]["ranks"]:
            for name, r in report["equivalence"].items():
                if "planned" in r:
                    assert r["memory"] == r["planned"], (world, name)
                    assert r["memory"]["weights"] == r["local_storage"]
                    assert r["memory"]["state_host"] > r["memory"]["state_device"] > 0  # a window of int8 state


def test_a_dcp_checkpoint_resumes_bit_exact_on_the_same_world_size(suites):
    r = suites[2]["checkpoint"]
    assert r["resume_same_world_max_abs"] == 0.0
    assert r["resumed_steps"] == r["steps"]


def test_a_dcp_checkpoint_from_two_ranks_resumes_on_three(suites, tmp_path_factory):
    """The state loaded on 3 ranks is the one saved on 2: exact for the fp32 masters and for int8
    moments whose blocks follow the rows; the others (norms, the (128, 64) down projections) are
    re-blocked, within half an int8 code step (at most 1/32 of the block's largest value). Loading
    the full state_dict() instead gives the same state. Training on continues the 2-rank run."""
    r = suites[3]["resume"]
    assert r["dcp_vs_full_max_abs"] == 0.0
    for report in suites[3]["ranks"]:  # a NaN in rank 1's shard is refused on every rank, as another format
        refused = report["resume"]["refused"]
        assert "model.layers.0.self_attn.q_proj.weight" in refused["corrupt"] and "non-finite" in refused["corrupt"]
        assert "state_dtype='int8'" in refused["fp32_state"]
        assert "'model.layers.0.self_attn.q_proj.weight' is 99, more updates than its group" in refused["step_beyond"]
        assert refused["unchanged"]
    for name, (error, largest) in r["dcp_vs_saved"].items():
        reblocked = name.split(".weight.")[1] in ("exp_avg", "exp_avg_sq") and ("down_proj" in name or "norm" in name)
        assert error <= largest / 32 if reblocked else error == 0.0, name
    uninterrupted = torch.load(next(tmp_path_factory.getbasetemp().glob("fsdp*/uninterrupted-2.pt")))
    weights = torch.tensor(r["weights"])
    ulp = torch.ldexp(torch.ones_like(uninterrupted), torch.frexp(uninterrupted)[1] - 8)
    assert float(((weights - uninterrupted).abs() - ulp).max()) <= LR / 2  # bf16, int8: see the docstring
    assert r["steps"] == suites[2]["checkpoint"]["steps"]


def test_other_wrappers_and_unsupported_set_ups_are_refused_naming_what_works(suites):
    for report in suites[2]["ranks"]:
        messages = report["refusals"]
        for wrapper in ("ddp", "fsdp1"):
            assert "fully_shard" in messages[wrapper] and "process_group=" in messages[wrapper], wrapper
        assert "DistributedDataParallel" in messages["ddp"] and "FullyShardedDataParallel" in messages["fsdp1"]
        assert "'model.embed_tokens.weight' is not sharded by FSDP2" in messages["blocks_only"]
        assert "leave process_group=None" in messages["process_group_false"]
        assert "fused optimizers" in messages["torch_class"]
        assert "fully_shard" in messages["trainer"] and "hift_rt.wrap" in messages["trainer"]


def test_hift_trainer_refuses_an_fsdp_config(tmp_path):
    from hift_rt.integrations.transformers import HiFTTrainer
    from models import tiny_llama
    from test_transformers_trainer import Tokens, training_args

    with pytest.raises(ValueError, match="fully_shard .*hift_rt.wrap"):
        HiFTTrainer(model=tiny_llama()[0], args=training_args(tmp_path, fsdp=True), train_dataset=Tokens())


def test_grad_scalers_skip_on_every_rank_or_refuse(suites):
    """An inf in one rank's gradient shard: GradScaler and ShardedGradScaler + unscale_ skip the
    step everywhere (no update, no rotation) and halve the scale everywhere; found_inf on one
    rank only (what a scaler that checks local shards reports) makes every rank raise, and the
    optimizer stays usable."""
    for report in suites[2]["ranks"]:
        s = report["scaler"]
        for clean, poisoned in (("plain_0", "plain_1"), ("sharded_2", "sharded_3")):
            assert s[clean]["changed"] and s[clean]["rotated"]
            assert not s[poisoned]["changed"] and not s[poisoned]["rotated"]
            assert s[poisoned]["scale"] == s[clean]["scale"] / 2
        assert "some ranks only" in s["disagreement"] and "ShardedGradScaler" in s["disagreement"]
        assert s["usable_after"]


def test_a_rank_that_dies_mid_step_makes_the_others_raise_not_hang(tmp_path):
    report = launch("dies", 2, str(tmp_path / "dies"), timeout=120)[0]
    assert report["raised"] is not None, "rank 0 completed a step without its peer"
    assert report["seconds"] < 60


LLAMA_2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                   num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)


# Bytes per local element of each state field (64-byte aligned each): AdamW's two moments and the
# master, as fp32, as int8 (codes and one fp32 scale per 128) + fp32 master, or int8 + Kahan (bf16).
FIELDS = {"fp32": [4, 4, 4], "int8": [1, 4 / 128, 1, 4 / 128, 4], "int8-kahan": [1, 4 / 128, 1, 4 / 128, 2]}


@pytest.mark.parametrize("card_gib", [48, 80])
@pytest.mark.parametrize("state,fields", [({}, "fp32"), ({"state_dtype": "int8"}, "int8"),
                                          ({"state_dtype": "int8", "master_weights": "kahan"}, "int8-kahan")])
def test_the_70b_memory_model_on_8_ranks_without_a_process_group(card_gib, state, fields):
    """memory_breakdown on a meta-device Llama-2-70B (bf16) with shards=8, against the README's
    model derived here from the shapes: weights N b / R; the root (embeddings, head, norm) and two
    layers all-gathered; a layer's shard gradient, and its unsharded gradient twice while it is
    reduce-scattered; the state window (1/64 of the card, at most 1 GiB) or the largest group's
    state if smaller; S N / R in host memory (every local shard here is a multiple of 256
    elements; each field of a group starts 64-byte aligned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_2_70B)).to(torch.bfloat16)
    plan = fsdp.memory_breakdown(model, "adamw", shards=8, device_memory=card_gib << 30, **state)

    h, i, v, kv = 8192, 28672, 32000, 1024
    layer = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h
    root = 2 * v * h + h
    n = 80 * layer + root
    assert (n, 2 * n) == (68_976_648_192, sum(p.numel() * p.element_size() for p in model.parameters()))
    window = min(max((card_gib << 30) // 64, 64 << 20), 1 << 30)
    groups = [v * h // 8] + [layer // 8] * 80 + [h // 8 + v * h // 8]  # local elements: embeddings, layers, head
    state_of = [sum(-(-int(n * b) // 64) * 64 for b in FIELDS[fields]) for n in groups]
    largest_state = max(state_of)
    host_bytes_per_param = sum(FIELDS[fields])
    assert plan["weights"] == 2 * n / 8
    assert plan["all_gathered"] == 2 * (root + 2 * layer)
    assert plan["gradients"] == 2 * layer / 8
    assert plan["gradients_transient"] == 2 * 2 * layer
    assert plan["state_host"] == sum(state_of) == pytest.approx(host_bytes_per_param * n / 8, rel=1e-8)
    if largest_state <= window:
        assert plan["state_device"] == largest_state
    else:  # chunks of whole 256-element runs, up to 4 of them
        assert window - 4 * 256 * host_bytes_per_param < plan["state_device"] <= window
    device_total = sum(plan[k] for k in ("weights", "all_gathered", "gradients_transient", "gradients", "state_device"))
    assert device_total < 25 << 30  # + activations: fits 48 GB cards; full FSDP2 AdamW needs 16 N / R = 128 GiB


def test_the_planner_refuses_what_it_cannot_plan():
    from models import tiny_llama

    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="shards"):
        fsdp.memory_breakdown(model, shards=0)
    with pytest.raises(ValueError, match="device_memory"):
        if torch.cuda.is_available():
            raise ValueError("device_memory: (a GPU is present, the card's own memory is used)")
        fsdp.memory_breakdown(model, shards=2)
    with pytest.raises(ValueError, match="fused optimizers"):
        fsdp.memory_breakdown(model, torch.optim.AdamW, shards=2, device="cpu")
    assert math.isclose(fsdp.memory_breakdown(model, shards=2, device="cpu")["state_host"], 0)  # CPU: no offload
