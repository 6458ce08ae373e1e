"""hift_rt inside the Hugging Face Trainer: HiFTTrainer on a tiny model, on CPU."""
import json
import os

import pytest
import torch

from hift_rt import HiFTOptimizer
from hift_rt.integrations.transformers import HiFTTrainer, hift_optimizer
from models import tiny_llama


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 64, (n, length), generator=gen)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def training_args(out, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.05,
                  max_grad_norm=0.5, save_strategy="steps", save_steps=5, logging_steps=1, report_to=[],
                  use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.mark.parametrize("precision", [{}, {"bf16": True}])
def test_resume_from_mid_cycle_checkpoint_matches_uninterrupted_run(tmp_path, precision):
    hift_args = {"strategy": "random", "units_per_group": 1, "offload": True, "eps": 1e-3}
    model_a, _ = tiny_llama()
    trainer_a = HiFTTrainer(model=model_a, args=training_args(tmp_path / "a", **precision),
                            train_dataset=Tokens(), hift_args=hift_args)
    trainer_a.train()
    opt = trainer_a.optimizer.optimizer if hasattr(trainer_a.optimizer, "optimizer") else trainer_a.optimizer
    assert isinstance(opt, HiFTOptimizer)
    assert len(opt.groups) == 6 and sum(opt.group_steps) == 10  # one optimizer step per 2 micro-batches
    assert opt.param_groups[0]["lr"] == pytest.approx(trainer_a.lr_scheduler.get_last_lr()[0])
    norms = [e["grad_norm"] for e in trainer_a.state.log_history if "grad_norm" in e]  # hift_rt's clip norm
    assert len(norms) == 10 and all(0 < n < float("inf") for n in norms)

    model_b, _ = tiny_llama(seed=123)
    trainer_b = HiFTTrainer(model=model_b, args=training_args(tmp_path / "b", **precision),
                            train_dataset=Tokens(), hift_args=hift_args)
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))  # 5 of 6 groups: mid-cycle
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    opt_b = trainer_b.optimizer.optimizer if hasattr(trainer_b.optimizer, "optimizer") else trainer_b.optimizer
    assert opt_b.group_steps == opt.group_steps and opt_b.active_group == opt.active_group


@pytest.mark.parametrize("edit,match", [
    (lambda state: state["state"][0].update(exp_avg=state["state"][0]["exp_avg"].half()),
     r"state 'exp_avg' of parameter 'model.embed_tokens.weight' has dtype torch.float16"),
    (lambda state: state.update(state={str(i): e for i, e in state["state"].items()}),
     r"'state' has key '0' \(str\)"),
])
def test_resume_refuses_an_edited_optimizer_file_naming_the_field(tmp_path, edit, match):
    """Trainer owns its checkpoint folders and files; what HiFTTrainer adds is the optimizer's
    state, checked field by field when Trainer loads it."""
    args = dict(max_steps=2, save_steps=2, gradient_accumulation_steps=1)
    model, _ = tiny_llama()
    HiFTTrainer(model=model, args=training_args(tmp_path / "a", **args), train_dataset=Tokens()).train()
    optimizer_file = tmp_path / "a" / "checkpoint-2" / "optimizer.pt"
    state = torch.load(optimizer_file, weights_only=True)
    edit(state)
    torch.save(state, optimizer_file)
    other, _ = tiny_llama(seed=3)
    trainer = HiFTTrainer(model=other, args=training_args(tmp_path / "b", **args), train_dataset=Tokens())
    with pytest.raises(ValueError, match=match):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_model_init_builds_the_model_and_hift_trains_it(tmp_path):
    """Trainer(model_init=...) passes no model to the constructor."""
    trainer = HiFTTrainer(model_init=lambda: tiny_llama()[0], train_dataset=Tokens(),
                          args=training_args(tmp_path, max_steps=2, save_strategy="no"))
    trainer.train()
    assert isinstance(trainer._hift(), HiFTOptimizer) and sum(trainer._hift().group_steps) == 2


def test_weight_decay_follows_trainers_names_and_hift_args_are_checked(tmp_path):
    model, _ = tiny_llama()
    opt = hift_optimizer(model, training_args(tmp_path), strategy="top_down")
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    for g in opt.describe_groups():
        decayed, rest = [], []
        for name in g["params"]:
            (rest if ("norm" in name or "bias" in name) else decayed).append(name)
        assert g["params"] == decayed + rest
    opt.close()
    with pytest.raises(ValueError, match="come from TrainingArguments"):
        hift_optimizer(model, training_args(tmp_path), lr=1.0)


def test_a_torch_optimizer_class_takes_trainers_weight_decay_or_none(tmp_path):
    """With zero gradients, AdamW changes a weight only through decay: weight_decay=0.0 from
    TrainingArguments must reach the class (its own default is 0.01). Rprop has no decay option."""
    model, _ = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = hift_optimizer(model, training_args(tmp_path, weight_decay=0.0), optim=torch.optim.AdamW)
    for _ in range(len(opt.groups)):
        sum(p.sum() for p in model.parameters() if p.requires_grad).mul(0.0).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.close()
    opt = hift_optimizer(model, training_args(tmp_path), optim=torch.optim.Rprop)
    assert "weight_decay" not in opt.param_groups[0]
    opt.close()


def test_warmup_from_zero_wastes_no_cycle_and_the_logged_lr_is_the_applied_one(tmp_path):
    """Trainer's linear warmup starts at lr 0. Every group updated after the first step must move
    (the default lr policy must not hold the first step's 0 for the whole first cycle), and the
    logged learning rate is the one the update applied."""
    model, _ = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, max_steps=6, warmup_steps=2, lr_scheduler_type="linear",
                         gradient_accumulation_steps=1, save_strategy="no", max_grad_norm=0.0)
    trainer = HiFTTrainer(model=model, args=args, train_dataset=Tokens(), hift_args={"eps": 1e-3})
    applied = []
    step = HiFTOptimizer.step

    def recording_step(opt, *a, **k):
        out = step(opt, *a, **k)
        applied.append(opt.last_lr)
        return out
    HiFTOptimizer.step = recording_step
    try:
        trainer.train()
    finally:
        HiFTOptimizer.step = step
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    groups = opt.describe_groups()
    assert applied[0] == 0.0 and all(lr > 0 for lr in applied[1:])
    for g, lr in zip(groups, applied):  # bottom_up: step i updates group i
        moved = [n for n in g["params"] if not torch.equal(before[n], dict(model.named_parameters())[n])]
        assert (len(moved) == len(g["params"])) == (lr > 0), (g["name"], lr, moved)
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx(applied)


def _torchrun(out, mode, world, per_device):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--standalone",
                           os.path.join(os.path.dirname(__file__), "trainer_worker.py"), str(out), mode,
                           str(per_device)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out / f"{mode}.pt"), json.load(open(out / f"{mode}.json"))


def test_two_gloo_processes_equal_one_with_the_global_batch_and_resume(tmp_path):
    """HiFTTrainer under torchrun (2 CPU ranks, gloo): DDP is kept out (hift_rt reduce-scatters the
    active group itself), the result equals one process fed the same global batches (batch 2 per
    rank = 4 in one process: sequential sampling, and accelerate gives rank r the batches r, r + 2,
    ...), and a
    run resumed from the mid-cycle checkpoint-3 ends bit-identical to the uninterrupted one."""
    trained, info = _torchrun(tmp_path, "train", world=2, per_device=2)
    assert info["world"] == 2 and info["ddp"] != "DistributedDataParallel"
    assert info["communication"]["reduce_scatter"] > 0 and sum(info["group_steps"]) == 6
    resumed, resumed_info = _torchrun(tmp_path, "resume", world=2, per_device=2)
    assert resumed_info["group_steps"] == info["group_steps"]
    for name, value in trained.items():
        assert torch.equal(value, resumed[name]), name
    single = tmp_path / "single"
    single.mkdir()
    import trainer_worker

    trainer_worker.run(str(single), "train", per_device=4)
    reference = torch.load(single / "train.pt")
    for name, value in trained.items():  # sums in another order: see tests/test_distributed.py
        torch.testing.assert_close(value, reference[name], rtol=0, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_torch_compile_goes_through_hift_rt_compile(tmp_path, monkeypatch):
    """TrainingArguments(torch_compile=True) compiles each unit's module (hift_rt.compile) instead
    of accelerate's whole-model torch.compile, whose graph would be recompiled at every step (and
    run eagerly past dynamo's recompile limit); it trains to the uncompiled run's weights
    (aot_eager is bit-identical: see tests/test_compile.py). An accelerate config's dynamo backend
    (its environment variable) takes the same route."""
    import torch._dynamo

    from hift_rt.kernels import _common
    from hift_rt.regional import compiled_modules

    monkeypatch.setattr(_common, "TRITON_ON_CPU", False)  # the torch path: the interpreter is slow here
    torch._dynamo.reset()
    weights = []
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8,
                                    accumulated_recompile_limit=256,
                                    skip_fwd_side_effects_in_bwd_under_checkpoint=False):
        for compile_args in ({}, {"torch_compile_backend": "aot_eager"}):
            model, _ = tiny_llama()
            args = training_args(tmp_path / str(len(weights)), max_steps=6, save_strategy="no", **compile_args)
            trainer = HiFTTrainer(model=model, args=args, train_dataset=Tokens(), hift_args={"offload": True})
            trainer.train()
            weights.append([p.detach().clone() for p in model.parameters()])
        assert args.torch_compile and trainer.compile_kwargs == {"backend": "aot_eager"}
        assert compiled_modules(model) == [f"model.layers.{i}" for i in range(4)] + ["model.norm"]
        assert trainer.model_wrapped is model  # not accelerate's OptimizedModule
        assert all(torch.equal(a, b) for a, b in zip(*weights))

        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "aot_eager")
        model, _ = tiny_llama()
        trainer = HiFTTrainer(model=model, args=training_args(tmp_path / "env"), train_dataset=Tokens())
        assert not trainer.args.torch_compile and trainer.compile_kwargs == {"backend": "aot_eager"}
        assert compiled_modules(model) == [f"model.layers.{i}" for i in range(4)] + ["model.norm"]
    torch._dynamo.reset()
