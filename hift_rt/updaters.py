"""The two ways a group is updated, behind one contract (Updater).

FusedUpdater: hift_rt's own kernels (a hift_rt.families Family) over the group's flat buffers.
TorchClassUpdater: any torch.optim.Optimizer subclass, one instance per group over the group's flat
tensor (split in two parameters when some elements get no weight decay; fp32 master copies for
bf16/fp16 models).

Both keep every group's state in a StateStore, so prefetch, eviction, exposed-wait timing and
checkpoints work the same on both paths. Owns the updaters; may call hift_rt.state_store,
hift_rt.families (through the Family it is given) and hift_rt.flat (FlatGroup) only.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .families import Family
from .flat import FlatGroup
from .state_store import Field, StateStore

ParamState = Optional[Dict[str, object]]  # torch's per-parameter state entry, None if it has none

# State torch's optimizers keep that is >= 0 by construction (running sums and averages of squares
# or magnitudes): a negative value in a checkpoint means the checkpoint is corrupt.
NONNEGATIVE_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "exp_inf"})


class Updater(ABC):
    """How the active group is updated, and where every group's state lives.

    The optimizer calls, for the active group (a FlatGroup, index g):
      update(group, grad, has_grad, lr=, options=, clip_coef=)  once per step: grad is the group's
          (numel,) flat gradient, has_grad[i] whether group.params[i] got a gradient (torch skips
          a None gradient), options the hyperparameters as param_groups holds them now, clip_coef
          None or a 1-element fp32 device tensor multiplying the gradient (no host sync);
      switch(g, h)  after g's update, when the rotation moves to group h;
    and, for checkpoints, group_state(group) -> one ParamState per parameter of the group (torch's
    keys, e.g. "step", "exp_avg", plus "master") and load_group_state(group, entries), the
    inverse; state is read and written through the store (any group, active or not).
    """

    def __init__(self, groups: List[FlatGroup], store: StateStore):
        self.groups = groups
        self.store = store

    @abstractmethod
    def update(self, group: FlatGroup, grad: torch.Tensor, has_grad: List[bool], *, lr: float, options: dict,
               clip_coef: Optional[torch.Tensor]) -> None:
        ...

    def switch(self, g: int, h: int) -> None:
        if self.store.offloaded:
            self.store.switch(g, h)

    @abstractmethod
    def group_state(self, group: FlatGroup) -> List[ParamState]:
        ...

    @abstractmethod
    def load_group_state(self, group: FlatGroup, entries: List[ParamState]) -> None:
        ...

    def check_group_state(self, group: FlatGroup, entries: List[ParamState]) -> None:
        """Raise ValueError, naming the parameter, for entries that cannot be a valid state of the
        group: a tensor of another size, non-finite values, a negative running sum of squares,
        a step count that is not a number >= 0. Called before anything is loaded."""
        for (name, p), entry in zip(group.params, entries):
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"state of parameter '{name}' is a {type(entry).__name__}, not a dict")
            for key, value in entry.items():
                if key == "step":
                    step = float(value) if torch.is_tensor(value) and value.numel() == 1 or \
                        isinstance(value, (int, float)) else math.nan
                    if not step >= 0 or math.isinf(step):
                        raise ValueError(f"state 'step' of parameter '{name}' is {value!r}, not a count >= 0")
                    continue
                if not torch.is_tensor(value) or value.dim() == 0:
                    continue
                if value.numel() != p.numel():
                    raise ValueError(f"state '{key}' of parameter '{name}' has {value.numel()} elements, "
                                     f"the parameter {p.numel()}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"state '{key}' of parameter '{name}' has non-finite values: "
                                     "the checkpoint is corrupt")
                if key in NONNEGATIVE_STATE and bool((value < 0).any()):
                    raise ValueError(f"state '{key}' of parameter '{name}' has negative values "
                                     f"(min {float(value.min()):.3g}), impossible for '{key}': the checkpoint is corrupt")

    def memory(self) -> dict:
        return {"state_device": self.store.device_bytes(), "state_host": self.store.host_bytes()}

    def exposed_wait_seconds(self) -> float:
        return self.store.exposed_wait_seconds()

    def close(self) -> None:
        self.store.close()


class FusedUpdater(Updater):
    """Each group's state: the family's fp32 buffers (e.g. exp_avg, exp_avg_sq) and, for bf16/fp16
    parameters, an fp32 master, each as long as the group's flat buffer; one launch per step."""

    def __init__(self, groups, store, family: Family, options: dict, master_weights: bool, active: int,
                 window_bytes: Optional[int] = None):
        super().__init__(groups, store)
        self.family = family
        self.master_weights = master_weights
        self.state_names = family.state_names(options)
        self.wrap_options = options  # the initial state depends on them (Adagrad's accumulator)
        # Updates each parameter has had (torch's per-parameter "step"): they differ within a
        # group only when some parameters went without a gradient on some steps.
        self.param_steps = [[0] * len(group.params) for group in groups]
        for group in groups:
            store.define(group.index, self._fields(group), self._initial(group, options), elements=group.numel)
        if store.offloaded:
            store.start(active, window_bytes)

    def _fields(self, group: FlatGroup) -> List[Field]:
        names = list(self.state_names) + (["master"] if self.master_weights else [])
        return [Field(name, torch.float32, group.numel) for name in names]

    def _initial(self, group: FlatGroup, options: dict) -> Dict[str, torch.Tensor]:
        """State before the first update; the master is the fp32 value of the weights."""
        values = self.family.initial_state(group.numel, group.flat.device, options)
        if self.master_weights:
            values["master"] = group.flat.float()
        return values

    @staticmethod
    def _runs(group: FlatGroup, has_grad: List[bool], steps: List[int]) -> List[List[int]]:
        """[start, end, step] element ranges to update: runs of consecutive parameters that have a
        gradient and the same step count (with the zero alignment gaps between them, which stay
        zero). The usual case is one run over the whole buffer."""
        runs: List[List[int]] = []
        for i, (_, _, off, n) in enumerate(group.slices()):
            if not has_grad[i]:
                continue
            if runs and has_grad[i - 1] and steps[i - 1] == steps[i]:  # parameter i - 1 ends the last run
                runs[-1][1] = off + n
            else:
                runs.append([off, off + n, steps[i]])
        if len(runs) == 1 and all(has_grad):
            runs[0][1] = group.numel  # the trailing gap too: one aligned launch over the whole buffer
        return runs

    def update(self, group, grad, has_grad, *, lr, options, clip_coef):
        steps = [s + 1 if h else s for s, h in zip(self.param_steps[group.index], has_grad)]
        runs = self._runs(group, has_grad, steps)
        for start, end, views in self.store.stream(group.index):
            for run_start, run_end, step in runs:
                lo, hi = max(start, run_start), min(end, run_end)
                if lo >= hi:
                    continue
                local = slice(lo - start, hi - start)
                self.family.update(group.flat[lo:hi], grad[lo:hi], {k: views[k][local] for k in self.state_names},
                                   step=step, lr=lr, options=options,
                                   decay_end=min(max(group.decay_end - lo, 0), hi - lo),
                                   master=views["master"][local] if self.master_weights else None,
                                   clip_coef=clip_coef)
        self.param_steps[group.index] = steps

    def group_state(self, group):
        steps = self.param_steps[group.index]
        if not any(steps):
            return [None] * len(group.params)
        fields = self.store.read(group.index)
        entries: List[ParamState] = []
        for (_, p, off, n), step in zip(group.slices(), steps):
            entry: Dict[str, object] = {}
            if step and self.family.has_step:
                entry["step"] = torch.tensor(float(step))
            if step:
                entry.update({name: buf[off:off + n].view(p.shape) for name, buf in fields.items()})
            # Never updated: no state, as in torch; plain SGD in fp32 keeps nothing either.
            entries.append(entry or None)
        return entries

    def check_group_state(self, group, entries):
        super().check_group_state(group, entries)
        required = list(self.state_names) + (["step"] if self.family.has_step else [])
        for (name, _), entry in zip(group.params, entries):
            missing = [key for key in required if entry is not None and key not in entry]
            if missing:
                raise ValueError(f"state of parameter '{name}' has no {missing} (optim={self.family.name!r})")

    def load_group_state(self, group, entries):
        values = self._initial(group, self.wrap_options)
        steps = []
        for (name, p, off, n), entry in zip(group.slices(), entries):
            if entry is None:
                steps.append(0)  # never updated: initial state
                continue
            for key, buf in values.items():
                if key in entry:  # a checkpoint without masters (e.g. torch's AdamW) keeps the weights' value
                    buf[off:off + n].copy_(torch.as_tensor(entry[key]).reshape(-1))
            # SGD keeps no step: a momentum buffer means at least one update.
            steps.append(int(float(entry["step"])) if "step" in entry else 1)
        self.param_steps[group.index] = steps
        self.store.write(group.index, values)


class TorchClassUpdater(Updater):
    """One `torch_class` instance per group. Its state tensors (those shaped like its parameters)
    and the fp32 masters live in the store: while the group is active they are views of the device
    slot, otherwise of the group's host buffer; the optimizer's scalars (e.g. "step") stay where
    it keeps them. A group's fields are defined at wrap (masters) and again after its first step,
    when the optimizer has created its state. This path keeps whole-group residency."""

    def __init__(self, groups, store, torch_class: type, options: dict, master_weights: bool, split_decay: bool,
                 optim_name: str, lr: float, active: int):
        super().__init__(groups, store)
        self.master_weights = master_weights
        self.inner: List[torch.optim.Optimizer] = []
        self.params: List[List[nn.Parameter]] = []  # per group, one per range
        self.ranges: List[List[Tuple[int, int]]] = []
        self.no_decay_group: List[Optional[int]] = []
        for group in groups:
            ranges = [(0, group.decay_end), (group.decay_end, group.numel)] if split_decay else [(0, group.numel)]
            ranges = [r for r in ranges if r[1] > r[0]]
            params = [nn.Parameter(group.flat[lo:hi].float() if master_weights else group.flat[lo:hi])
                      for lo, hi in ranges]
            try:
                inner = torch_class([{"params": [p]} for p in params], lr=lr, **options)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"optim={optim_name}: {exc}") from exc
            nd = None
            if split_decay and group.decay_end < group.numel:
                if "weight_decay" not in inner.defaults:
                    raise ValueError(f"no_decay needs an optimizer with a weight_decay option; {optim_name} has none")
                nd = len(ranges) - 1
                inner.param_groups[nd]["weight_decay"] = 0.0
            self.inner.append(inner)
            self.params.append(params)
            self.ranges.append(ranges)
            self.no_decay_group.append(nd)
        for group in groups:
            self._redefine(group.index)
        if store.offloaded:
            store.start(active)
        for group in groups:
            self._bind(group.index)

    # -- residency ---------------------------------------------------------------------------
    def _tensors(self, g: int) -> Dict[str, torch.Tensor]:
        """The group's tensors that belong in the store, by field name: "master.i" for range i's
        fp32 master, "i.key" for each state tensor of range i shaped like its parameter."""
        out: Dict[str, torch.Tensor] = {}
        if self.master_weights:
            out.update({f"master.{i}": p.data for i, p in enumerate(self.params[g])})
        for i, p in enumerate(self.params[g]):
            for key, value in self.inner[g].state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.dim() > 0:
                    out[f"{i}.{key}"] = value
        return out

    def _redefine(self, g: int) -> None:
        """(Re)define the group's fields from the tensors its optimizer holds now."""
        tensors = self._tensors(g)
        self.store.define(g, [Field(name, t.dtype, t.numel()) for name, t in tensors.items()], tensors)

    def _bind(self, g: int) -> None:
        """Point the group's optimizer at its fields: device views while it is active (or always,
        without offload), host views otherwise."""
        on_device = not self.store.offloaded or g == self.store.resident
        views = self.store.views(g) if on_device else self.store.host_views(g)
        for name, view in views.items():
            head, _, tail = name.partition(".")
            if head == "master":
                p = self.params[g][int(tail)]
                p.data = view.view(p.shape)
            else:
                p = self.params[g][int(head)]
                self.inner[g].state[p][tail] = view.view(p.shape)

    def switch(self, g, h):
        super().switch(g, h)
        if self.store.offloaded:
            self._bind(g)
            self._bind(h)

    # -- the step ----------------------------------------------------------------------------
    def update(self, group, grad, has_grad, *, lr, options, clip_coef):
        g = group.index
        if self.store.offloaded:
            self.store.make_ready(g)
        if clip_coef is not None:
            grad.mul_(clip_coef)  # the flat gradient is dropped after this step anyway
        inner = self.inner[g]
        updated = [off for (_, _, off, _), h in zip(group.slices(), has_grad) if h]
        for p, (lo, hi) in zip(self.params[g], self.ranges[g]):
            # The optimizer sees one tensor per range: it skips a range without any gradient;
            # within a range, parameters without one take part with a zero gradient.
            if not any(lo <= off < hi for off in updated):
                p.grad = None
                continue
            p.grad = grad[lo:hi].float() if self.master_weights else grad[lo:hi]
        for i, pg in enumerate(inner.param_groups):
            pg["lr"] = lr
            for key, value in options.items():
                if key in pg and not (key == "weight_decay" and i == self.no_decay_group[g]):
                    pg[key] = value
        inner.step()
        self._keep_in_store(g)
        for p, (lo, hi) in zip(self.params[g], self.ranges[g]):
            if self.master_weights and p.grad is not None:
                group.flat[lo:hi].copy_(p.data)
            p.grad = None

    def _keep_in_store(self, g: int) -> None:
        """After a step: state the optimizer created moves into the store (the group's fields are
        redefined); state it replaced rather than updated in place is copied back into its field."""
        tensors = self._tensors(g)
        if [(n, t.dtype, t.numel()) for n, t in tensors.items()] != \
                [(f.name, f.dtype, f.numel) for f in self.store.fields(g)]:
            self._redefine(g)
        else:
            for name, view in self.store.views(g).items():
                if tensors[name].data_ptr() != view.data_ptr():
                    view.copy_(tensors[name].reshape(-1))
        self._bind(g)

    # -- checkpoints -------------------------------------------------------------------------
    def group_state(self, group):
        g = group.index
        fields = self.store.read(g)
        entries: List[ParamState] = []
        for _, p, off, n in group.slices():
            i, (lo, _) = next((i, r) for i, r in enumerate(self.ranges[g]) if r[0] <= off < r[1])
            inner_state = self.inner[g].state.get(self.params[g][i], {})
            if not inner_state:
                entries.append(None)
                continue
            entry: Dict[str, object] = {}
            for key, value in inner_state.items():
                field = fields.get(f"{i}.{key}")
                if field is not None:
                    entry[key] = field[off - lo:off - lo + n].view(p.shape)
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
            if self.master_weights:
                entry["master"] = fields[f"master.{i}"][off - lo:off - lo + n].view(p.shape)
            entries.append(entry)
        return entries

    def load_group_state(self, group, entries):
        g = group.index
        ranges = self.ranges[g]
        states: List[Dict[str, object]] = [{} for _ in ranges]
        masters = [group.flat[lo:hi].float() for lo, hi in ranges]
        for (_, q, off, n), entry in zip(group.slices(), entries):
            if entry is None:
                continue
            i = next(i for i, (lo, hi) in enumerate(ranges) if lo <= off < hi)
            lo, hi = ranges[i]
            for key, value in entry.items():
                if key == "master":
                    masters[i][off - lo:off - lo + n].copy_(torch.as_tensor(value).reshape(-1))
                elif torch.is_tensor(value) and value.dim() > 0 and value.shape == q.shape:
                    full = states[i].setdefault(key, torch.zeros(hi - lo, dtype=value.dtype, device=group.flat.device))
                    full[off - lo:off - lo + n].copy_(value.reshape(-1))
                else:  # a scalar of the range ("step", ...): the same in each of its parameters
                    states[i].setdefault(key, value.clone() if torch.is_tensor(value) else value)
        for p, master, state in zip(self.params[g], masters, states):
            if self.master_weights:
                p.data = master
            self.inner[g].state.pop(p, None)
            if state:
                self.inner[g].state[p] = state
        self._redefine(g)
        self._bind(g)
