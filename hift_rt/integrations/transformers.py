"""Hugging Face Trainer with hift_rt: replace `Trainer(...)` by `HiFTTrainer(..., hift_args={...})`.

    from hift_rt.integrations.transformers import HiFTTrainer
    trainer = HiFTTrainer(model=model, args=training_args, train_dataset=ds,
                          hift_args={"strategy": "top_down", "units_per_group": 2})
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

What TrainingArguments say still holds: learning_rate and the schedule (lr_scheduler_type,
warmup) drive param_groups[0]["lr"] as for any optimizer; weight_decay applies to the parameters
Trainer would decay (biases and norms excluded); adam_beta1/2 and adam_epsilon go to
AdamW/Adam; gradient_accumulation_steps, max_grad_norm (hift_rt clips the active group, the only
one with gradients, on the device inside step(); the logged grad_norm is its norm), bf16/fp16 (autocast; fp16's GradScaler hands its scale to hift_rt's kernel),
save_steps (the optimizer's state_dict carries every group's state and the rotation) and
resume_from_checkpoint (the rotation continues where it stopped) behave as with Trainer's own
optimizer. `hift_args` takes hift_rt.wrap's own arguments: optim, strategy, units_per_group,
groups, offload, state_window, state_dtype, lr_policy, master_weights, process_group, seed, and
further optimizer hyperparameters. With a torch.optim class as `optim`, weight_decay is passed
where the class has that option.

For `Trainer(optimizers=(optimizer, None))` build the optimizer with `hift_optimizer(model, args)`.

torch.compile: `torch_compile=True` (with `torch_compile_backend` / `torch_compile_mode`, or an
accelerate config's dynamo backend) compiles through hift_rt.compile, one region per unit,
instead of accelerate's whole-model torch.compile, whose graph would recompile at every step
(each step changes which parameters require gradients).

Under torchrun / accelerate launch, hift_rt owns the gradient synchronization: HiFTTrainer keeps
DDP out (accelerate prepares the model as for evaluation: placed and autocast, but not wrapped in
DistributedDataParallel, whose buckets would all-reduce every gradient of the groups trainable
when it is built and miss the others), and the optimizer reduce-scatters the active group's
gradient itself (see hift_rt.distributed). FSDP and DeepSpeed configurations, and models sharded
by FSDP2, are refused (_NOT_SHARDED says what works instead). Checkpoints: every rank takes part in
the optimizer's state_dict (a collective when the state is sharded), rank 0 writes it, and every
rank loads it on resume, with any number of ranks.
"""
from __future__ import annotations

import inspect
from typing import Iterable, Optional

from transformers import Trainer, TrainingArguments

from ..config import HiFTConfig
from ..optimizer import HiFTOptimizer
from ..regional import compile as compile_regions
from ..wrappers import is_fully_sharded

_RESERVED = ("lr", "no_decay", "max_grad_norm")
_NOT_SHARDED = (
    "HiFTTrainer runs without FSDP and DeepSpeed: accelerate's FSDP plugin builds its own sharded parameters "
    "and re-points the optimizer at them, and Trainer saves models with safetensors, which cannot hold FSDP2's "
    "sharded (DTensor) parameters. What works: HiFTTrainer under torchrun / accelerate launch without an "
    "FSDP or DeepSpeed config (hift_rt shards the optimizer state over the ranks itself), or, for a model "
    "whose weights do not fit one GPU, torch.distributed.fsdp.fully_shard (each block, then the root) and "
    "hift_rt.wrap in your own training loop, with checkpoints through torch.distributed.checkpoint "
    "(opt.sharded_state_dict(); README: HiFT over FSDP2)")


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
    # A torch.optim class gets args.weight_decay when it has the option (else its own default
    # would apply unasked) and no decay rule when it has none (Rprop, LBFGS-like classes).
    takes_decay = isinstance(optim, str) or "weight_decay" in inspect.signature(optim).parameters
    if takes_decay:
        hyper["weight_decay"] = args.weight_decay
    hyper.update(hift_args)
    # hift_rt clips inside step(), over the gradient of every rank (HiFTTrainer turns Trainer's
    # own clipping off: before step() the gradients are still each rank's own).
    max_grad_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    config = HiFTConfig.from_arguments(optim, lr=args.learning_rate,
                                       no_decay=(lambda name: name not in decay) if takes_decay else None,
                                       max_grad_norm=max_grad_norm, **hyper)
    return HiFTOptimizer(model, config)


class HiFTTrainer(Trainer):
    """transformers.Trainer whose optimizer is hift_rt's; `hift_args` as in hift_optimizer."""

    def __init__(self, *args, hift_args: Optional[dict] = None, **kwargs):
        self.hift_args = dict(hift_args or {})
        self.compile_kwargs: Optional[dict] = None  # torch.compile's arguments, when compiling
        model = kwargs.get("model", args[0] if args else None)
        training = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is not None and is_fully_sharded(model) or training is not None and (training.fsdp or training.deepspeed):
            raise ValueError(_NOT_SHARDED)
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # set by `accelerate launch` with such a config
            raise ValueError(_NOT_SHARDED)
        self.accelerator.prepare_model = _without_ddp(self.accelerator.prepare_model)
        self.accelerator.prepare_optimizer = _in_place(self.accelerator.prepare_optimizer)
        if self.compile_kwargs is not None:
            compile_regions(self.model, **self.compile_kwargs)
        elif self.args.torch_compile:  # older transformers/accelerate: accelerate would compile the whole model
            raise ValueError("HiFTTrainer compiles through hift_rt.compile, which needs Trainer to hand accelerate a "
                             "dynamo plugin (transformers with Trainer._build_accelerator_args, accelerate >= 1.2); "
                             "upgrade them, or leave torch_compile off and call hift_rt.compile(model) yourself")

    def _build_accelerator_args(self, **kwargs) -> dict:
        """Trainer's accelerator arguments without its torch.compile: the dynamo plugin's
        arguments (from torch_compile*, or accelerate's config) are kept for hift_rt.compile and
        accelerate gets a plugin that compiles nothing."""
        args = super()._build_accelerator_args(**kwargs)
        plugin = args.get("dynamo_plugin")
        if plugin is not None:
            from accelerate.utils import DynamoBackend, TorchDynamoPlugin

            if plugin.backend != DynamoBackend.NO:
                self.compile_kwargs = plugin.to_kwargs()
            args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's save, with the optimizer's state dict taken on every rank first: sharded
        hift_rt state is gathered to rank 0 by a collective, and Trainer calls state_dict() on the
        process that saves only."""
        state = self.optimizer.state_dict()
        self.optimizer.state_dict = lambda: state  # what Trainer's save asks for, without a second collective
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del self.optimizer.state_dict

    def _clip_grad_norm(self, model):
        """hift_rt clips in step(), over the gradient of every rank; the norm it computes there is
        written into this 0-d device tensor, which Trainer logs after the step."""
        return self._hift().grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm  # without clipping, no extra pass over the gradients for the log

    def _hift(self) -> HiFTOptimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the optimizer

    def _get_learning_rate(self) -> float:
        """The lr hift_rt's last update applied (with lr_policy="cycle" it can differ from the
        scheduler's value), so that the logged lr is the one applied."""
        opt = self._hift()
        if isinstance(opt, HiFTOptimizer) and opt.last_lr is not None:
            return opt.last_lr
        return super()._get_learning_rate()

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = hift_optimizer(model, self.args, self.get_decay_parameter_names(model),
                                            **self.hift_args)
        return self.optimizer


def _without_ddp(prepare_model):
    """accelerate's prepare_model as it prepares a model for evaluation, and without moving it: the
    model is autocast as for training but not wrapped in DistributedDataParallel (nor FSDP), since
    hift_rt's optimizer does the gradient synchronization, and it stays where it was wrapped (a
    move, even from "cpu" to "cpu:0", would copy the parameters away from hift_rt's flat buffers;
    Trainer has placed the model before it built the optimizer)."""
    def prepare(model, device_placement=None, evaluation_mode=False):
        return prepare_model(model, device_placement=False, evaluation_mode=True)
    return prepare


def _in_place(prepare_optimizer):
    """accelerate's prepare_optimizer without device placement for a HiFTOptimizer: its state lives
    where the runtime put it (pinned host memory, the device slot), and placement would round-trip
    the state dict, a collective under data parallelism."""
    def prepare(optimizer, device_placement=None):
        if isinstance(optimizer, HiFTOptimizer):
            device_placement = False
        return prepare_optimizer(optimizer, device_placement=device_placement)
    return prepare
