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
lr_policy="cycle" a cycle holds its largest scheduled value so far (see _lr); `last_lr` is the
value the last update applied.
"""
from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import weakref
from typing import List, Optional

import torch
from torch import nn

from . import distributed, grouping
from .config import HiFTConfig
from .families import IMPLEMENTATION_SWITCHES, check_options
from .engine import TransferEngine
from .flat import FlatGroup, rehome
from .gradients import GradientBuffer
from .kernels import grad_norm
from .regional import warn_if_whole_model_compiled
from .rotation import Rotation
from .state_store import StateStore
from .updaters import MAX_STEP, FusedUpdater, TorchClassUpdater, Updater, updates_of
from .wrappers import check_not_wrapped, is_fully_sharded

STATE_DICT_VERSION = 2


def _check_unclaimed(model: nn.Module) -> None:
    """Each parameter belongs to at most one open HiFTOptimizer: a second wrap of the same model
    would find the first one's frozen groups and hooks."""
    def is_open(ref) -> bool:  # no local reference survives: the collector below can free it
        return ref is not None and ref() is not None and not ref()._closed

    for name, p in model.named_parameters():
        ref = getattr(p, "_hift_rt_owner", None)
        if is_open(ref):
            gc.collect()  # an owner dropped by the user may only be waiting for the cycle collector
        if is_open(ref):
            raise ValueError(f"parameter '{name}' is managed by a HiFTOptimizer that is still open; "
                             "call its close() before wrapping the model again")


class _AtomicSection:
    """Makes a block run entirely or not at all, as seen from outside:

    - Ctrl-C (SIGINT) arriving inside it is held and raised as KeyboardInterrupt after it, so a
      step is never left half-done (a frozen active group, a half-swapped state). Only in the main
      thread with Python's default handler installed (signal.signal works nowhere else); a
      user's own SIGINT handler is left alone.
    - A second thread entering any section of the same optimizer gets a RuntimeError at once
      instead of corrupting the first one's step; the optimizer stays usable.
    """

    def __init__(self):
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, what: str):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"HiFTOptimizer.{what}() called while another thread is inside this optimizer; "
                               "drive one optimizer from one thread")
        held, previous = [], None
        try:
            if threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self._lock.release()
        if held:
            raise KeyboardInterrupt


class HiFTOptimizer(torch.optim.Optimizer):
    """Hierarchical full-parameter fine-tuning of `model` as `config` says; see `hift_rt.wrap`."""

    # GradScaler hands us its scale and found_inf tensors instead of unscaling fp16 gradients
    # itself (which torch refuses for fp16 parameters); see step().
    _step_supports_amp_scaling = True
    # Not an `optim=` for another HiFTOptimizer (HiFTConfig refuses it without importing this module).
    runs_groups_itself = True

    def __init__(self, model: nn.Module, config: HiFTConfig):
        self._closed = True  # until fully built: close() and other wraps ignore a half-built one
        self._atomic = _AtomicSection()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, HiFTConfig):
            raise TypeError("HiFTOptimizer(model, config) takes a HiFTConfig; use hift_rt.wrap(model, ...)")
        check_not_wrapped(model)
        if is_fully_sharded(model) and type(self) is HiFTOptimizer:
            raise ValueError("the model's parameters are FSDP2 DTensors: build the optimizer with hift_rt.wrap, "
                             "which returns hift_rt.fsdp.FSDPHiFTOptimizer for them")
        self.config = config
        warn_if_whole_model_compiled(model)
        _check_unclaimed(model)
        _thaw_copy(model)
        cut = grouping.cut(model, config.units_per_group, config.groups)
        if not cut:
            raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
        named = [np for unit_group in cut for np in unit_group.params]
        self.device, self.dtype = grouping.check_single_device_dtype(named)
        self.master_weights, self.offload = config.memory_policy(self.device, self.dtype)
        sparse = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and m.weight.requires_grad]
        if sparse:
            raise ValueError(f"module(s) {sparse} have sparse=True; hift_rt needs dense gradients "
                             "(build the embedding with sparse=False)")

        self._comm = self._communicator()
        self.groups = self._build_groups(model, cut)
        if self._comm:
            try:
                self._comm.check_same(self._description())
            except ValueError:
                # The refusal's traceback holds this half-built optimizer (in reference cycles) until
                # a garbage collection: let go of the group now (close() does), or destroy_process_group
                # leaves its gloo threads running into the interpreter's teardown, which can abort (exit -6).
                self._comm.close()
                raise
        self._make_gradients()
        self._steps = [0] * len(self.groups)
        self._rotation = Rotation(len(self.groups), config.strategy, config.seed)
        self._cycle_lr: Optional[float] = None  # lr_policy="cycle": the lr the current cycle applies
        self._cycle_lr_of: Optional[int] = None  # the cycle _cycle_lr belongs to
        self.last_lr: Optional[float] = None  # the lr the last update applied (what to log)
        # max_grad_norm: the active group's gradient norm before clipping, as of the last update,
        # written in place on the device (reading it is the caller's host sync, not step()'s).
        self.grad_norm = torch.full((), float("nan"), device=self.device)
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
            p._hift_rt_owner = weakref.ref(self)
        self._activate(self._rotation.active)
        # Marks the model (a deep copy carries the mark): see _thaw_copy.
        model._hift_rt_managed = frozenset(name for name, _ in named)
        self._model_ref = weakref.ref(model)
        self._closed = False

    def _communicator(self) -> Optional[distributed.Communicator]:
        return distributed.resolve(self.config.process_group)

    def _build_groups(self, model: nn.Module, cut) -> List[FlatGroup]:
        """Each group re-homed into one flat buffer, padded to a whole share per data-parallel rank."""
        shards = self._comm.world if self._comm else 1
        groups = []
        for unit_group in cut:
            groups.append(rehome(model, unit_group, self.config.no_decay, shards))
            if self.device.type == "cuda":
                # The group's old parameters are free now, each in its own segment of the caching
                # allocator if the model was loaded tensor by tensor: give them back, so that the
                # memory wrap reserves stays at the weights plus one group.
                torch.cuda.empty_cache()
        return groups

    def _make_gradients(self) -> None:
        largest = max(group.numel for group in self.groups)
        self._gradients = GradientBuffer(largest, self.dtype, self.device)
        # This rank's share of the active group's gradient (data parallel, fused path).
        sharded = self._comm is not None and self.config.family is not None
        self._shard_grad = torch.empty(largest // self._comm.world if sharded else 0,
                                       dtype=self.dtype, device=self.device)

    def _make_updater(self) -> Updater:
        config, active = self.config, self._rotation.active
        store = StateStore(len(self.groups), self.device, self.engine)
        if config.family is not None:
            return FusedUpdater(self.groups, store, config.family, self.defaults, config.state_dtype,
                                self.master_weights, active, config.window_bytes(self.device), self._comm)
        return TorchClassUpdater(self.groups, store, config.torch_class, config.options, self.master_weights == "fp32",
                                 config.no_decay is not None, config.optim_name, config.lr, active)

    def _description(self) -> dict:
        """What every data-parallel rank must agree on: settings, the grouping, the parameters."""
        c = self.config
        return {"settings": {"optim": c.optim_name, "options": repr(sorted(c.options.items())), "strategy": c.strategy,
                             "seed": c.seed, "lr_policy": c.lr_policy, "state_dtype": c.state_dtype,
                             "master_weights": self.master_weights, "offload": self.offload,
                             "max_grad_norm": c.max_grad_norm, "device_type": self.device.type},
                "groups": [[(name, tuple(p.shape), str(p.dtype)) for name, p in group.params] for group in self.groups]}

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
        gradients = self._gradients.nbytes + self._shard_grad.numel() * self._shard_grad.element_size()
        return {"weights": weights, "gradients": gradients, **self._updater.memory()}

    def communication_stats(self) -> dict:
        """Data parallel: bytes each kind of collective moved so far from this rank (reduce_scatter,
        all_gather, all_reduce). Empty without torch.distributed."""
        return self._comm.counters() if self._comm else {}

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
        the other groups' parameters have no gradient. After close() it sets every parameter's
        .grad to None, as torch's zero_grad does (the model is plain again)."""
        if self._closed:
            for group in self.groups:
                for _, p in group.params:
                    p.grad = None
            return
        with self._atomic("zero_grad"):
            self._gradients.zero(self.groups[self._rotation.active])

    # -- the step ----------------------------------------------------------------------------
    def _lr(self) -> float:
        """The lr this step applies. "step": the scheduled value. "cycle": the largest value
        scheduled so far in this cycle, i.e. the cycle's first value held while the schedule
        decays (HiFT's per-cycle lr), and the schedule itself while it rises, so that a warmup
        starting at 0 never turns a whole cycle into a no-op."""
        lr = self.param_groups[0]["lr"]
        lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        if self.config.lr_policy == "cycle":
            if self._cycle_lr_of != self._rotation.cycle:
                self._cycle_lr, self._cycle_lr_of = lr, self._rotation.cycle
            lr = self._cycle_lr = max(self._cycle_lr, lr)
        self.last_lr = lr
        return lr

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
        host-side decision. Without a scaler step() never synchronizes the host in steady state;
        through a state window smaller than the group it returns once the group's last chunks
        are arriving (each arrival can be queued only after the update that frees its buffer).
        A Ctrl-C during step() takes effect when it returns: a step happens entirely or not at all.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self._atomic("step"):
            self._step()
        return loss

    def _step(self) -> None:
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        comm = self._comm
        rescale = None
        if found_inf is not None:
            if comm:
                found_inf, grad_scale, rescale = self._agree_on_scaler(found_inf, grad_scale)
            if bool(found_inf.item()):
                return
        group = self.groups[self._rotation.active]
        group.check_not_moved(self.device, self.dtype)
        grad, has_grad = self._gradients.collect(group)
        if rescale is not None:
            grad.mul_(rescale)
        if comm:
            has_grad = comm.any(has_grad)  # a parameter used on any rank has a (mean) gradient
        if not any(has_grad):  # nothing to update, as in torch; the rotation goes on
            self._advance()
            return
        if comm and self._shard_grad.numel():  # fused: this rank updates its shard
            shard = self._shard_grad[:group.numel // comm.world]
            comm.reduce_scatter_mean(shard, grad)
            grad = shard
        elif comm:  # a torch.optim class: every rank updates the whole group
            comm.all_reduce(grad)
            grad.div_(comm.world)
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float().reshape(1)
        if self.config.max_grad_norm is not None:
            norm = grad_norm(grad)
            if comm and self._shard_grad.numel():  # the norm over every shard: one scalar on the device
                norm = norm.square()
                comm.all_reduce(norm)
                norm = norm.sqrt()
            coef = self._clip(norm, coef)
        self._updater.update(group, grad, has_grad, lr=self._lr(), options=self._options(), clip_coef=coef)
        if comm and self._shard_grad.numel():
            comm.all_gather_in_place(group.flat)
        self._steps[group.index] += 1
        self._advance()

    def _clip(self, norm: torch.Tensor, unscale: Optional[torch.Tensor]) -> torch.Tensor:
        """The gradient's factor with clipping, shape (1,) fp32 on the device, no host sync.

        norm: the global norm of the (scaled) gradient, 0-d fp32; unscale: 1 / the GradScaler's
        scale, shape (1,), or None. With g the unscaled gradient, ||g|| = norm * unscale (kept in
        `grad_norm`) and the factor is unscale * min(1, max_grad_norm / (||g|| + 1e-6)), as
        torch.nn.utils.clip_grad_norm_ clips."""
        if unscale is not None:
            norm = norm * unscale[0]
        self.grad_norm.copy_(norm)
        clip = torch.clamp(self.config.max_grad_norm / (norm + 1e-6), max=1.0).reshape(1)
        return clip if unscale is None else unscale * clip

    def _agree_on_scaler(self, found_inf: torch.Tensor, grad_scale: Optional[torch.Tensor]):
        """Data parallel with a GradScaler: (found_inf, grad_scale, rescale) agreed by every rank.

        Each rank's GradScaler checked only its own gradients, so found_inf, and the scale each
        rank's scaler.update() then moves on its own flag, can differ between ranks. Every rank
        skips the step when any found inf/NaN. The gradients are brought to the smallest scale
        before they are averaged (a rank whose scaler backed off alone holds a smaller one):
        `rescale` (a float, None when the scales agree) multiplies this rank's gradient, and the
        kernel undoes the common scale. One all-reduce of two scalars; the host reads them in the
        sync found_inf costs anyway."""
        scale = grad_scale.float().reshape(()) if grad_scale is not None else torch.ones((), device=found_inf.device)
        flags = torch.stack([found_inf.float().reshape(()), -scale])  # MAX of -scale: the smallest scale
        self._comm.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        smallest = -flags[1]
        agreed_inf, smallest_value, own = torch.stack([flags[0], smallest, scale]).tolist()
        if grad_scale is None or agreed_inf or smallest_value == own:
            return flags[0], grad_scale, None
        return flags[0], smallest.reshape(1), smallest_value / own

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

        Data parallel (fused optimizers): a collective, every rank must call it; rank 0's holds the
        whole state (gathered from every rank's shard), the others' only the rest. Any number of
        ranks loads rank 0's: each takes its shard.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed; take state_dict() before close()")
        with self._atomic("state_dict"):
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
                    "state_dtype": self.config.state_dtype,
                    "groups": [[n for n, _ in group.params] for group in self.groups],
                    "group_steps": list(self._steps),
                    "rotation": self._rotation.state_dict(),
                    "cycle_lr": self._cycle_lr,
                    "cycle_lr_of": self._cycle_lr_of,
                    # Data parallel, fused: the state is sharded and only rank 0 gathers it all.
                    "complete": not (self._shard_grad.numel() and self._comm.rank != 0),
                },
            }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict() of a HiFTOptimizer over the same model layout (any step,
        mid-cycle included). A plain torch.optim state dict of the same optimizer over the same
        parameters (e.g. from torch.optim.AdamW) is accepted too: state and steps are taken,
        the rotation starts afresh.

        Everything is checked before anything changes: a state dict that does not fit, or whose
        values cannot be valid (non-finite, a negative second moment, a rotation out of range),
        raises ValueError naming the problem and leaves the optimizer as it was.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed")
        with self._atomic("load_state_dict"):
            plan = self._check_state_dict(state_dict)
            for group, entries in zip(self.groups, plan["entries"]):
                self._updater.load_group_state(group, entries)
            self._apply_position(plan)

    def _apply_position(self, plan: dict) -> None:
        """After a load: the checked plan's hyperparameters, step counts, rotation and cycle lr;
        the state moves to the group that is active now."""
        old = self._rotation.active
        self.param_groups[0].update(plan["param_group"])
        self._steps = plan["steps"]
        self._rotation = plan["rotation"]
        self._cycle_lr, self._cycle_lr_of = plan["cycle_lr"]
        new = self._rotation.active
        if new != old:
            self._gradients.deactivate(self.groups[old])
            self._updater.switch(old, new)
        self._activate(new)

    def _check_state_dict(self, state_dict) -> dict:
        """Everything load_state_dict will apply, checked: ValueError for anything that does not fit."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
                or not isinstance(state_dict.get("param_groups"), list):
            raise ValueError("not an optimizer state dict (expected a dict with 'state' and 'param_groups')")
        k = len(self.groups)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != 1 or len(saved_groups[0].get("params", ())) != len(self._index):
            raise ValueError(f"state dict has {sum(len(pg.get('params', ())) for pg in saved_groups)} parameters "
                             f"in {len(saved_groups)} group(s); this optimizer has {len(self._index)} in 1")
        param_group = {key: value for key, value in saved_groups[0].items()
                       if key != "params" and key not in IMPLEMENTATION_SWITCHES}
        lr = param_group.get("lr", self.param_groups[0]["lr"])
        if not (torch.is_tensor(lr) or isinstance(lr, (int, float))) or not 0 <= float(lr) < math.inf:
            raise ValueError(f"state dict has lr {lr!r}; expected a finite number >= 0")
        if self.config.family is not None:
            self.config.family.check_loaded_options(param_group)
            check_options(self.config.family.name, {**self._options(), **param_group})
        n = len(self._index)
        strays = [key for key in state_dict["state"] if isinstance(key, bool) or not isinstance(key, int)
                  or not 0 <= key < n]
        if strays:
            raise ValueError(f"state dict's 'state' has key {strays[0]!r} ({type(strays[0]).__name__}): its keys are "
                             f"parameter indices, ints in 0..{n - 1} (a state dict through JSON has str keys)")
        entries = [[state_dict["state"].get(self._index[id(p)]) for _, p in group.params] for group in self.groups]
        for group, group_entries in zip(self.groups, entries):
            self._updater.check_group_state(group, group_entries)
        hift = state_dict.get("hift")
        if hift is None:  # a plain torch state dict: steps from the entries, a fresh rotation
            steps = [max(updates_of(e) for e in group_entries) for group_entries in entries]
            return {"entries": entries, "param_group": param_group, "steps": steps,
                    "rotation": Rotation(k, self.config.strategy, self.config.seed), "cycle_lr": (None, None)}
        if not isinstance(hift, dict):
            raise ValueError(f"state dict's 'hift' entry is a {type(hift).__name__}, not a dict")
        if hift.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"state dict version {hift.get('version')} is not {STATE_DICT_VERSION}")
        if hift.get("optim") != self.config.optim_name:
            raise ValueError(f"state dict is for optim {hift.get('optim')!r}, this optimizer runs "
                             f"{self.config.optim_name!r}")
        if hift.get("complete") is False:
            raise ValueError("this state dict was taken on a data-parallel rank other than 0, which holds only "
                             "its shard of the state: save and load rank 0's state_dict()")
        if hift.get("groups") != [[n for n, _ in group.params] for group in self.groups]:
            raise ValueError("state dict was saved with another group layout (parameter names per group differ)")
        steps = hift.get("group_steps")
        if not isinstance(steps, (list, tuple)) or len(steps) != k or \
                not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_STEP for s in steps):
            raise ValueError(f"state dict's group_steps {steps!r} is not {k} counts in [0, 2**53]")
        for group, group_entries, group_steps in zip(self.groups, entries, steps):
            check_steps_within(group, group_entries, group_steps)
        rotation = Rotation(k, self.config.strategy, self.config.seed)
        rotation.load_state_dict(hift.get("rotation"))
        cycle_lr, cycle_lr_of = hift.get("cycle_lr"), hift.get("cycle_lr_of")
        if (cycle_lr is None) != (cycle_lr_of is None) or cycle_lr is not None and not (
                isinstance(cycle_lr, (int, float)) and 0 <= cycle_lr < math.inf and isinstance(cycle_lr_of, int)):
            raise ValueError(f"state dict's cycle lr {cycle_lr!r} (of cycle {cycle_lr_of!r}) is not valid")
        return {"entries": entries, "param_group": param_group, "steps": list(steps), "rotation": rotation,
                "cycle_lr": (cycle_lr, cycle_lr_of)}

    def close(self) -> None:
        """Free the pinned host memory and the transfer engine, and hand the model back: every
        parameter trainable again, no gradients, no hooks. The model keeps its weights (still
        views of the flat buffers, which live as long as the parameters)."""
        if getattr(self, "_closed", True):
            return
        with self._atomic("close"):
            self._closed = True
            self._gradients.detach()
            for group in self.groups:
                for _, p in group.params:
                    p.grad = None
                    p.requires_grad_(True)
                    if getattr(p, "_hift_rt_owner", None) is not None and p._hift_rt_owner() is self:
                        del p._hift_rt_owner
            model = self._model_ref()
            if model is not None:
                model.__dict__.pop("_hift_rt_managed", None)
            self._updater.close()
            if self.engine is not None:
                self.engine.close()
            if self._comm is not None:
                self._comm.close()

    def __deepcopy__(self, memo):
        raise TypeError("a HiFTOptimizer cannot be copied (it owns pinned memory, hooks and the model's "
                        "flat buffers); copy the model, wrap the copy, and load this optimizer's state_dict()")

    def __reduce_ex__(self, protocol):
        raise TypeError("a HiFTOptimizer cannot be pickled; save its state_dict() (torch.save) and "
                        "load_state_dict() into a fresh hift_rt.wrap of the model")

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def __repr__(self) -> str:
        return (f"HiFTOptimizer(optim={self.config.optim_name!r}, groups={len(self.groups)}, "
                f"strategy={self.config.strategy!r}, active={self.active_group}, cycle={self.cycle}, "
                f"offload={self.offload}, master_weights={self.master_weights}, lr={self.param_groups[0]['lr']})")


def check_steps_within(group, entries, group_steps: int) -> None:
    """ValueError for a parameter whose saved step count exceeds its group's: a parameter is
    updated only in its group's steps."""
    for (name, _), entry in zip(group.params, entries):
        if updates_of(entry) > group_steps:
            raise ValueError(f"state 'step' of parameter '{name}' is {updates_of(entry)}, more updates than its "
                             f"group {group.index} has had ({group_steps})")


def _thaw_copy(model: nn.Module) -> None:
    """A deep copy of a wrapped model carries its inactive groups frozen (requires_grad=False, set
    by the rotation, not by the user) and the mark wrap left on the model; its parameters have no
    owner. Make the parameters hift_rt froze trainable again, so the copy is cut as the original
    was. The original itself, still wrapped, was refused by _check_unclaimed."""
    managed = model.__dict__.get("_hift_rt_managed")
    if not managed:
        return
    for name, p in model.named_parameters():
        owner = getattr(p, "_hift_rt_owner", None)
        if name in managed and (owner is None or owner() is None or owner()._closed):
            p.requires_grad_(True)

