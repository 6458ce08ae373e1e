"""HiFTOptimizer: a `torch.optim.Optimizer` that updates one group of a model per step.

`wrap(model, ...)` re-homes each group's parameters into one flat buffer (the `nn.Parameter`
objects stay, their `.data` become views), freezes every group but the active one, and returns
the optimizer. One `step()`:

1. takes the active group g's gradient, which autograd accumulated straight into a flat gradient
   buffer (the parameters' `.grad` are views of it);
2. optionally computes its norm on the device and the clip coefficient (no host sync);
3. makes the compute stream wait for g's state to be on the device, then runs one fused kernel
   over g's flat buffers (weights, optional fp32 master, state);
4. freezes g, drops its gradients, activates the next group h of the rotation, and asks the state
   store to swap g's state out and h's in behind the update kernel. It returns without
   synchronizing the host.

The learning rate is read from `param_groups[0]["lr"]` (so torch LR schedulers work): with
lr_policy="cycle" every step of a cycle uses the value it held at the cycle's first step.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import grouping
from .engine import TransferEngine
from .families import FAMILIES
from .kernels import grad_norm
from .rotation import STRATEGIES, Rotation
from .state_store import StateStore

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLAT_ALIGN = 64
STATE_DICT_VERSION = 1


@dataclass
class FlatGroup:
    """One group re-homed: its parameters (decayed first) as views of `flat`."""
    index: int
    name: str
    params: List[Tuple[str, nn.Parameter]]
    flat: torch.Tensor          # (numel,) the parameters' storage
    offsets: List[int]          # element offset of each parameter in `flat`
    decay_end: int              # elements [0, decay_end) get weight decay
    data_ptrs: List[int]        # each parameter's expected data_ptr (moved-model check)
    owners: List[Tuple[nn.Module, str]]  # where the model holds each parameter (moved-model check)

    @property
    def numel(self) -> int:
        return self.flat.numel()


def _split_decay(params, no_decay):
    """Decayed parameters first, then the others; `no_decay(name)` says which get none."""
    if no_decay is None:
        return list(params), len(params)
    decay = [(n, p) for n, p in params if not no_decay(n)]
    rest = [(n, p) for n, p in params if no_decay(n)]
    return decay + rest, len(decay)


def _adopt_grad_hook(optimizer_ref):
    """A post-accumulate-grad hook that holds its optimizer weakly, so that dropping the
    optimizer frees it (and its pinned memory) even while the model lives on."""
    def hook(p):
        optimizer = optimizer_ref()
        if optimizer is not None:
            optimizer._adopt_grad(p)
    return hook


def _owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    module_name, _, key = name.rpartition(".")
    return model.get_submodule(module_name), key


def _rehome(model: nn.Module, group: grouping.Group, no_decay, device, dtype) -> FlatGroup:
    """Copy a group's parameters into one flat buffer and make each parameter a view of it."""
    params, n_decay = _split_decay(group.params, no_decay)
    numel = sum(p.numel() for _, p in params)
    # Padded to a multiple of FLAT_ALIGN elements so that every buffer sliced from a group's
    # state blob starts 16-byte aligned: Triton then vectorizes to 128-bit loads and stores.
    # The padding is zero and stays zero (no parameter covers it, its gradient is zero).
    flat = torch.zeros(-(-numel // FLAT_ALIGN) * FLAT_ALIGN, dtype=dtype, device=device)
    offsets, offset, decay_end = [], 0, 0
    for i, (_, p) in enumerate(params):
        flat[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
        offsets.append(offset)
        offset += p.numel()
        if i < n_decay:
            decay_end = offset
    with torch.no_grad():
        for (_, p), off in zip(params, offsets):
            p.data = flat[off:off + p.numel()].view(p.shape)
    return FlatGroup(group.index, group.name, params, flat, offsets, decay_end, [p.data_ptr() for _, p in params],
                     [_owner(model, n) for n, _ in params])


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
    """Hierarchical full-parameter fine-tuning of `model`; see `hift_rt.wrap` for the arguments."""

    # GradScaler hands us its scale and found_inf tensors instead of unscaling fp16 gradients
    # itself (which torch refuses for fp16 parameters); see step().
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, optim: Union[str, type] = "adamw", *, lr: float,
                 strategy: str = "bottom_up", units_per_group: int = 1,
                 groups: Optional[Sequence[Sequence[str]]] = None, offload: Union[str, bool] = "auto",
                 lr_policy: str = "cycle", max_grad_norm: Optional[float] = None,
                 no_decay: Optional[Sequence[str]] = None, master_weights: Union[str, bool] = "auto",
                 seed: int = 0, **hyperparameters):
        self._closed = True  # until fully built: close() and other wraps ignore a half-built one
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if lr_policy not in ("cycle", "step"):
            raise ValueError(f"lr_policy must be 'cycle' or 'step', got {lr_policy!r}")
        if offload not in ("auto", True, False):
            raise ValueError(f"offload must be 'auto', True or False, got {offload!r}")
        if master_weights not in ("auto", True, False):
            raise ValueError(f"master_weights must be 'auto', True or False, got {master_weights!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
        if isinstance(no_decay, str):
            no_decay = (no_decay,)
        if no_decay is None or callable(no_decay):
            self.no_decay = no_decay
        else:
            substrings = tuple(no_decay)
            self.no_decay = lambda name: any(s in name for s in substrings)

        self.family = None
        self.torch_class = None
        if isinstance(optim, str):
            if optim not in FAMILIES:
                raise ValueError(f"unknown optim {optim!r}: expected one of {sorted(FAMILIES)} "
                                 "or a torch.optim.Optimizer subclass")
            self.family = FAMILIES[optim]
            options = self.family.options(hyperparameters)
            self.optim_name = optim
        elif isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer) and not issubclass(optim, HiFTOptimizer):
            self.torch_class = optim
            options = dict(hyperparameters)
            self.optim_name = f"{optim.__module__}.{optim.__qualname__}"
        else:
            raise ValueError(f"unknown optim {optim!r}: expected one of {sorted(FAMILIES)} "
                             "or a torch.optim.Optimizer subclass")

        # -- groups --------------------------------------------------------------------------
        if groups is not None:
            cut = grouping.groups_from_prefixes(model, groups)
        else:
            cut = grouping.groups_from_units(grouping.build_units(model), units_per_group)
        if not cut:
            raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
        all_params = [np for g in cut for np in g.params]
        _claim(all_params, self)
        device, dtype = grouping.check_single_device_dtype(all_params)
        if self.family is not None and dtype not in FUSED_DTYPES:
            raise ValueError(f"parameters are {dtype}; the fused kernels take float32, bfloat16 or float16")
        if not dtype.is_floating_point:
            raise ValueError(f"parameters are {dtype}; only floating-point parameters can be trained")
        if master_weights == "auto":
            master_weights = dtype != torch.float32
        elif master_weights and dtype == torch.float32:
            raise ValueError("master_weights=True needs bfloat16 or float16 parameters; float32 parameters are their own master")
        if offload == "auto":
            offload = device.type == "cuda"
        self.device, self.dtype = device, dtype
        self.master_weights = bool(master_weights)
        self.offload = bool(offload)
        self.strategy, self.lr_policy, self.max_grad_norm = strategy, lr_policy, max_grad_norm

        sparse = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]
        if sparse:
            raise ValueError(f"module(s) {sparse} have sparse=True; hift_rt needs dense gradients "
                             "(build the embedding with sparse=False)")
        self.groups: List[FlatGroup] = [_rehome(model, g, self.no_decay, device, dtype) for g in cut]
        self._grad_buffer = torch.zeros(max(g.numel for g in self.groups), dtype=dtype, device=device)
        self._grad_views: Dict[int, torch.Tensor] = {}  # id(param) -> its view, active group only
        self._touched: set = set()  # id(param) of active parameters autograd gave a gradient
        self._steps = [0] * len(self.groups)
        self._rotation = Rotation(len(self.groups), strategy, seed)
        self._cycle_lr: Optional[float] = None
        self._cycle_lr_of: Optional[int] = None  # the cycle _cycle_lr was read in
        self.engine = TransferEngine(device) if self.offload else None

        ordered = [p for g in self.groups for _, p in g.params]
        defaults = {"lr": float(lr), **options}
        self._building = True
        super().__init__([{"params": ordered}], defaults)
        self._building = False
        self._index = {id(p): i for i, p in enumerate(ordered)}

        if self.family is not None:
            from .updaters import FusedUpdater
            self._updater = FusedUpdater(self)
        else:
            from .updaters import TorchClassUpdater
            self._updater = TorchClassUpdater(self, options)

        self._hooks = [p.register_post_accumulate_grad_hook(_adopt_grad_hook(weakref.ref(self)))
                       for _, p in all_params]
        for _, p in all_params:
            p.requires_grad_(False)
        self._activate(self._rotation.active)
        self._closed = False

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
        the flat buffer's `buffer_numel` (padded for alignment) and `decay_end` (elements
        [0, decay_end) get weight decay)."""
        return [{"index": g.index, "name": g.name, "params": [n for n, _ in g.params],
                 "numel": sum(p.numel() for _, p in g.params), "buffer_numel": g.numel,
                 "decay_end": g.decay_end} for g in self.groups]

    def memory_breakdown(self) -> dict:
        """Bytes of the runtime's own buffers: gradients and optimizer state on the device, state
        in host memory. Weights are the model's own (re-homed, not copied)."""
        weights = sum(g.numel for g in self.groups) * self.dtype.itemsize
        return {"weights": weights, "gradients": self._grad_buffer.numel() * self.dtype.itemsize,
                **self._updater.memory()}

    def transfer_stats(self) -> dict:
        """The engine's figures (bytes, busy seconds and GB/s per direction) and the exposed
        transfer: seconds the compute stream waited for a prefetch. Empty without offload."""
        if self.engine is None:
            return {}
        stats = self.engine.counters()
        stats["exposed_wait_seconds"] = self._updater.exposed_wait_seconds()
        return stats

    # -- gradients ---------------------------------------------------------------------------
    def _adopt_grad(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: notes that `p` got a gradient, and moves a gradient that
        autograd did not accumulate into the flat buffer (the .grad was set to None, e.g. by
        model.zero_grad()) into it, so the transient copy is freed at once."""
        view = self._grad_views.get(id(p))
        if view is None or p.grad is None or p.grad.is_sparse:
            return  # not in the active group, or step() reports the problem
        self._touched.add(id(p))
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad.reshape(view.shape))
            p.grad = view

    def _collect_grads(self, g: FlatGroup) -> Tuple[torch.Tensor, List[bool]]:
        """The active group's flat gradient, with stray gradients folded in, and for each of its
        parameters whether it has a gradient: torch.optim skips a parameter whose .grad is None
        (an unused branch, an expert no token was routed to), and so do we."""
        grad = self._grad_buffer[:g.numel]
        has_grad = []
        for (name, p), off in zip(g.params, g.offsets):
            view = grad[off:off + p.numel()].view(p.shape)
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"parameter '{name}' has a sparse gradient; hift_rt needs dense "
                                   "gradients (e.g. nn.Embedding(sparse=False))")
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)  # set by hand, or by autograd after .grad was set to None
                has_grad.append(True)
            else:
                has_grad.append(p.grad is not None and id(p) in self._touched)
                if not has_grad[-1]:
                    view.zero_()  # no gradient since the last zero_grad/step: None for torch
            p.grad = view
        return grad, has_grad

    def _check_not_moved(self, g: FlatGroup) -> None:
        for (name, p), ptr, (module, key) in zip(g.params, g.data_ptrs, g.owners):
            held = module._parameters.get(key)
            if held is not p:  # the model swapped in a new Parameter (e.g. .to() across device types)
                p = held if held is not None else p
                ptr = None
            if p.data_ptr() != ptr or p.device != self.device or p.dtype != self.dtype:
                raise RuntimeError(
                    f"parameter '{name}' was moved or re-cast after hift_rt.wrap (now {p.device} {p.dtype}, "
                    f"wrapped on {self.device} {self.dtype}); move or cast the model before wrap, then wrap again")

    def _activate(self, h: int) -> None:
        g = self.groups[h]
        self._check_not_moved(g)
        grad = self._grad_buffer[:g.numel]
        grad.zero_()
        self._touched = set()
        self._grad_views = {}
        for (_, p), off in zip(g.params, g.offsets):
            view = grad[off:off + p.numel()].view(p.shape)
            self._grad_views[id(p)] = view
            p.requires_grad_(True)
            p.grad = view

    def _deactivate(self, g: int) -> None:
        for _, p in self.groups[g].params:
            p.requires_grad_(False)
            p.grad = None
        self._grad_views = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the active group's gradient. Its `.grad` stay views of the flat gradient buffer
        (so autograd keeps accumulating in place) whatever `set_to_none` says, and a parameter
        that gets no gradient before the next step() is skipped by it as if its .grad were None;
        the other groups' parameters have no gradient."""
        g = self.groups[self._rotation.active]
        self._grad_buffer[:g.numel].zero_()
        self._touched = set()
        for _, p in g.params:
            p.grad = self._grad_views[id(p)]

    # -- the step ----------------------------------------------------------------------------
    def _lr(self) -> float:
        lr = self.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if self.lr_policy == "step":
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
        host sync, as GradScaler itself spends for any optimizer; without a scaler step() never
        synchronizes the host in steady state.
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
        g = self.groups[self._rotation.active]
        self._check_not_moved(g)
        grad, has_grad = self._collect_grads(g)
        if not any(has_grad):  # nothing to update, as in torch; the rotation goes on
            self._advance()
            return loss
        coef = None
        if grad_scale is not None:
            coef = grad_scale.double().reciprocal().float().reshape(1)
        if self.max_grad_norm is not None:
            norm = grad_norm(grad)
            if coef is not None:
                norm = norm * coef[0]
            clip = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0).reshape(1)
            coef = clip if coef is None else coef * clip
        self._updater.update(g, grad, has_grad, lr=self._lr(), options=self._options(), clip_coef=coef)
        self._steps[g.index] += 1
        self._advance()
        return loss

    def _advance(self) -> None:
        g = self._rotation.active
        self._rotation.advance()
        h = self._rotation.active
        if h == g:
            self._activate(h)  # same group again (k = 1, or a random order's seam): fresh gradients
            return
        self._deactivate(g)
        self._updater.switch(g, h)
        self._activate(h)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's layout (`state` keyed by parameter index, `param_groups`) plus a `hift` entry
        with the rotation, the per-group step counts and the group layout.

        For the fused optimizers `state[i]` holds torch's keys for that optimizer (`step`,
        `exp_avg`, `exp_avg_sq`, `sum`, `momentum_buffer`) and `master` with fp32 master weights;
        only groups updated at least once appear, as in torch.
        """
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._index)))
        return {
            "state": self._updater.per_param_state(),
            "param_groups": [group],
            "hift": {
                "version": STATE_DICT_VERSION,
                "optim": self.optim_name,
                "master_weights": self.master_weights,
                "groups": [[n for n, _ in g.params] for g in self.groups],
                "group_steps": list(self._steps),
                "rotation": self._rotation.state_dict(),
                "cycle_lr": self._cycle_lr,
                "cycle_lr_of": self._cycle_lr_of,
                "updater": self._updater.extra_state(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() of a HiFTOptimizer over the same model layout (any step,
        mid-cycle included). A plain torch.optim state dict of the same optimizer over the same
        parameters (e.g. from torch.optim.AdamW) is accepted too: state and steps are taken,
        the rotation starts afresh."""
        hift = state_dict.get("hift")
        if hift is not None:
            if hift.get("version") != STATE_DICT_VERSION:
                raise ValueError(f"state dict version {hift.get('version')} is not {STATE_DICT_VERSION}")
            if hift["optim"] != self.optim_name:
                raise ValueError(f"state dict is for optim {hift['optim']!r}, this optimizer runs {self.optim_name!r}")
            mine = [[n for n, _ in g.params] for g in self.groups]
            if hift["groups"] != mine:
                raise ValueError("state dict was saved with another group layout (parameter names per group differ)")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != 1 or len(saved_groups[0]["params"]) != len(self._index):
            raise ValueError(f"state dict has {sum(len(g['params']) for g in saved_groups)} parameters in "
                             f"{len(saved_groups)} group(s); this optimizer has {len(self._index)} in 1")
        old = self._rotation.active
        self._updater.load_per_param_state(state_dict["state"], hift)
        for key, value in saved_groups[0].items():
            if key != "params":
                self.param_groups[0][key] = value
        if hift is not None:
            self._steps = [int(s) for s in hift["group_steps"]]
            self._rotation.load_state_dict(hift["rotation"])
            self._cycle_lr, self._cycle_lr_of = hift["cycle_lr"], hift["cycle_lr_of"]
        else:
            self._steps = self._updater.group_steps_from_state()
        new = self._rotation.active
        if new != old:
            self._deactivate(old)
        self._updater.after_load(new)
        self._activate(new)

    def close(self) -> None:
        """Free the pinned host memory and the transfer engine, and hand the model back: every
        parameter trainable again, no gradients, no hooks. The model keeps its weights (still
        views of the flat buffers, which live as long as the parameters)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        for g in self.groups:
            for _, p in g.params:
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
        return (f"HiFTOptimizer(optim={self.optim_name!r}, groups={len(self.groups)}, strategy={self.strategy!r}, "
                f"active={self.active_group}, cycle={self.cycle}, offload={self.offload}, "
                f"master_weights={self.master_weights}, lr={self.param_groups[0]['lr']})")


def wrap(model: nn.Module, optim: Union[str, type] = "adamw", *, lr: float, strategy: str = "bottom_up",
         units_per_group: int = 1, groups=None, offload="auto", lr_policy: str = "cycle",
         max_grad_norm: Optional[float] = None, no_decay=None, master_weights="auto", seed: int = 0,
         **optimizer_hyperparameters) -> HiFTOptimizer:
    """Turn `model` into a HiFT fine-tuning set-up; returns its optimizer.

    Call it after the model is on its device and dtype. The model stays a plain nn.Module.

    optim: "adamw", "adam", "adagrad", "sgd" (fused kernels), or a torch.optim.Optimizer subclass
        run per group over the group's flat tensor (its state offloaded like ours).
    strategy: "bottom_up", "top_down" or "random" (a fresh permutation per cycle, from `seed`).
    units_per_group: consecutive units (input side, each block, output side) per group.
    groups: lists of parameter-name prefixes, one list per group, bottom to top (overrides units).
    offload: "auto" (state of inactive groups in pinned host memory when on CUDA), True, False.
    lr_policy: "cycle" (the lr at a cycle's first step holds for the cycle) or "step".
    max_grad_norm: clip the active group's gradient to this norm (computed on the device).
    no_decay: parameter-name substrings that get no weight decay, e.g. ("bias", "norm"), or a
        function name -> bool.
    master_weights: "auto" (fp32 master for bf16/fp16 parameters), True or False.
    optimizer_hyperparameters: torch's names and defaults (betas, eps, weight_decay, momentum, ...).
    """
    return HiFTOptimizer(model, optim, lr=lr, strategy=strategy, units_per_group=units_per_group,
                         groups=groups, offload=offload, lr_policy=lr_policy, max_grad_norm=max_grad_norm,
                         no_decay=no_decay, master_weights=master_weights, seed=seed,
                         **optimizer_hyperparameters)
