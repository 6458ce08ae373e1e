"""One rank of the FSDP2 tests (tests/test_fsdp.py): `python fsdp_worker.py SCENARIO RANK WORLD PORT OUT`.
Joins a gloo group, runs the scenario and writes its report to OUT.rank<r> (JSON).

Scenarios: "suite:DIR:CONFIGS" (the refusals and the GradScaler on 2 ranks, each config of CONFIGS
against one process, and the checkpoint steps for this world size), "dies"."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

sys.path.insert(0, os.path.dirname(__file__))
import hift_rt  # noqa: E402
from hift_rt import fsdp  # noqa: E402
from dp_worker import MICRO, global_batches, resume_data, step_after_peer_exit, train, train_share, weights  # noqa: E402
from models import tiny_llama  # noqa: E402
from ranks import finish  # noqa: E402


def mlp(seed=0):
    """Hostile sizes: on 3 ranks the (1, 7) weight and (1,) bias have empty shards on ranks 1 and 2,
    and no shard holds a multiple of 128 elements (int8 states update their last block staged)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 5), nn.LayerNorm(5), nn.Linear(5, 7), nn.Linear(7, 1))


def shard(model, **fsdp_args):
    """fully_shard each block (each layer of a Llama, each child of a Sequential), then the root."""
    blocks = model.model.layers if hasattr(model, "model") else list(model)
    for block in blocks:
        fully_shard(block, **fsdp_args)
    return fully_shard(model, **fsdp_args)


CONFIGS = {
    "bottom_up": {},
    "top_down-clip-accumulate": {"strategy": "top_down", "max_grad_norm": 0.05, "accumulate": 2},
    "random-upg2": {"strategy": "random", "units_per_group": 2},
    "sgd-momentum": {"optim": "sgd", "momentum": 0.9},  # linear in the gradient's scale
    "adagrad-bf16-state-no-offload": {"optim": "adagrad", "state_dtype": "bf16", "offload": False},
    "bf16-master-no-offload": {"dtype": torch.bfloat16, "offload": False},
    "bf16-int8-kahan-window": {"dtype": torch.bfloat16, "state_dtype": "int8", "master_weights": "kahan",
                               "state_window": 6000},
    "cpu-offload-policy": {"fsdp": {"offload_policy": CPUOffloadPolicy(pin_memory=False)}},
    "mixed-precision-bf16": {"fsdp": {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                        reduce_dtype=torch.float32)}},
    "mlp-int8-window": {"model": "mlp", "state_dtype": "int8", "state_window": 6000, "max_grad_norm": 0.5},
}


def wrap(model, config, **extra):
    config = dict(config)
    for key in ("accumulate", "fsdp", "model", "dtype"):
        config.pop(key, None)
    optim = config.pop("optim", "adamw")
    kwargs = {"offload": True, "eps": 1e-3} if optim in ("adamw", "adagrad") else {"offload": True}
    kwargs.update(config)
    return hift_rt.wrap(model, optim, lr=1e-2, seed=3, **kwargs, **extra)


def build(config, seed=0):
    model = mlp(seed) if config.get("model") == "mlp" else tiny_llama(seed)[0]
    return model.to(config.get("dtype", torch.float32))


def mlp_batches(steps, world, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(world * MICRO, 8, generator=gen), torch.randn(world * MICRO, 1, generator=gen))]
            for _ in range(steps)]


def train_mlp(model, opt, data, part=None):
    for (x, y), in data:
        if part is not None:
            x, y = x[part * MICRO:(part + 1) * MICRO], y[part * MICRO:(part + 1) * MICRO]
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def full_weights(model):
    """Every parameter gathered (a collective), flattened in model order."""
    return torch.cat([p.full_tensor().detach().float().reshape(-1) for p in model.parameters()])


class CountingReduceScatter(DefaultReduceScatter):
    """FSDP2's own reduce-scatter, counting the bytes handed to it."""

    def __init__(self, log):
        self.log = log

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.log.append(input_tensor.numel() * input_tensor.element_size())
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


def equivalence(rank, world, names):
    """Each config: world FSDP2 ranks on their micro-batches against one process of hift_rt (no
    FSDP) on the global batch. Rank i % world computes config i's reference."""
    report = {}
    for i, name in enumerate(names):
        config = CONFIGS[name]
        is_mlp = config.get("model") == "mlp"
        data = mlp_batches(12, world) if is_mlp else global_batches(12, config.get("accumulate", 1), world)
        model = shard(build(config), **config.get("fsdp", {}))
        opt = wrap(model, config)
        figures = {"groups": len(opt.groups), "memory": opt.memory_breakdown(),
                   "describe": [(g["name"], g["params"], g["numel"]) for g in opt.describe_groups()]}
        log, active = [], []
        if name == "bottom_up":  # which gradients FSDP2 reduce-scatters, step by step
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.set_custom_reduce_scatter(CountingReduceScatter(log))
            opt.step = _logging_step(opt, log, active)
        if is_mlp:
            train_mlp(model, opt, data, part=rank)
        else:
            train(model, opt, data, part=rank, world=world)
        if name == "bottom_up":
            figures["reduce_scatter_bytes"] = active
            figures["group_bytes"] = [sum(p.numel() for _, p in group.params) * 4 for group in opt.groups]
        if name == "bf16-int8-kahan-window":  # memory_breakdown against the planner and FSDP2's storage
            figures["planned"] = fsdp.memory_breakdown(build(config), "adamw", shards=world, rank=rank, device="cpu",
                                                       offload=True, state_dtype="int8", master_weights="kahan",
                                                       state_window=6000)
            figures["local_storage"] = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
        trained = full_weights(model)
        figures.update(steps=sum(opt.group_steps), state_params=len(opt.state_dict()["state"]))  # a collective
        opt.close()
        if i % world != rank:
            continue
        if "mp_policy" in config.get("fsdp", {}):
            # FSDP2's mixed precision (bf16 copies of the weights, gradients reduced in fp32) has no
            # plain equivalent (autocast keeps fp32 norms and loss): the reference is FSDP2 on this
            # rank alone, a mesh of one.
            alone = DeviceMesh.from_group(dist.new_group([rank], use_local_synchronization=True), "cpu")
            reference = shard(build(config), mesh=alone, **config["fsdp"])
            ref_opt = wrap(reference, config)
            train(reference, ref_opt, data)
            reference_weights = full_weights(reference)
        else:
            reference = build(config)
            ref_opt = wrap(reference, config, process_group=False)
            if is_mlp:
                train_mlp(reference, ref_opt, data)
            else:
                train(reference, ref_opt, data)
            reference_weights = weights(reference)
        error = (trained - reference_weights).abs()
        if config.get("dtype") == torch.bfloat16:  # less the reference weight's ulp (see tests/test_fsdp.py)
            error = error - torch.ldexp(torch.ones_like(error), torch.frexp(reference_weights)[1] - 8)
        described = [[g["name"], g["params"], g["numel"]] for g in ref_opt.describe_groups()]
        report[name] = {**figures, "max_abs": float(error.max()), "rank": rank, "reference_describe": described,
                        "reference_state_params": len(ref_opt.state_dict()["state"])}
        ref_opt.close()
    return report


def _logging_step(opt, log, active):
    """opt.step that records, per step, the bytes FSDP2 reduce-scattered since the last one."""
    step = opt.step

    def logged(*args, **kwargs):
        active.append([opt.active_group, list(log)])
        log.clear()
        return step(*args, **kwargs)
    return logged


# ---- checkpoints ------------------------------------------------------------------------------

RESUME = {"dtype": torch.bfloat16, "strategy": "random", "state_dtype": "int8"}


def resume_model(seed=0):
    """Rows of 128 elements for most weights (their int8 blocks follow the rows: exact at any world
    size); the (128, 64) down projections and the norms do not (re-blocked on another world size)."""
    model, _ = tiny_llama(seed, layers=2, hidden_size=128, intermediate_size=64)
    return shard(model.to(torch.bfloat16))


def state_values(state_dict):
    """name -> fp32 tensor of every state field in a full state dict (rank 0's)."""
    out = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"{index}.{key}"] = value.float().reshape(-1)
    return out


def checkpoint(rank, world, directory):
    """2 ranks: 5 steps, save (DCP and the full state dict), continue to 12; then resume the DCP
    checkpoint on 2 ranks and train the same 7 steps: the same weights, bit for bit."""
    data = resume_data()
    model = resume_model()
    opt = wrap(model, RESUME)
    train_share(model, opt, data[:5], rank, world)
    dcp.save({"model": model.state_dict(), "optim": opt.sharded_state_dict()}, checkpoint_id=os.path.join(directory, "dcp"))
    full = opt.state_dict()
    if rank == 0:
        torch.save(full, os.path.join(directory, "full.pt"))
    train_share(model, opt, data[5:], rank, world)
    uninterrupted, steps = full_weights(model), opt.group_steps
    opt.close()

    model = resume_model(seed=5)
    opt = wrap(model, RESUME)
    dcp.load({"model": model.state_dict()}, checkpoint_id=os.path.join(directory, "dcp"))
    opt.load_sharded_state_dict(os.path.join(directory, "dcp"))
    # A copy of the checkpoint whose rank 1 holds NaN master weights: corrupt.
    state = opt.sharded_state_dict()
    if rank == 1:
        entry = state["state"]["model.layers.0.self_attn.q_proj.weight"]
        entry["master"] = entry["master"].clone()
        entry["master"].to_local().view(-1)[:4] = float("nan")
    dcp.save({"optim": state}, checkpoint_id=os.path.join(directory, "corrupt"))
    # And one whose step count for a parameter exceeds its group's (an edited or crafted file).
    state = opt.sharded_state_dict()
    state["state"]["model.layers.0.self_attn.q_proj.weight"]["step"] = torch.tensor(99.0)
    dcp.save({"optim": state}, checkpoint_id=os.path.join(directory, "step_beyond"))
    train_share(model, opt, data[5:], rank, world)
    resumed = full_weights(model)
    torch.save(uninterrupted, os.path.join(directory, f"uninterrupted-{world}.pt"))
    return {"resume_same_world_max_abs": float((resumed - uninterrupted).abs().max()),
            "steps": steps, "resumed_steps": opt.group_steps}


def resume(rank, world, directory):
    """Another world size: load the DCP checkpoint and, apart, the full state dict; both states
    against the one saved; then train to step 12."""
    data = resume_data()
    model = resume_model(seed=5)
    opt = wrap(model, RESUME)
    refused = {}
    for what, other in (("corrupt", opt), ("step_beyond", opt),
                        ("fp32_state", wrap(resume_model(), {**RESUME, "state_dtype": "fp32"}))):
        try:  # nothing changes: the optimizer is still the fresh one
            other.load_sharded_state_dict(os.path.join(directory, "dcp" if what == "fp32_state" else what))
            refused[what] = None
        except ValueError as exc:
            refused[what] = str(exc)
    refused["unchanged"] = opt.group_steps == [0] * len(opt.groups) and not opt.state_dict()["state"]
    dcp.load({"model": model.state_dict()}, checkpoint_id=os.path.join(directory, "dcp"))
    opt.load_sharded_state_dict(os.path.join(directory, "dcp"))
    from_dcp = opt.state_dict()

    other = resume_model(seed=5)
    other_opt = wrap(other, RESUME)
    saved = torch.load(os.path.join(directory, "full.pt"), weights_only=False)
    other_opt.load_state_dict(saved)
    from_full = other_opt.state_dict()
    other_opt.close()

    train_share(model, opt, data[5:], rank, world)
    report = {"weights": full_weights(model).tolist(), "steps": opt.group_steps, "refused": refused}
    if rank == 0:
        names = [n for n, _ in model.named_parameters()]
        a, b, s = state_values(from_dcp), state_values(from_full), state_values(saved)
        report["dcp_vs_full_max_abs"] = max(float((a[k] - b[k]).abs().max()) for k in s)
        report["dcp_vs_saved"] = {
            f"{names[int(k.split('.')[0])]}.{k.split('.', 1)[1]}": [float((a[k] - s[k]).abs().max()), float(s[k].abs().max())]
            for k in s}
    return report


# ---- refusals and the GradScaler ----------------------------------------------------------------

def refusals(rank, world, directory):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    messages = {}

    def refused(what, make, **wrap_args):
        try:
            hift_rt.wrap(make(), "adamw", lr=1e-2, **wrap_args)
        except ValueError as exc:
            messages[what] = str(exc)
            return
        messages[what] = None

    refused("ddp", lambda: DistributedDataParallel(tiny_llama()[0]))
    refused("fsdp1", lambda: FullyShardedDataParallel(tiny_llama()[0], device_id=torch.device("cpu")))
    def blocks_only():
        model = tiny_llama()[0]
        for layer in model.model.layers:
            fully_shard(layer)
        return model

    refused("blocks_only", blocks_only)
    refused("process_group_false", lambda: shard(tiny_llama()[0]), process_group=False)
    try:
        hift_rt.wrap(shard(tiny_llama()[0]), torch.optim.AdamW, lr=1e-2)
        messages["torch_class"] = None
    except ValueError as exc:
        messages["torch_class"] = str(exc)
    from hift_rt.integrations.transformers import HiFTTrainer
    from transformers import TrainingArguments

    try:
        HiFTTrainer(model=shard(tiny_llama()[0]), args=TrainingArguments(os.path.join(directory, "trainer"), use_cpu=True, report_to=[]))
        messages["trainer"] = None
    except ValueError as exc:
        messages["trainer"] = str(exc)
    return messages


def scaler(rank, world):
    """An inf in one rank's gradient shard: torch.amp.GradScaler (it checks FSDP2's DTensor
    gradients over every rank) and ShardedGradScaler with unscale_ make every rank skip the step
    and lower its scale. found_inf set on one rank only (a scaler that looked at its own shards)
    makes step() raise on every rank, and the optimizer stays usable."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    model = shard(tiny_llama()[0])
    opt = hift_rt.wrap(model, "adamw", lr=1e-2, eps=1e-3, max_grad_norm=1.0)
    data = global_batches(5, 1, world)
    report = {}
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10),
               ShardedGradScaler("cpu", init_scale=2.0 ** 10, process_group=dist.group.WORLD)]
    for step, (name, poison) in enumerate([("plain", False), ("plain", True), ("sharded", False), ("sharded", True)]):
        scaler = scalers[name == "sharded"]
        with torch.no_grad():
            before, group = full_weights(model), opt.active_group
        ids = data[step][0][rank * MICRO:(rank + 1) * MICRO]
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        if poison and rank == 1:
            grads = [p.grad.to_local() for _, p in opt.groups[opt.active_group].params if p.grad is not None]
            next(g for g in grads if g.numel()).view(-1)[0] = float("inf")
        if name == "sharded":
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        report[f"{name}_{step}"] = {"changed": bool((full_weights(model) != before).any()),
                                    "rotated": opt.active_group != group, "scale": float(scaler.get_scale())}
    ids = data[4][0][rank * MICRO:(rank + 1) * MICRO]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.found_inf, opt.grad_scale = torch.tensor(float(rank == 1)), torch.tensor(1.0)
    try:
        opt.step()
        report["disagreement"] = None
    except RuntimeError as exc:
        report["disagreement"] = str(exc)
    del opt.found_inf, opt.grad_scale
    group = opt.active_group
    opt.step()
    report["usable_after"] = opt.active_group != group
    opt.close()
    return report


def dies(rank, world):
    """Rank 1 exits after backward; rank 0's step (the clip norm's all-reduce) must raise."""
    model = shard(tiny_llama()[0])
    return step_after_peer_exit(model, hift_rt.wrap(model, "adamw", lr=1e-2, max_grad_norm=1.0), rank, world)


def main():
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    timeout = timedelta(seconds=10 if scenario == "dies" else 300)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timeout)
    if scenario == "dies":
        report = dies(rank, world)
    else:
        _, directory, names = scenario.split(":", 2)
        report = {"equivalence": equivalence(rank, world, names.split(",") if names else [])}
        if world == 2:
            report["refusals"] = refusals(rank, world, directory)
            report["scaler"] = scaler(rank, world)
            report["checkpoint"] = checkpoint(rank, world, directory)
        else:
            report["resume"] = resume(rank, world, directory)
    finish(report, out, rank, peer_lost=scenario == "dies")


if __name__ == "__main__":
    main()
