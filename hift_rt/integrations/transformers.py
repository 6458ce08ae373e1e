"""Hugging Face Trainer with hift_rt: replace `Trainer(...)` by `HiFTTrainer(..., hift_args={...})`.

    from hift_rt.integrations.transformers import HiFTTrainer
    trainer = HiFTTrainer(model=model, args=training_args, train_dataset=ds,
                          hift_args={"strategy": "top_down", "units_per_group": 2})
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

What TrainingArguments say still holds: learning_rate and the schedule (lr_scheduler_type,
warmup) drive param_groups[0]["lr"] as for any optimizer; weight_decay applies to the parameters
Trainer would decay (biases and norms excluded); adam_beta1/2 and adam_epsilon go to
AdamW/Adam; gradient_accumulation_steps, max_grad_norm (Trainer clips the active group, the only
one with gradients), bf16/fp16 (autocast; fp16's GradScaler hands its scale to hift_rt's kernel),
save_steps (the optimizer's state_dict carries every group's state and the rotation) and
resume_from_checkpoint (the rotation continues where it stopped) behave as with Trainer's own
optimizer. `hift_args` takes hift_rt.wrap's own arguments: optim, strategy, units_per_group,
groups, offload, lr_policy, master_weights, seed, and further optimizer hyperparameters.

For `Trainer(optimizers=(optimizer, None))` build the optimizer with `hift_optimizer(model, args)`.
"""
from __future__ import annotations

from typing import Iterable, Optional

from transformers import Trainer, TrainingArguments

from ..config import HiFTConfig
from ..optimizer import HiFTOptimizer

_RESERVED = ("lr", "no_decay", "max_grad_norm")


def hift_optimizer(model, args: TrainingArguments, decay_names: Optional[Iterable[str]] = None,
                   **hift_args) -> HiFTOptimizer:
    """The optimizer Trainer would build from `args`, as a HiFTOptimizer over `model`.

    decay_names: the parameters that get weight decay (default: Trainer's rule, all but biases
    and norm weights). hift_args: hift_rt.wrap's arguments (optim defaults to "adamw").
    """
    clash = [k for k in _RESERVED if k in hift_args]
    if clash:
        raise ValueError(f"hift_args {clash} come from TrainingArguments (learning_rate, weight decay "
                         "names, max_grad_norm); set them there")
    if decay_names is None:
        decay_names = Trainer.get_decay_parameter_names(None, model)
    decay = set(decay_names)
    optim = hift_args.pop("optim", "adamw")
    hyper = {}
    if optim in ("adamw", "adam"):
        hyper = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    if isinstance(optim, str):
        hyper["weight_decay"] = args.weight_decay
    hyper.update(hift_args)
    config = HiFTConfig.from_arguments(optim, lr=args.learning_rate, no_decay=lambda name: name not in decay, **hyper)
    return HiFTOptimizer(model, config)


class HiFTTrainer(Trainer):
    """transformers.Trainer whose optimizer is hift_rt's; `hift_args` as in hift_optimizer."""

    def __init__(self, *args, hift_args: Optional[dict] = None, **kwargs):
        self.hift_args = dict(hift_args or {})
        super().__init__(*args, **kwargs)

    def _get_learning_rate(self) -> float:
        """The lr hift_rt's last update applied (with lr_policy="cycle" it can differ from the
        scheduler's value), so that the logged lr is the one applied."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer
        if isinstance(opt, HiFTOptimizer) and opt.last_lr is not None:
            return opt.last_lr
        return super()._get_learning_rate()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = hift_optimizer(model, self.args, self.get_decay_parameter_names(model),
                                            **self.hift_args)
        return self.optimizer
