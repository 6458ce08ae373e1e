"""One rank of the data-parallel tests (tests/test_distributed.py): `python dp_worker.py SCENARIO
RANK WORLD PORT OUT`. Joins a gloo group, runs the scenario, and rank 0 writes a JSON report to OUT
(every rank writes OUT.rank<r> for the per-rank figures)."""
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import hift_rt  # noqa: E402
from models import tiny_llama  # noqa: E402
from ranks import finish, holds_group  # noqa: E402

MICRO = 2  # sequences per rank and micro-batch


def global_batches(steps, accumulate, world, seed=1):
    """steps x accumulate global batches of world * MICRO sequences."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 64, (world * MICRO, 9), generator=gen) for _ in range(accumulate)] for _ in range(steps)]


def train(model, opt, data, part=None, world=1):
    """Train on `data`; rank `part` of `world` takes its slice of each global batch (None: all)."""
    for micro_batches in data:
        for batch in micro_batches:
            if part is not None:
                batch = batch[part * MICRO:(part + 1) * MICRO]
            (model(input_ids=batch, labels=batch).loss / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad()


CONFIGS = {
    "bottom_up": {},
    "top_down": {"strategy": "top_down"},
    "random-upg2": {"strategy": "random", "units_per_group": 2},
    "clip-accumulate": {"max_grad_norm": 0.05, "accumulate": 2},
    "sgd-momentum": {"optim": "sgd", "momentum": 0.9, "strategy": "top_down"},  # linear in the gradient's scale
    "bf16-master-no-offload": {"dtype": torch.bfloat16, "offload": False},
    "bf16-int8-kahan-window": {"dtype": torch.bfloat16, "state_dtype": "int8", "master_weights": "kahan",
                               "state_window": 6000},
    "torch-class": {"optim": torch.optim.RMSprop, "offload": True, "foreach": False, "eps": 1e-3},
}


def wrap(model, config, **extra):
    config = dict(config)
    config.pop("accumulate", None)
    model.to(config.pop("dtype", torch.float32))
    optim = config.pop("optim", "adamw")
    kwargs = {"offload": True, "eps": 1e-3} if optim == "adamw" else {"offload": True}
    kwargs.update(config)
    return hift_rt.wrap(model, optim, lr=1e-2, seed=3, **kwargs, **extra)


def equivalence(rank, world, names):
    """Each config: world ranks on their micro-batches against one process on the global batch.
    Rank i % world computes config i's one-process reference (every rank has the trained weights,
    gathered) and reports it."""
    report = {}
    for i, name in enumerate(names):
        config = CONFIGS[name]
        data = global_batches(steps=12, accumulate=config.get("accumulate", 1), world=world)
        model, _ = tiny_llama()
        opt = wrap(model, config)
        train(model, opt, data, part=rank, world=world)
        figures = {"host_bytes": opt.memory_breakdown()["state_host"], "comm": opt.communication_stats(),
                   "elements": sum(g["buffer_numel"] for g in opt.describe_groups()),
                   "group_bytes": [g["buffer_numel"] * (2 if config.get("dtype") else 4) for g in opt.describe_groups()],
                   "steps": sum(opt.group_steps), "state_params": len(opt.state_dict()["state"])}  # a collective
        opt.close()
        if i % world != rank:
            continue
        reference, _ = tiny_llama()
        ref_opt = wrap(reference, config, process_group=False)
        train(reference, ref_opt, data)
        error = (weights(model) - weights(reference)).abs()
        report[name] = {**figures, "max_abs": float(error.max()), "rank": rank,
                        "reference_host_bytes": ref_opt.memory_breakdown()["state_host"],
                        "reference_elements": sum(g["buffer_numel"] for g in ref_opt.describe_groups()),
                        "reference_state_params": len(ref_opt.state_dict()["state"])}
        ref_opt.close()
    return report


def weights(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


RESUME = {"strategy": "random", "dtype": torch.bfloat16, "state_dtype": "int8"}


def resume_data():
    """12 global batches of 6 sequences: 6 / R each for R = 1, 2, 3."""
    return global_batches(steps=12, accumulate=1, world=3)


def train_share(model, opt, data, rank, world):
    """Train on rank's 1/world of each global batch."""
    for (batch,) in data:
        share = batch.shape[0] // world
        ids = batch[rank * share:(rank + 1) * share]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def checkpoint(rank, world, path):
    """Save after 5 steps with `world` ranks (rank 0's state dict), to resume with other counts."""
    model, _ = tiny_llama()
    opt = wrap(model, RESUME)
    train_share(model, opt, resume_data()[:5], rank, world)
    state = opt.state_dict()
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": state}, path)
    elif state["hift"]["complete"] is not False:
        raise AssertionError("a rank other than 0 must not claim the whole state")
    return {}


def resume(rank, world, path):
    """Load the checkpoint into `world` ranks and continue to step 12; rank 0 reports the weights."""
    saved = torch.load(path, weights_only=False)
    model, _ = tiny_llama(seed=5)
    model.to(torch.bfloat16)
    model.load_state_dict(saved["model"])
    opt = wrap(model, RESUME)
    opt.load_state_dict(saved["opt"])
    train_share(model, opt, resume_data()[5:], rank, world)
    return {"weights": weights(model).tolist(), "group_steps": opt.group_steps}


def uninterrupted():
    """The same 12 steps in one process."""
    model, _ = tiny_llama()
    opt = wrap(model, RESUME, process_group=False)
    train_share(model, opt, resume_data(), 0, 1)
    return weights(model), opt.group_steps


def dies(rank, world):
    """Rank 1 exits in the middle of a step; rank 0 must get an error from the collective's timeout."""
    model, _ = tiny_llama()
    return step_after_peer_exit(model, wrap(model, {}), rank, world)


def step_after_peer_exit(model, opt, rank, world):
    """Backward on this rank's share of one batch; rank 1 then exits, and rank 0's step (its
    collective) must raise: the error's type, message and seconds it took."""
    batch = global_batches(1, 1, world)[0][0][rank * MICRO:(rank + 1) * MICRO]
    model(input_ids=batch, labels=batch).loss.backward()
    if rank == 1:
        os._exit(0)
    start = time.monotonic()
    try:
        opt.step()
    except Exception as exc:  # torch.distributed reports the lost peer or the timeout
        return {"raised": type(exc).__name__, "message": str(exc)[:300], "seconds": time.monotonic() - start}
    return {"raised": None}


def nccl_one_rank(rank, world):
    """One GPU: the NCCL path with R = 1 (an explicit group) against no process group at all."""
    results = []
    for group in (dist.group.WORLD, False):
        model, _ = tiny_llama()
        model.cuda()
        opt = hift_rt.wrap(model, "adamw", lr=1e-2, seed=3, eps=1e-3, max_grad_norm=0.05, process_group=group)
        data = [[b.cuda() for b in step] for step in global_batches(steps=12, accumulate=1, world=1)]
        train(model, opt, data)
        results.append((weights(model).cpu(), opt.communication_stats()))
    return {"max_abs": float((results[0][0] - results[1][0]).abs().max()), "comm": results[0][1]}


def subgroup(rank, world):
    """Ranks 0 and 1 of 3 train on a subgroup whose backend reads as NCCL, so the communicator
    builds its own gloo group for host-side flags; rank 2 never calls wrap and must not be needed
    (it ends at once). close() destroys that gloo group."""
    if rank == 2:
        return {}
    group = dist.new_group([0, 1], use_local_synchronization=True)
    get_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"  # the gloo subgroup stands in for an NCCL one
    model, _ = tiny_llama()
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, seed=3, eps=1e-3, process_group=group)
    host_group = opt._comm.host_group
    assert host_group is not group
    train(model, opt, global_batches(steps=3, accumulate=1, world=2), part=rank, world=2)
    opt.close()
    dist.get_backend = get_backend
    try:
        dist.get_rank(host_group)
        destroyed = False
    except (ValueError, RuntimeError):  # torch: "Invalid process group specified" once destroyed
        destroyed = True
    return {"weights": weights(model).tolist(), "host_group_destroyed": destroyed,
            "released": not holds_group(opt._comm)}


def scaled_run(model, opt, data, part, world, poisoned_step, poison):
    """SGD steps through a GradScaler; at `poisoned_step` the loss is multiplied by inf where
    `poison` says (one rank only, or the one process): its gradients are inf/NaN."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step, (batch,) in enumerate(data):
        if part is not None:
            batch = batch[part * MICRO:(part + 1) * MICRO]
        loss = model(input_ids=batch, labels=batch).loss
        if step == poisoned_step and poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return scaler.get_scale()


def scaler_disagreement(rank, world):
    """Rank 1 alone finds inf gradients at step 3: every rank skips it, rank 1's scaler backs off
    alone, and the later steps must still average equally scaled gradients. Against one process
    on the global batch whose step 3 overflows. SGD with momentum: linear in the gradient's scale."""
    config = {"optim": "sgd", "momentum": 0.9, "strategy": "top_down"}
    data = global_batches(steps=10, accumulate=1, world=world)
    model, _ = tiny_llama()
    opt = wrap(model, config)
    scale = scaled_run(model, opt, data, rank, world, poisoned_step=3, poison=rank == 1)
    steps = opt.group_steps
    opt.close()
    reference, _ = tiny_llama()
    ref_opt = wrap(reference, config, process_group=False)
    ref_scale = scaled_run(reference, ref_opt, data, None, 1, poisoned_step=3, poison=True)
    return {"max_abs": float((weights(model) - weights(reference)).abs().max()), "scale": scale,
            "reference_scale": ref_scale, "group_steps": steps, "reference_group_steps": ref_opt.group_steps}


def mismatch(rank, world):
    """Rank 1 wraps with another seed: wrap must refuse on every rank, naming it; the refused,
    half-built optimizer (reachable from the traceback) must no longer hold the process group."""
    model, _ = tiny_llama()
    try:
        hift_rt.wrap(model, "adamw", lr=1e-2, seed=rank)
    except ValueError as exc:
        half_built = [frame.f_locals.get("self") for frame, _ in traceback.walk_tb(exc.__traceback__)]
        refused = [o for o in half_built if isinstance(o, hift_rt.HiFTOptimizer)]
        return {"message": str(exc), "refused": len(refused),
                "holds_group": any(holds_group(o._comm) for o in refused)}
    return {"message": None}


def main():
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    timeout = timedelta(seconds=10 if scenario in ("dies", "subgroup") else 300)
    backend = "nccl" if scenario == "nccl_one_rank" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    if scenario.startswith("equivalence:"):
        report = equivalence(rank, world, scenario.split(":", 1)[1].split(","))
    elif scenario.startswith("checkpoint:"):
        report = checkpoint(rank, world, scenario.split(":", 1)[1])
    elif scenario.startswith("resume:"):
        report = resume(rank, world, scenario.split(":", 1)[1])
    else:
        report = {"dies": dies, "mismatch": mismatch, "nccl_one_rank": nccl_one_rank, "subgroup": subgroup,
                  "scaler_disagreement": scaler_disagreement}[scenario](rank, world)
    finish(report, out, rank, peer_lost=scenario == "dies")


if __name__ == "__main__":
    main()
