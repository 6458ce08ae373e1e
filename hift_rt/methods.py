"""Ways of fine-tuning a model, one class each, shared by the finetune job (hift_rt/job/) and
the benchmark (hift_rt/bench/finetune.py):

  Full           torch.optim.AdamW over every trainable parameter (fused on CUDA); under
                 torch.distributed (initialized, more than one rank) in DistributedDataParallel
  Lora           peft LoRA r=16 on every linear layer of a Llama-style block, trained with Full
  LayerwiseSync  the HiFT reference code's way: one group trainable per step, top-down, its AdamW
                 state moved to the device before the step and back to the CPU after it, with
                 synchronous copies (one process)
  HiFT           hift_rt.wrap (data parallel under torch.distributed, as wrap's process_group=None)

A method takes a model that the caller built (device and dtype as it wants) and owns the
optimizer over it. One training step is

    method.before_forward(step)            # which parameters train in this step
    loss = method.model(...).loss           # the caller's forward (autocast, accumulation, ...)
    method.backward(loss)                   # once per accumulated micro-batch
    method.update()                         # clip, optimizer step, zero the gradients

`method.optimizer` is the torch.optim.Optimizer whose `param_groups` LR schedulers drive;
`groups` is the number of steps in one cycle (1 for Full and Lora); `breakdown()` gives bytes of
weights, gradients and optimizer state on the device and in host memory.

Biases and norms get no weight decay in every method (`Settings.no_decay`, name substrings), as
Hugging Face's Trainer does. With `Settings.efficient_loss` every method's model computes its loss
through hift_rt.efficient_lm_loss (no full logits), applied when the method is built and removed
by `close()`. Owns: the methods. May call: hift_rt.wrap and the optimizer's public API,
hift_rt.efficient_lm_loss, hift_rt.grouping, torch.optim, torch.distributed (DDP), peft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import grouping
from .config import name_matcher
from .loss import efficient_lm_loss

NamedParams = List[Tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class Settings:
    """Hyperparameters every method reads; `optim`..`master_weights` are hift's own (wrap's
    arguments of those names)."""
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None   # None: no clipping
    no_decay: Tuple[str, ...] = ("bias", "norm")
    optim: str = "adamw"
    strategy: str = "bottom_up"
    units_per_group: int = 1
    offload: Union[str, bool] = "auto"
    seed: int = 0
    state_dtype: str = "fp32"
    master_weights: Union[str, bool] = "auto"
    state_window: Union[str, int, None] = "auto"
    efficient_loss: bool = False            # the model's loss through hift_rt.efficient_lm_loss


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adamw(named: NamedParams, settings: Settings) -> torch.optim.AdamW:
    """torch's AdamW with the decayed parameters in param group 0 and the others in group 1."""
    exempt = name_matcher(settings.no_decay)  # the rule hift_rt.wrap applies
    decay = [p for n, p in named if not exempt(n)]
    rest = [p for n, p in named if exempt(n)]
    specs = [{"params": decay}] + ([{"params": rest, "weight_decay": 0.0}] if rest else [])
    device = named[0][1].device
    return torch.optim.AdamW(specs, lr=settings.lr, weight_decay=settings.weight_decay,
                             fused=device.type == "cuda")


def _data_parallel_world() -> int:
    """Ranks of the initialized torch.distributed default group (1 when there is none)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _state_tensors(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
    """The optimizer-state tensors of `params` (not the scalar step counts)."""
    return [v for p in params for v in opt.state.get(p, {}).values() if torch.is_tensor(v) and v.dim()]


class Method:
    """The protocol in the module docstring; subclasses set `optimizer` and `update()`."""

    groups = 1
    optimizer: torch.optim.Optimizer

    def __init__(self, model: nn.Module, settings: Settings):
        self.model, self.settings = model, settings
        self.efficient_loss = efficient_lm_loss(model) if settings.efficient_loss else None

    def before_forward(self, step: int) -> None:
        """Called before the forward pass of optimizer step `step` (0-based)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        raise NotImplementedError

    def breakdown(self) -> dict:
        """Bytes: weights, gradients, state_device, state_host."""
        raise NotImplementedError

    def transfers(self) -> dict:
        """The transfer engine's figures (hift with offload); empty for the others."""
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Release what the method holds beyond the model (hift: pinned memory, the engine) and
        give the model back its own loss."""
        if self.efficient_loss is not None:
            self.efficient_loss.remove()


class Full(Method):
    """Every trainable parameter, every step: torch AdamW, clip_grad_norm_ when max_grad_norm.
    Under torch.distributed with more than one rank `model` becomes DistributedDataParallel(model):
    each rank runs its micro-batch and the gradients are averaged over ranks, as hift_rt's are."""

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(p.dtype == torch.float16 for _, p in self.named):
            raise ValueError("torch's AdamW cannot train float16 weights without fp32 master weights "
                             "(GradScaler refuses to unscale float16 gradients): use float32 or bfloat16")
        self.params = [p for _, p in self.named]
        self.optimizer = _adamw(self.named, settings)
        if _data_parallel_world() > 1:
            self.model = nn.parallel.DistributedDataParallel(model)

    def update(self) -> None:
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def breakdown(self) -> dict:
        return {"weights": _bytes(self.model.parameters()), "gradients": _bytes(self.params),
                "state_device": _bytes(_state_tensors(self.optimizer, self.params)), "state_host": 0}

    def close(self) -> None:
        """Also unwrap DistributedDataParallel: its reducer holds the process group, which must
        not outlive destroy_process_group (a gloo group torn down at interpreter exit can abort)."""
        super().close()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model = self.model.module


class Lora(Full):
    """peft LoRA (r=16, alpha=32) on the attention and MLP projections; `model` becomes the
    peft model, whose adapter weights Full trains."""

    TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, model: nn.Module, settings: Settings):
        from peft import LoraConfig, get_peft_model

        super().__init__(get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(self.TARGETS))),
                         settings)


class LayerwiseSync(Full):
    """HiFT without a runtime: hift_rt.grouping's groups, visited top-down; one torch AdamW over
    all of them (each parameter keeps its own step count, so each group is updated as by its own
    AdamW); before a group's step its state is copied to the device and after it back to the CPU,
    synchronously. `max_grad_norm` clips the active group."""

    def __init__(self, model: nn.Module, settings: Settings):
        if _data_parallel_world() > 1:
            raise ValueError("LayerwiseSync runs in one process (its groups' requires_grad changes every step, "
                             "which DistributedDataParallel does not allow)")
        cut = grouping.cut(model, settings.units_per_group)  # the runtime's cut, with its warnings
        super().__init__(model, settings)
        self.group_params = [[p for _, p in g.params] for g in cut]
        self.groups = len(cut)
        self.device = self.params[0].device
        self.active: Optional[int] = None
        for p in self.params:
            p.requires_grad_(False)

    def _move_state(self, g: int, device) -> None:
        for p in self.group_params[g]:
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)

    def before_forward(self, step: int) -> None:
        g = self.groups - 1 - step % self.groups
        if g == self.active:
            return
        if self.active is not None:
            for p in self.group_params[self.active]:
                p.requires_grad_(False)
        for p in self.group_params[g]:
            p.requires_grad_(True)
        self._move_state(g, self.device)
        self.active = g

    def update(self) -> None:
        g = self.active
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.group_params[g], self.settings.max_grad_norm)
        self.optimizer.step()  # parameters without a gradient (the other groups) are skipped
        self.optimizer.zero_grad(set_to_none=True)
        self._move_state(g, "cpu")

    def breakdown(self) -> dict:
        state = _state_tensors(self.optimizer, self.params)
        return {"weights": _bytes(self.model.parameters()), "gradients": max(_bytes(ps) for ps in self.group_params),
                "state_device": _bytes(t for t in state if t.device.type != "cpu"),
                "state_host": _bytes(t for t in state if t.device.type == "cpu")}

    def close(self) -> None:
        super().close()
        for p in self.params:
            p.requires_grad_(True)


class HiFT(Method):
    """hift_rt.wrap(model, settings.optim, ...); float16 weights get a GradScaler, whose scale the
    update kernel undoes."""

    def __init__(self, model: nn.Module, settings: Settings):
        import hift_rt

        super().__init__(model, settings)
        self.optimizer = hift_rt.wrap(model, settings.optim, lr=settings.lr, strategy=settings.strategy,
                                      units_per_group=settings.units_per_group, offload=settings.offload,
                                      max_grad_norm=settings.max_grad_norm, no_decay=settings.no_decay,
                                      seed=settings.seed, weight_decay=settings.weight_decay,
                                      state_dtype=settings.state_dtype, master_weights=settings.master_weights,
                                      state_window=settings.state_window)
        self.groups = len(self.optimizer.groups)
        device = next(p.device for p in model.parameters())
        fp16 = any(p.dtype == torch.float16 for p in model.parameters())
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)  # an inf/NaN step changes nothing, rotation included
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def breakdown(self) -> dict:
        return self.optimizer.memory_breakdown()

    def transfers(self) -> dict:
        return self.optimizer.transfer_stats()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.scaler:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.scaler:
            self.scaler.load_state_dict(state["grad_scaler"])

    def close(self) -> None:
        super().close()
        self.optimizer.close()
