"""The two ways a group is updated, behind one contract (Updater).

FusedUpdater: hift_rt's own kernels (a hift_rt.families Family) over the group's flat buffers.
TorchClassUpdater: any torch.optim.Optimizer subclass, one instance per group over the group's flat
tensor (split in two parameters when some elements get no weight decay; fp32 master copies for
bf16/fp16 models).

Both keep every group's state in a StateStore, so prefetch, eviction, exposed-wait timing and
checkpoints work the same on both paths. Owns the updaters; may call hift_rt.state_store,
hift_rt.families (through the Family it is given), hift_rt.flat (FlatGroup) and hift_rt.kernels'
int8 code (to read a saved int8 moment) only.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .families import SIGNED, Family, slice_state
from .flat import FlatGroup, aligned
from .kernels import Q, dequantize
from .state_store import StateStore, StoredField

ParamState = Optional[Dict[str, object]]  # torch's per-parameter state entry, None if it has none

# State torch's optimizers keep that is >= 0 by construction (running sums and averages of squares
# or magnitudes): a negative value in a checkpoint means the checkpoint is corrupt.
NONNEGATIVE_STATE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "exp_inf"})


# The largest per-parameter step count a state may hold: every integer up to it is exact in the
# float64 a count is read through (torch keeps "step" as a float32 tensor, exact to 2**24).
MAX_STEP = 2 ** 53


def _check_step(value, what: str) -> None:
    """ValueError unless `value` is a step count: a whole number in [0, MAX_STEP], as a Python
    number or a one-element tensor."""
    if torch.is_tensor(value):
        number = float(value.reshape(-1)[0]) if value.numel() == 1 else math.nan
    else:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not 0 <= number <= MAX_STEP or number != int(number):
        shown = f"a tensor of {value.numel()} elements" if torch.is_tensor(value) and value.numel() != 1 else repr(value)
        raise ValueError(f"{what} is {shown}, not a whole count of updates in [0, 2**53]")


def updates_of(entry: Optional[dict]) -> int:
    """Updates a parameter had, from its torch state entry (None or empty: none; SGD keeps no
    step: a momentum buffer means at least one)."""
    if not entry:
        return 0
    return int(float(entry["step"])) if "step" in entry else 1


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
        """Raise ValueError, naming the parameter and the field, for entries that cannot be a
        valid state of the group: not a dict of named fields, a tensor without data (meta) or of
        another layout (sparse), a non-number dtype, a tensor of another size, non-finite
        values, a negative running sum of squares, a step count that is not a whole number in
        [0, MAX_STEP]. Called before anything is loaded; any device is fine (values are copied)."""
        for (name, p), entry in zip(group.params, entries):
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"state of parameter '{name}' is a {type(entry).__name__}, not a dict")
            for key, value in entry.items():
                if not isinstance(key, str):
                    raise ValueError(f"state of parameter '{name}' has a field named {key!r} ({type(key).__name__}); "
                                     "fields are named by strings")
                what = f"state '{key}' of parameter '{name}'"
                if torch.is_tensor(value):
                    if value.is_meta or value.layout != torch.strided:
                        raise ValueError(f"{what} is a {'meta' if value.is_meta else str(value.layout)} tensor, "
                                         "not one holding values")
                    if value.dtype == torch.bool or value.is_complex():
                        raise ValueError(f"{what} has dtype {value.dtype}, not a real number type")
                if key == "step":
                    _check_step(value, what)
                    continue
                if not torch.is_tensor(value) or value.dim() == 0 and p.dim() > 0:
                    continue  # an optimizer's scalar (e.g. NAdam's mu_product)
                if key.endswith("_absmax"):  # one per quantization block: a maximum of magnitudes
                    if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                        raise ValueError(f"{what} is negative or non-finite: the checkpoint is corrupt")
                    continue
                if value.numel() != p.numel():
                    raise ValueError(f"{what} has {value.numel()} elements, the parameter {p.numel()}")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{what} has non-finite values: the checkpoint is corrupt")
                if key in NONNEGATIVE_STATE and bool((value < 0).any()):
                    raise ValueError(f"{what} has negative values (min {float(value.min()):.3g}), impossible for "
                                     f"'{key}': the checkpoint is corrupt")

    def memory(self) -> dict:
        return {"state_device": self.store.device_bytes(), "state_host": self.store.host_bytes()}

    def exposed_wait_seconds(self) -> float:
        return self.store.exposed_wait_seconds()

    def close(self) -> None:
        self.store.close()


class FusedUpdater(Updater):
    """Each group's state: the family's fields in the chosen format (moments as fp32, bf16, or int8
    codes with a per-block absmax) and, for bf16/fp16 parameters, an fp32 "master" or a Kahan
    "compensation" (hift_rt.families.Family.fields); one launch per run of parameters per chunk.

    Under data parallelism (`comm`) this rank keeps and updates only its shard [lo, hi) of each
    group (`shards`): update() takes the shard's gradient (hi - lo,), and the optimizer gathers
    the updated weights; group_state() gathers the full state on rank 0."""

    def __init__(self, groups, store, family: Family, options: dict, state_dtype: str, master: Optional[str],
                 active: int, window_bytes: Optional[int] = None, comm=None):
        super().__init__(groups, store)
        self.family = family
        self.wrap_options = options  # the initial state depends on them (Adagrad's accumulator)
        self.fields = family.fields(options, state_dtype, master, groups[0].flat.dtype)
        self.comm = comm
        self.shards = [comm.shard(group.numel) if comm else (0, group.numel) for group in groups]
        # Updates each parameter has had (torch's per-parameter "step"): they differ within a
        # group only when some parameters went without a gradient on some steps.
        self.param_steps = [[0] * len(group.params) for group in groups]
        for group, (lo, hi) in zip(groups, self.shards):
            stored = [StoredField(f.name, f.dtype, (hi - lo) // f.per, f.per) for f in self.fields]
            store.define(group.index, stored, self._initial(group, lo, hi), elements=hi - lo)
        if store.offloaded:
            store.start(active, window_bytes)

    def _initial(self, group: FlatGroup, lo: int, hi: int) -> Dict[str, torch.Tensor]:
        """Elements [lo, hi) of the group's state before the first update, in the format of
        self.fields: zero moments (Adagrad: its initial accumulator), the master the fp32 value
        of the weights. Built in host memory when the state lives there: wrap then needs no
        device memory beyond the weights for it (a Llama-3-8B embedding group's fp32 state alone
        is 6.3 GB)."""
        weights = group.flat[lo:hi]
        if self.store.offloaded:
            weights = weights.cpu()
        fp32 = self.family.initial_state(hi - lo, weights.device, self.wrap_options)
        return self.family.to_format(fp32, self.fields, weights)

    @staticmethod
    def _runs(group: FlatGroup, has_grad: List[bool], steps: List[int]) -> List[List[int]]:
        """[start, end, step] element ranges to update: runs of consecutive parameters that have a
        gradient and the same step count, each parameter with the zero alignment gap after it (so
        every range holds whole quantization blocks; zeros stay zero). The usual case is one run
        over the whole buffer."""
        runs: List[List[int]] = []
        for i, (_, _, off, n) in enumerate(group.slices()):
            if not has_grad[i]:
                continue
            if runs and has_grad[i - 1] and steps[i - 1] == steps[i]:  # parameter i - 1 ends the last run
                runs[-1][1] = aligned(off + n)
            else:
                runs.append([off, aligned(off + n), steps[i]])
        return runs

    def update(self, group, grad, has_grad, *, lr, options, clip_coef):
        """grad: this rank's shard of the group's gradient, (hi - lo,)."""
        steps = [s + 1 if h else s for s, h in zip(self.param_steps[group.index], has_grad)]
        runs = self._runs(group, has_grad, steps)
        shard_lo, _ = self.shards[group.index]
        for start, end, views in self.store.stream(group.index):  # shard coordinates
            for run_start, run_end, step in runs:  # group coordinates
                lo, hi = max(shard_lo + start, run_start), min(shard_lo + end, run_end)
                if lo < hi:
                    self.family.update(group.flat[lo:hi], grad[lo - shard_lo:hi - shard_lo],
                                       slice_state(views, self.fields, lo - shard_lo - start, hi - shard_lo - start),
                                       step=step, lr=lr, options=options,
                                       decay_end=min(max(group.decay_end - lo, 0), hi - lo), clip_coef=clip_coef)
        self.param_steps[group.index] = steps

    # -- checkpoints -------------------------------------------------------------------------
    # A parameter's entry holds its slice of every field: per-element fields shaped like the
    # parameter (exp_avg, ..., master or compensation), an int8 moment's "<name>_absmax" as its
    # ceil(numel / Q) blocks (a parameter owns whole blocks: see hift_rt.flat.PARAM_ALIGN).
    def group_state(self, group):
        steps = self.param_steps[group.index]
        if not any(steps):
            return [None] * len(group.params)
        fields = self.store.read(group.index)
        if self.comm is not None:  # a collective: rank 0 gets every shard, the others nothing
            fields = {name: self.comm.gather_to_first(value) for name, value in fields.items()}
            if self.comm.rank != 0:
                return [None] * len(group.params)
        entries: List[ParamState] = []
        for (_, p, off, n), step in zip(group.slices(), steps):
            if not step:
                entries.append(None)  # never updated: no state, as in torch
                continue
            entry: Dict[str, object] = {"step": torch.tensor(float(step))} if self.family.has_step else {}
            for f in self.fields:
                part = fields[f.name][off // f.per:-(-(off + n) // f.per)]
                entry[f.name] = part.view(p.shape) if f.per == 1 else part
            entries.append(entry or None)  # plain SGD in fp32 keeps nothing, as in torch
        return entries

    def check_group_state(self, group, entries):
        """Beyond the common checks, each field against the formats this family reads: the
        moments it keeps (fp32, bf16, the parameter's dtype as torch keeps it, or uint8 codes with
        their "<name>_absmax" fp32 blocks), "step" where torch keeps one, an fp32 "master" or a
        "compensation" in the parameter's dtype; shaped like the parameter (absmax: one per
        block). Anything else names the parameter and the field."""
        super().check_group_state(group, entries)
        moments = self.family.state_names(self.wrap_options)
        for (name, p), entry in zip(group.params, entries):
            if entry is None:
                continue
            float_dtypes = {torch.float32, torch.bfloat16, p.dtype}
            known = {*moments, *(m + "_absmax" for m in moments), "master", "compensation"}
            if self.family.has_step:
                known.add("step")
            unknown = sorted(set(entry) - known)
            if unknown:
                raise ValueError(f"state of parameter '{name}' has field(s) {unknown} that optim={self.family.name!r} "
                                 f"does not keep (it keeps {sorted(known)})")
            missing = [key for key in moments if key not in entry]
            if self.family.has_step and "step" not in entry:
                missing.append("step")
            if missing:
                raise ValueError(f"state of parameter '{name}' has no {missing} (optim={self.family.name!r})")
            for key, value in entry.items():
                what = f"state '{key}' of parameter '{name}'"
                if key == "step":
                    continue
                if not torch.is_tensor(value):
                    raise ValueError(f"{what} is a {type(value).__name__}, not a tensor")
                if key.endswith("_absmax"):
                    moment = key[:-len("_absmax")]
                    if value.dtype != torch.float32 or value.dim() != 1 or value.numel() != -(-p.numel() // Q):
                        raise ValueError(f"{what} is {tuple(value.shape)} {value.dtype}; an int8 moment's scales "
                                         f"are ({-(-p.numel() // Q)},) torch.float32, one per block of {Q}")
                    if entry[moment].dtype != torch.uint8:
                        raise ValueError(f"{what} belongs to int8 codes, but '{moment}' is {entry[moment].dtype}")
                    continue
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")
                expected = {"master": {torch.float32}, "compensation": {p.dtype}}.get(
                    key, float_dtypes | {torch.uint8})
                if value.dtype not in expected:
                    raise ValueError(f"{what} has dtype {value.dtype}; expected one of "
                                     f"{sorted(str(d) for d in expected)}")
                if value.dtype == torch.uint8 and key + "_absmax" not in entry:
                    raise ValueError(f"state of parameter '{name}' has int8 codes '{key}' without '{key}_absmax'")

    def load_group_state(self, group, entries):
        """Entries in this optimizer's format are copied as they are (a resume is bit-exact);
        moments in another format (fp32, bf16 or int8) are converted, and a master is taken from
        "master", from "compensation" (+ the weights), or from the weights. Under data
        parallelism each rank takes its shard of the (full) state."""
        values = self._initial(group, 0, group.numel)
        steps = []
        for (_, p, off, n), entry in zip(group.slices(), entries):
            if entry is None:
                steps.append(0)  # never updated: initial state
                continue
            span = aligned(off + n) - off  # the parameter and its gap: whole int8 blocks
            target = slice_state(values, self.fields, off, off + span)
            weights = group.flat[off:off + span]
            for f in self.fields:
                if f.per > 1:
                    continue  # an absmax goes with its moment
                if f.name in ("master", "compensation"):
                    fp32 = {"master": _padded(self._master_of(entry, weights[:n]), span)}
                else:
                    saved = torch.as_tensor(entry[f.name])
                    if saved.dtype == f.dtype:  # the same format: exact
                        target[f.name][:n].copy_(saved.reshape(-1))
                        if f.dtype == torch.uint8:
                            blocks = torch.as_tensor(entry[f.name + "_absmax"]).reshape(-1)
                            target[f.name + "_absmax"][:blocks.numel()].copy_(blocks)
                        continue
                    fp32 = {f.name: _padded(self._moment_of(entry, f.name), span)}
                own = [g for g in self.fields if g.name in (f.name, f.name + "_absmax")]
                converted = self.family.to_format(fp32, own, weights)
                for name, value in converted.items():
                    target[name].copy_(value)
            steps.append(updates_of(entry))
        self.param_steps[group.index] = steps
        self.store.write(group.index, slice_state(values, self.fields, *self.shards[group.index]))

    @staticmethod
    def _moment_of(entry: dict, name: str) -> torch.Tensor:
        """A saved moment's fp32 values, (numel,), whatever its format."""
        saved = torch.as_tensor(entry[name]).reshape(-1)
        if saved.dtype != torch.uint8:
            return saved.float()
        absmax = torch.as_tensor(entry[name + "_absmax"]).reshape(-1).float()
        blocks = absmax.numel() * Q
        return dequantize(_padded(saved, blocks), absmax, SIGNED[name])[:saved.numel()]

    @staticmethod
    def _master_of(entry: dict, weights: torch.Tensor) -> torch.Tensor:
        """The fp32 master a saved entry implies: its master, the weights + its compensation, or
        the weights (a checkpoint without either, e.g. torch's AdamW)."""
        if "master" in entry:
            return torch.as_tensor(entry["master"]).reshape(-1).float()
        master = weights.float()
        if "compensation" in entry:
            master = master + torch.as_tensor(entry["compensation"]).reshape(-1).to(master.device).float()
        return master


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    """values (numel <= length,) followed by zeros up to length."""
    out = torch.zeros(length, dtype=values.dtype, device=values.device)
    out[:values.numel()] = values
    return out


class TorchClassUpdater(Updater):
    """One `torch_class` instance per group. Its state tensors (those shaped like its parameters)
    and the fp32 masters live in the store: while the group is active they are views of the device
    slot, otherwise of the group's host buffer; the optimizer's scalars (e.g. "step") stay where
    it keeps them. A group's fields are defined at wrap (masters) and again after its first step,
    when the optimizer has created its state. This path keeps whole-group residency."""

    def __init__(self, groups, store, torch_class: type, options: dict, master_weights: bool, split_decay: bool,
                 optim_name: str, lr: float, active: int):
        super().__init__(groups, store)
        self.master_weights = master_weights  # fp32 copies
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
        self.store.define(g, [StoredField(name, t.dtype, t.numel()) for name, t in tensors.items()], tensors)

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
        masters = [group.flat[lo:hi].float() for lo, hi in ranges] if self.master_weights else None
        for (_, q, off, n), entry in zip(group.slices(), entries):
            if entry is None:
                continue
            i = next(i for i, (lo, hi) in enumerate(ranges) if lo <= off < hi)
            lo, hi = ranges[i]
            for key, value in entry.items():
                if key == "master":
                    if masters is not None:  # a saved master of a model that now runs without one
                        masters[i][off - lo:off - lo + n].copy_(torch.as_tensor(value).reshape(-1))
                elif torch.is_tensor(value) and value.dim() > 0 and value.shape == q.shape:
                    full = states[i].setdefault(key, torch.zeros(hi - lo, dtype=value.dtype, device=group.flat.device))
                    full[off - lo:off - lo + n].copy_(value.reshape(-1))
                else:  # a scalar of the range ("step", ...): the same in each of its parameters
                    states[i].setdefault(key, value.clone() if torch.is_tensor(value) else value)
        for i, (p, state) in enumerate(zip(self.params[g], states)):
            if masters is not None:
                p.data = masters[i]
            self.inner[g].state.pop(p, None)
            if state:
                self.inner[g].state[p] = state
        self._redefine(g)
        self._bind(g)
