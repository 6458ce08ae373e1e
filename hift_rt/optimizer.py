"""HiFTOptimizer: a `torch.optim.Optimizer` that updates one group of a model per step.

`wrap(model, ...)` validates its arguments into a HiFTConfig, cuts the model into groups
(hift_rt.grouping), re-homes each group into one flat buffer (hift_rt.flat), and returns the
optimizer, which coordinates: the gradient bookkeeping (hift_rt.gradients), the rotation
(hift_rt.rotation), the update and the state's residency (hift_rt.updaters over a
hift_rt.state_store). One `step()`:

1. takes the active group g's flat gradient (autograd accumulated straight into it);
2. optionally computes its norm on the device and the clip coefficient (no host sync);
3. has the updater update g (the compute stream waits device-side for g's state first);
4. freezes g, activates the next group h, and has the updater swap g's state out and h's in
   behind the update. It returns without synchronizing the host.

The learning rate is read from `param_groups[0]["lr"]` (so torch LR schedulers work): with
lr_policy="cycle" every step of a cycle uses the value it held at the cycle's first step.
"""
from __future__ import annotations

import gc
import weakref
from typing import List, Optional, Union

import torch
from torch import nn

from . import grouping
from .config import HiFTConfig
from .engine import TransferEngine
from .flat import FlatGroup, rehome
from .gradients import GradientBuffer
from .kernels import grad_norm
from .rotation import Rotation
from .state_store import StateStore
from .updaters import FusedUpdater, TorchClassUpdater, Updater

STATE_DICT_VERSION = 2


def _claim(params, optimizer) -> None:
    """Each parameter belongs to at most one open HiFTOptimizer: a second wrap of the same model
    would find the first one's frozen groups and hooks."""
    def is_open(ref) -> bool:  # no local reference survives: the collector below can free it
        return ref is not None and ref() is not None and not ref()._closed

    for name, p in params:
        ref = getattr(p, "_hift_rt_owner", None)
        if is_open(ref):
            gc.collect()  # an owner dropped by the user may only be waiting for the cycle collector
        if is_open(ref):
            raise ValueError(f"parameter '{name}' is managed by a HiFTOptimizer that is still open; "
                             "call its close() before wrapping the model again")
    for _, p in params:
        p._hift_rt_owner = weakref.ref(optimizer)


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning of `model` as `config` says; see `hift_rt.wrap`."""

    # GradScaler hands us its scale and found_inf tensors instead of unscaling fp16 gradients
    # itself (which torch refuses for fp16 parameters); see step().
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, config: HiFTConfig):
        self._closed = True  # until fully built: close() and other wraps ignore a half-built one
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, HiFTConfig):
            raise TypeError("HiFTOptimizer(model, config) takes a HiFTConfig; use hift_rt.wrap(model, ...)")
        self.config = config
        if config.groups is not None:
            cut = grouping.groups_from_prefixes(model, config.groups)
        else:
            cut = grouping.groups_from_units(grouping.build_units(model), config.units_per_group)
        if not cut:
            raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
        named = [np for unit_group in cut for np in unit_group.params]
        _claim(named, self)
        self.device, self.dtype = grouping.check_single_device_dtype(named)
        self.master_weights, self.offload = config.memory_policy(self.device, self.dtype)
        sparse = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]
        if sparse:
            raise ValueError(f"module(s) {sparse} have sparse=True; hift_rt needs dense gradients "
                             "(build the embedding with sparse=False)")

        self.groups: List[FlatGroup] = [rehome(model, unit_group, config.no_decay) for unit_group in cut]
        self._gradients = GradientBuffer(max(group.numel for group in self.groups), self.dtype, self.device)
        self._steps = [0] * len(self.groups)
        self._rotation = Rotation(len(self.groups), config.strategy, config.seed)
        self._cycle_lr: Optional[float] = None
        self._cycle_lr_of: Optional[int] = None  # the cycle _cycle_lr was read in
        self.engine = TransferEngine(self.device) if self.offload else None

        ordered = [p for group in self.groups for _, p in group.params]
        self._building = True
        super().__init__([{"params": ordered}], {"lr": config.lr, **config.options})
        self._building = False
        self._index = {id(p): i for i, p in enumerate(ordered)}
        self._updater = self._make_updater()

        self._gradients.attach([p for _, p in named])
        for _, p in named:
            p.requires_grad_(False)
        self._activate(self._rotation.active)
        self._closed = False

    def _make_updater(self) -> Updater:
        config, active = self.config, self._rotation.active
        store = StateStore(len(self.groups), self.device, self.engine)
        if config.family is not None:
            return FusedUpdater(self.groups, store, config.family, self.defaults, self.master_weights, active)
        return TorchClassUpdater(self.groups, store, config.torch_class, config.options, self.master_weights,
                                 config.no_decay is not None, config.optim_name, config.lr, active)

    # -- torch.optim.Optimizer surface ------------------------------------------------------
    def add_param_group(self, param_group):
        if not getattr(self, "_building", False):
            raise RuntimeError("HiFTOptimizer owns every trainable parameter of its model from wrap(); "
                               "add_param_group is not supported (wrap the model again instead)")
        super().add_param_group(param_group)

    @property
    def active_group(self) -> int:
        return self._rotation.active

    @property
    def cycle(self) -> int:
        return self._rotation.cycle

    @property
    def group_steps(self) -> List[int]:
        return list(self._steps)

    def describe_groups(self) -> List[dict]:
        """Per group, bottom to top: index, name, parameter names, their element count `numel`,
        the flat buffer's `buffer_numel` (with the alignment gaps), `decay_end` (elements
        [0, decay_end) get weight decay) and `notes` on how its units were placed."""
        return [{"index": group.index, "name": group.name, "params": [n for n, _ in group.params],
                 "numel": sum(p.numel() for _, p in group.params), "buffer_numel": group.numel,
                 "decay_end": group.decay_end, "notes": list(group.notes)} for group in self.groups]

    def memory_breakdown(self) -> dict:
        """Bytes of the runtime's own buffers: gradients and optimizer state on the device, state
        in host memory. Weights are the model's own (re-homed, not copied)."""
        weights = sum(group.numel for group in self.groups) * self.dtype.itemsize
        return {"weights": weights, "gradients": self._gradients.nbytes, **self._updater.memory()}

    def transfer_stats(self) -> dict:
        """The engine's figures (bytes, busy seconds and GB/s per direction) and the exposed
        transfer: seconds the compute stream waited for a prefetch. Empty without offload."""
        if self.engine is None:
            return {}
        stats = self.engine.counters()
        stats["exposed_wait_seconds"] = self._updater.exposed_wait_seconds()
        return stats

    # -- gradients ---------------------------------------------------------------------------
    def _activate(self, g: int) -> None:
        group = self.groups[g]
        group.check_not_moved(self.device, self.dtype)
        self._gradients.activate(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the active group's gradient. Its `.grad` stay views of the flat gradient buffer
        (so autograd keeps accumulating in place) whatever `set_to_none` says, and a parameter
        that gets no gradient before the next step() is skipped by it as if its .grad were None;
        the other groups' parameters have no gradient."""
        self._gradients.zero(self.groups[self._rotation.active])

    # -- the step ----------------------------------------------------------------------------
    def _lr(self) -> float:
        lr = self.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if self.config.lr_policy == "step":
            return float(lr)
        if self._cycle_lr_of != self._rotation.cycle:
            self._cycle_lr, self._cycle_lr_of = float(lr), self._rotation.cycle
        return self._cycle_lr

    def _options(self) -> dict:
        """The hyperparameters as param_groups holds them now (users and schedulers may edit them)."""
        return {k: v for k, v in self.param_groups[0].items() if k not in ("params", "lr", "initial_lr")}

    @torch.no_grad()
    def step(self, closure=None):
        """Update the active group, then rotate to the next one. Returns closure's loss, if any.

        With a torch.amp.GradScaler, `scaler.step(opt)` sets `grad_scale` (gradients still scaled)
        and `found_inf` on the optimizer: the scale is undone inside the kernel and a step with
        inf/NaN gradients changes nothing (no update, no rotation). Reading found_inf costs one
        host sync, as GradScaler itself spends for any optimizer: whether the group rotates is a
        host-side decision. Without a scaler step() never synchronizes the host in steady state.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss
        group = self.groups[self._rotation.active]
        group.check_not_moved(self.device, self.dtype)
        grad, has_grad = self._gradients.collect(group)
        if not any(has_grad):  # nothing to update, as in torch; the rotation goes on
            self._advance()
            return loss
        coef = None
        if grad_scale is not None:
            coef = grad_scale.double().reciprocal().float().reshape(1)
        if self.config.max_grad_norm is not None:
            norm = grad_norm(grad)
            if coef is not None:
                norm = norm * coef[0]
            clip = torch.clamp(self.config.max_grad_norm / (norm + 1e-6), max=1.0).reshape(1)
            coef = clip if coef is None else coef * clip
        self._updater.update(group, grad, has_grad, lr=self._lr(), options=self._options(), clip_coef=coef)
        self._steps[group.index] += 1
        self._advance()
        return loss

    def _advance(self) -> None:
        g = self._rotation.active
        self._rotation.advance()
        h = self._rotation.active
        if h != g:
            self._gradients.deactivate(self.groups[g])
            self._updater.switch(g, h)
        self._activate(h)  # h == g (k = 1, or a random order's seam): fresh gradients

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout (`state` keyed by parameter index, `param_groups`) plus a `hift` entry
        with the rotation, the per-group step counts and the group layout.

        `state[i]` holds torch's keys for that optimizer (fused: `step`, `exp_avg`, `exp_avg_sq`,
        `sum`, `momentum_buffer`; a torch.optim class: its own) and `master` with fp32 master
        weights; only parameters updated at least once appear, as in torch.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed; take state_dict() before close()")
        state = {}
        for group in self.groups:
            for (_, p), entry in zip(group.params, self._updater.group_state(group)):
                if entry:
                    state[self._index[id(p)]] = entry
        saved = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        saved["params"] = list(range(len(self._index)))
        return {
            "state": state,
            "param_groups": [saved],
            "hift": {
                "version": STATE_DICT_VERSION,
                "optim": self.config.optim_name,
                "master_weights": self.master_weights,
                "groups": [[n for n, _ in group.params] for group in self.groups],
                "group_steps": list(self._steps),
                "rotation": self._rotation.state_dict(),
                "cycle_lr": self._cycle_lr,
                "cycle_lr_of": self._cycle_lr_of,
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() of a HiFTOptimizer over the same model layout (any step,
        mid-cycle included). A plain torch.optim state dict of the same optimizer over the same
        parameters (e.g. from torch.optim.AdamW) is accepted too: state and steps are taken,
        the rotation starts afresh."""
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed")
        hift = state_dict.get("hift")
        if hift is not None:
            if hift.get("version") != STATE_DICT_VERSION:
                raise ValueError(f"state dict version {hift.get('version')} is not {STATE_DICT_VERSION}")
            if hift["optim"] != self.config.optim_name:
                raise ValueError(f"state dict is for optim {hift['optim']!r}, this optimizer runs "
                                 f"{self.config.optim_name!r}")
            if hift["groups"] != [[n for n, _ in group.params] for group in self.groups]:
                raise ValueError("state dict was saved with another group layout (parameter names per group differ)")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != 1 or len(saved_groups[0]["params"]) != len(self._index):
            raise ValueError(f"state dict has {sum(len(pg['params']) for pg in saved_groups)} parameters in "
                             f"{len(saved_groups)} group(s); this optimizer has {len(self._index)} in 1")
        old = self._rotation.active
        entries = state_dict["state"]
        for group in self.groups:
            self._updater.load_group_state(group, [entries.get(self._index[id(p)]) for _, p in group.params])
        for key, value in saved_groups[0].items():
            if key != "params":
                self.param_groups[0][key] = value
        if hift is not None:
            self._steps = [int(s) for s in hift["group_steps"]]
            self._rotation.load_state_dict(hift["rotation"])
            self._cycle_lr, self._cycle_lr_of = hift["cycle_lr"], hift["cycle_lr_of"]
        else:
            self._steps = [max(_updates(entries.get(self._index[id(p)])) for _, p in group.params)
                           for group in self.groups]
        new = self._rotation.active
        if new != old:
            self._gradients.deactivate(self.groups[old])
            self._updater.switch(old, new)
        self._activate(new)

    def close(self) -> None:
        """Free the pinned host memory and the transfer engine, and hand the model back: every
        parameter trainable again, no gradients, no hooks. The model keeps its weights (still
        views of the flat buffers, which live as long as the parameters)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._gradients.detach()
        for group in self.groups:
            for _, p in group.params:
                p.grad = None
                p.requires_grad_(True)
                if getattr(p, "_hift_rt_owner", None) is not None and p._hift_rt_owner() is self:
                    del p._hift_rt_owner
        self._updater.close()
        if self.engine is not None:
            self.engine.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def __repr__(self) -> str:
        return (f"HiFTOptimizer(optim={self.config.optim_name!r}, groups={len(self.groups)}, "
                f"strategy={self.config.strategy!r}, active={self.active_group}, cycle={self.cycle}, "
                f"offload={self.offload}, master_weights={self.master_weights}, lr={self.param_groups[0]['lr']})")


def _updates(entry) -> int:
    """Updates a parameter had, from its torch state entry (SGD keeps no step: a momentum buffer
    means at least one)."""
    if not entry:
        return 0
    return int(float(entry["step"])) if "step" in entry else 1


def wrap(model: nn.Module, optim: Union[str, type] = "adamw", **arguments) -> HiFTOptimizer:
    """Turn `model` into a HiFT fine-tuning set-up; returns its optimizer.

    Call it after the model is on its device and dtype. The model stays a plain nn.Module.

    optim: "adamw", "adam", "adagrad", "sgd" (fused kernels), or a torch.optim.Optimizer subclass
        run per group over the group's flat tensor (its state offloaded like ours).
    lr (required): the learning rate (param_groups[0]["lr"], which schedulers drive).
    strategy: "bottom_up" (default), "top_down" or "random" (a fresh permutation per cycle, from `seed`).
    units_per_group: consecutive units (input side, each block, output side) per group (default 1).
    groups: lists of parameter-name prefixes, one list per group, bottom to top (overrides units).
    offload: "auto" (state of inactive groups in pinned host memory when on CUDA), True, False.
    lr_policy: "cycle" (the lr at a cycle's first step holds for the cycle) or "step".
    max_grad_norm: clip the active group's gradient to this norm (computed on the device).
    no_decay: parameter-name substrings that get no weight decay, e.g. ("bias", "norm"), or a
        function name -> bool.
    master_weights: "auto" (fp32 master for bf16/fp16 parameters), True or False.
    seed: the random order's seed.
    Any other keyword is the optimizer's own option, with torch's names and defaults (betas, eps,
    weight_decay, momentum, ...). See HiFTConfig.
    """
    return HiFTOptimizer(model, HiFTConfig.from_arguments(optim, **arguments))
