"""hift_rt inside the Hugging Face Trainer: HiFTTrainer on a tiny model, on CPU."""
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

    model_b, _ = tiny_llama(seed=123)
    trainer_b = HiFTTrainer(model=model_b, args=training_args(tmp_path / "b", **precision),
                            train_dataset=Tokens(), hift_args=hift_args)
    trainer_b.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))  # 5 of 6 groups: mid-cycle
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    opt_b = trainer_b.optimizer.optimizer if hasattr(trainer_b.optimizer, "optimizer") else trainer_b.optimizer
    assert opt_b.group_steps == opt.group_steps and opt_b.active_group == opt.active_group


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
