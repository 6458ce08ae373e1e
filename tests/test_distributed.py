"""Data-parallel HiFT on torch.distributed (gloo, CPU): R ranks spawned as subprocesses
(tests/dp_worker.py) against one process fed the concatenated global batch.

Tolerance: a rank's gradient is a mean over its micro-batch, and the ranks' means are averaged by
a reduce-scatter; one process sums the same terms in another order. The fp32 results differ by
rounding (~1e-7 relative per step) that Adam's normalization can amplify where a gradient is
rounding noise (eps=1e-3 bounds that, see tests/test_runtime.py run_pair); two cycles stay within
2e-5 absolute (weights are O(0.1)). bf16 models compute their gradients in bf16, so another split of
the batch rounds them differently by up to 2^-8 relative, and int8 moments can flip a quantization
decision on a last-bit difference: either moves an element's update (at most lr = 1e-2 per step)
by a fraction of it, so those runs are held to lr / 2. Adam barely sees the scale of a gradient;
SGD with momentum is linear in it and catches a wrong mean over ranks.
"""
import pytest
import torch

import dp_worker
import ranks


def launch(scenario, world, tmp_path, timeout=600):
    """Run `scenario` of tests/dp_worker.py on `world` gloo ranks; each rank's report."""
    return ranks.launch("dp_worker.py", scenario, world, str(tmp_path / f"{scenario.split(':')[0]}-{world}"), timeout)


# Every config with 2 ranks; with 3 (shards of odd size, a third rank) those whose mechanics differ
# most: several units per group, int8 through a window, a gradient-scale-sensitive optimizer, the
# replicated torch.optim path (CI time: each rank is a process).
WORLDS = {2: list(dp_worker.CONFIGS), 3: ["random-upg2", "bf16-int8-kahan-window", "sgd-momentum", "torch-class"]}
RUNS = [(world, config) for world, configs in WORLDS.items() for config in configs]


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """world -> {config: figures}: one launch per world, the reports of every rank merged."""
    results = {}
    for world, configs in WORLDS.items():
        reports = launch(f"equivalence:{','.join(configs)}", world, tmp_path_factory.mktemp("dp"))
        results[world] = {name: figures for report in reports for name, figures in report.items()}
    return results


@pytest.mark.parametrize("world,config", RUNS)
def test_ranks_on_their_micro_batches_equal_one_process_on_the_global_batch(equivalence, world, config):
    r = equivalence[world][config]
    tolerance = 5e-3 if "int8" in config or "bf16" in config else 2e-5  # see the module docstring
    assert r["max_abs"] <= tolerance, r
    assert r["steps"] == 12
    if r["rank"] == 0:  # rank 0's state dict holds every parameter's state
        assert r["state_params"] == r["reference_state_params"] > 0


@pytest.mark.parametrize("world,config", [(2, "sgd-momentum"), (3, "random-upg2"), (2, "torch-class"),
                                          (3, "torch-class")])
def test_host_state_per_rank_is_one_over_r_and_traffic_is_two_group_sizes_per_step(equivalence, world, config):
    r = equivalence[world][config]
    comm, cycles = r["comm"], 12 // len(r["group_bytes"])
    if config == "torch-class":  # a torch.optim class runs replicated: whole state, gradients all-reduced
        assert r["host_bytes"] >= r["reference_host_bytes"]  # (flat buffers padded to R shards)
        assert comm["all_reduce"] == cycles * sum(r["group_bytes"]) and "reduce_scatter" not in comm
        return
    # Every rank keeps 1/R of every group's state (the groups' flat buffers padded to R shards).
    per_element = r["reference_host_bytes"] / r["reference_elements"]
    assert abs(r["host_bytes"] - per_element * r["elements"] / world) <= 64 * 3 * len(r["group_bytes"]), r
    # Each step reduce-scatters and all-gathers the active group's flat buffer, nothing else.
    assert comm["reduce_scatter"] == comm["all_gather"] == cycles * sum(r["group_bytes"])
    assert "all_reduce" not in comm


def test_a_checkpoint_from_two_ranks_resumes_on_three_and_on_one(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    launch(f"checkpoint:{path}", 2, tmp_path)
    expected, steps = dp_worker.uninterrupted()
    for world in (3, 1):
        report = launch(f"resume:{path}", world, tmp_path)[0]
        assert report["group_steps"] == steps
        # bf16 weights and int8 moments: lr / 2 (see the module docstring)
        error = (torch.tensor(report["weights"]) - expected).abs()
        assert float(error.max()) <= 5e-3, world


def test_grad_scalers_that_disagree_over_ranks_skip_together_and_average_equal_scales(tmp_path):
    """GradScaler checks each rank's own gradients: after an overflow on one rank only, the
    ranks' scales differ (rank 1's backed off, rank 0's did not). Every rank skipped the step,
    and the later means are of gradients at one scale: the weights equal one process's."""
    reports = launch("scaler_disagreement", 2, tmp_path)
    assert reports[0]["scale"] == 2 * reports[1]["scale"] == 2 * reports[1]["reference_scale"]
    for report in reports:
        assert report["group_steps"] == report["reference_group_steps"]  # the poisoned step: skipped by all
        assert sum(report["group_steps"]) == 9
        assert report["max_abs"] <= 2e-5, report


def test_a_rank_that_dies_mid_step_makes_the_others_raise_not_hang(tmp_path):
    report = launch("dies", 2, tmp_path, timeout=120)[0]
    assert report["raised"] is not None, "rank 0 completed a step without its peer"
    assert report["seconds"] < 60


def test_ranks_that_wrap_differently_are_refused_naming_the_difference(tmp_path):
    for report in launch("mismatch", 2, tmp_path):
        assert "rank 1 differs from rank 0 in settings.seed (0 vs 1)" in report["message"]
        assert report["refused"] == 1 and not report["holds_group"]


def test_a_subgroup_trains_without_the_ranks_outside_it(tmp_path):
    """A non-gloo group gets a gloo twin for host-side flags, built by its members alone (a rank
    outside the group never calls wrap) and destroyed by close(), which lets go of both groups."""
    reports = launch("subgroup", 3, tmp_path, timeout=120)
    assert reports[0]["weights"] == reports[1]["weights"]
    assert reports[0]["host_group_destroyed"] and reports[1]["host_group_destroyed"]
    assert reports[0]["released"] and reports[1]["released"]  # close() holds neither group


@pytest.mark.cuda
def test_the_nccl_path_with_one_rank_equals_no_process_group(tmp_path):
    """On one GPU the NCCL collectives run with R = 1 (an explicit process group): the same numbers
    as without one, and the bytes counted."""
    report = launch("nccl_one_rank", 1, tmp_path)[0]
    assert report["max_abs"] <= 1e-6, report
    assert report["comm"]["reduce_scatter"] > 0 and report["comm"]["all_gather"] > 0 and report["comm"]["all_reduce"] > 0
