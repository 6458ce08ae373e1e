"""HiFT over FSDP2 (`torch.distributed.fsdp.fully_shard`): models whose weights do not fit one GPU.

FSDP2 shards every parameter on dim 0 over the R ranks of its mesh (a DTensor whose local tensor
holds this rank's rows, `torch.chunk`'s split), all-gathers a module's parameters before its
forward and backward and frees them after, and reduce-scatters the gradients of the parameters
that require one into the sharded parameters' `.grad` (DTensors; the mean over ranks). hift_rt
adds HiFT on top, through FSDP2's public behaviour, and never touches FSDP2's buffers:

- Only the active group's parameters require grad (set on the sharded parameters; FSDP2 copies
  the flag to the unsharded ones at each all-gather), so FSDP2 reduce-scatters only the active
  group's gradients, and backward stops below the active group (its modules are not gathered
  again, except the one FSDP2 prefetches).
- Each rank keeps optimizer state (and master weights) for its local shards only, in the state
  store as on one GPU: the active group's on the device (a slot or the window), the others in
  host memory; every format (fp32, bf16, int8; fp32 master, Kahan) as on one GPU.
- step() updates the local shards in place with the fused kernels, unchanged. Clipping takes the
  norm over every shard (each rank's sum of squared local norms, all-reduced: one scalar on the
  device). A GradScaler's found_inf must be the same on every rank (torch.amp.GradScaler's is: it
  checks DTensor gradients over the mesh), or the ranks' loss scales would drift apart: step()
  checks that with one all-reduce and raises on every rank otherwise; every rank skips a step
  with inf/NaN gradients, or none.

Local layout. A group's state is one flat buffer per field over the group's *local layout*: its
parameters (decayed ones first), each one's local shard (n_i elements) starting at a multiple of
hift_rt.flat.PARAM_ALIGN, as hift_rt.flat lays out a whole group on one GPU. The weights and
gradients stay where FSDP2 keeps them: every sharded parameter is its own allocation, and the
gradients of a module view its reduce-scatter output. Re-homing them into one flat buffer, as on
one GPU, would replace FSDP2's storage behind its back, so the update launches once per parameter
and state chunk over the parameter's local shard and its slice of the state: 9 launches for a
Llama block instead of 1 (per chunk of the window), tens of microseconds of host time each,
against an update that moves about 30 B for each of a 70B layer's 107 M local elements (8 ranks;
about 1 ms at 3 TB/s), queued without a host sync. An int8
state needs whole blocks of 128 elements: a local shard whose length is not a multiple of 128
(odd or tiny shapes; no weight of a 70B model) updates its last, partial block through a
one-block scratch copy; the elements past the shard are zero in weight and gradient and keep a
zero state, as the alignment gaps of a flat buffer do.

What of FSDP2 is used: the sharded parameters (DTensors: `_local_tensor` is this rank's shard,
updated in place as torch.optim updates DTensors), their `.grad`, `requires_grad`, and, read at
wrap, which fully_shard unit and FSDP parameter group holds each parameter
(FSDPModule._get_fsdp_state()). One private method is called: FSDP2 computes each module's reduce
dtype (MixedPrecisionPolicy) from the parameters that require grad when it initializes lazily,
so a module frozen then would later reduce in the compute dtype and fail to assign the gradient;
each time a group becomes active (or frozen) hift_rt has FSDP2 recompute it for the modules
holding the group (FSDPParamGroup._init_mp_dtypes; only for modules with a MixedPrecisionPolicy).

Checkpoints.
- `state_dict()` / `load_state_dict()`: the single-GPU layout (full tensors per parameter), a
  collective: rank 0's holds everything, gathered over the host (gloo) group; any number of
  ranks, or one process, loads it. For small models.
- `sharded_state_dict()` for `torch.distributed.checkpoint.save` and
  `load_sharded_state_dict(checkpoint_id)`: every field of every parameter as a DTensor placed
  like the parameter, so the checkpoint loads at any world size (DCP reshards it). Exact at any
  world size for fp32 and bf16 state, masters and compensations, and for int8 moments of
  parameters whose rows hold a multiple of 128 elements (their blocks never cross a row, so the
  per-block scales are a (rows, cols / 128) DTensor sharded like the rows); the int8 moments of
  other parameters (norm weights, biases, odd shapes) are saved as their fp32 values and
  re-quantized on load: exact on the same world size, re-blocked on another.

Memory per rank (see `memory_breakdown`): FSDP2's sharded weights N b / R, its all-gathered
modules, the active group's sharded gradient and its transient unsharded gradient, plus
hift_rt's state window on the device and S N / R in host memory.

Owns FSDPHiFTOptimizer, ShardedGroup, ShardedGradients, ShardedUpdater and the memory planner
(memory_breakdown). May call hift_rt.optimizer (it builds on HiFTOptimizer), hift_rt.wrappers, hift_rt.updaters, hift_rt.state_store,
hift_rt.families, hift_rt.grouping, hift_rt.flat, hift_rt.distributed, hift_rt.config,
hift_rt.kernels, and torch.distributed (fsdp, tensor, checkpoint).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, grouping
from .config import HiFTConfig
from .families import SIGNED, slice_state
from .flat import PARAM_ALIGN, FlatGroup, aligned
from .kernels import Q, dequantize, grad_norm
from .optimizer import STATE_DICT_VERSION, HiFTOptimizer, check_steps_within
from .state_store import StoredField, blob_nbytes, plan_device, StateStore
from .updaters import FusedUpdater, ParamState, Updater
from .wrappers import is_fully_sharded

SHARDED_VERSION = 1


if dist.is_available():
    from torch.distributed.tensor import DTensor, Shard
else:  # a torch built without distributed: nothing can be sharded
    DTensor = Shard = None


# ---- FSDP2's modules and parameters --------------------------------------------------------------

class _Unit(NamedTuple):
    """One fully_shard call: its FSDP parameter groups and whether it is the root (the model)."""
    param_groups: list
    root: bool


class _FSDPIndex:
    """FSDP2's bookkeeping of a model, read once at wrap: for each sharded parameter (by id) its
    unit and FSDP parameter group."""

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        self.units: List[_Unit] = []
        self.unit_of: Dict[int, int] = {}
        self.param_group_of: Dict[int, object] = {}
        seen = set()
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = module._get_fsdp_state()
            if id(state) in seen:  # fully_shard([a, b]): one state for several modules
                continue
            seen.add(id(state))
            groups = list(state._fsdp_param_groups)
            for param_group in groups:
                for fsdp_param in param_group.fsdp_params:
                    self.unit_of[id(fsdp_param.sharded_param)] = len(self.units)
                    self.param_group_of[id(fsdp_param.sharded_param)] = param_group
            self.units.append(_Unit(groups, module is model))

    def refresh_reduce_dtypes(self, params) -> None:
        """Have FSDP2 recompute the reduce dtype of the modules holding `params` from which of their
        parameters require grad now (see the module docstring)."""
        done = set()
        for p in params:
            param_group = self.param_group_of.get(id(p))
            if param_group is None or id(param_group) in done:
                continue
            done.add(id(param_group))
            policy = param_group.mp_policy
            if policy.param_dtype is not None or policy.reduce_dtype is not None:
                param_group._init_mp_dtypes()


def _check_sharding(index: _FSDPIndex, named: Sequence[Tuple[str, nn.Parameter]]):
    """The device mesh every trainable parameter is sharded over; ValueError for anything hift_rt
    cannot run over FSDP2 (a parameter FSDP2 does not manage, HSDP, tensor parallelism)."""
    mesh = None
    for name, p in named:
        if not isinstance(p, DTensor) or id(p) not in index.unit_of:
            raise ValueError(
                f"parameter '{name}' is not sharded by FSDP2 while others are: apply fully_shard to every "
                "module that holds trainable parameters, i.e. to each block and then to the root (the model), "
                "which takes the rest (embeddings, final norm, head)")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"parameter '{name}' is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; hift_rt "
                "runs over FSDP2 with a 1-D mesh and the default Shard(0) (HSDP, tensor parallelism and "
                "shard_placement_fn are not supported)")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter '{name}' is sharded over another device mesh than the first "
                             "parameter; hift_rt needs one mesh for the whole model")
    return mesh


def _rows(shape: Sequence[int]) -> Tuple[int, int]:
    """(rows of dim 0, elements per row) of a parameter of this shape."""
    rows = shape[0] if len(shape) else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def local_numel(shape: Sequence[int], world: int, rank: int) -> int:
    """Elements of rank `rank`'s shard of a parameter of `shape` under FSDP2's Shard(0) over `world`
    ranks: torch.chunk's rows ceil(rows / world) per rank, the last ranks fewer or none."""
    rows, per_row = _rows(shape)
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk)) * per_row


# ---- a group over local shards -------------------------------------------------------------------

def local_layout(numels: Sequence[int]) -> Tuple[List[int], int]:
    """(offsets, numel) of the local layout: each shard at a multiple of PARAM_ALIGN. A rank whose
    shards of a group are all empty (a parameter with fewer rows than ranks) still gets
    PARAM_ALIGN elements: the state store keeps no empty fields."""
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end = aligned(end + n)
    return offsets, max(end, PARAM_ALIGN)


def _decayed_first(named, no_decay):
    decayed = [(n, p) for n, p in named if no_decay is None or not no_decay(n)]
    return decayed, decayed + [(n, p) for n, p in named if no_decay is not None and no_decay(n)]


@dataclass
class ShardedGroup:
    """One group over FSDP2's sharded parameters: this rank's local shards, laid out for the state
    as a flat buffer would hold them (see the module docstring); weights and gradients stay
    FSDP2's.

    params: (name, sharded parameter), decayed ones first. offsets[i], local_numels[i]: where
    params[i]'s local shard sits in the layout and its elements. numel: the layout's elements;
    [0, decay_end) get weight decay.
    """
    index: int
    name: str
    params: List[Tuple[str, nn.Parameter]]
    offsets: List[int]
    local_numels: List[int]
    numel: int
    decay_end: int
    notes: List[str]
    _owners: List[Tuple[nn.Module, str]]

    @classmethod
    def build(cls, model: nn.Module, group: grouping.Group, no_decay) -> "ShardedGroup":
        decayed, params = _decayed_first(group.params, no_decay)
        numels = [p._local_tensor.numel() for _, p in params]
        offsets, numel = local_layout(numels)
        decay_end = offsets[len(decayed)] if len(decayed) < len(params) else numel
        owners = []
        for name, _ in params:
            module_name, _, key = name.rpartition(".")
            owners.append((model.get_submodule(module_name), key))
        return cls(group.index, group.name, params, offsets, numels, numel, decay_end, list(group.notes), owners)

    def slices(self):
        """(name, sharded parameter, offset, local elements) per parameter, in layout order."""
        return [(name, p, off, n) for (name, p), off, n in zip(self.params, self.offsets, self.local_numels)]

    def local_shards(self) -> List[torch.Tensor]:
        """Each parameter's local shard as a (n_i,) view of FSDP2's storage (updates write it)."""
        return [p._local_tensor.view(-1) for _, p in self.params]

    def local_flat(self) -> FlatGroup:
        """The group's local shards as a FlatGroup over a copy in the local layout (what the flat
        code paths read: initial state, loading a state); writing it changes nothing."""
        flat = torch.zeros(self.numel, dtype=self.params[0][1].dtype, device=self.params[0][1].device)
        for shard, off, n in zip(self.local_shards(), self.offsets, self.local_numels):
            flat[off:off + n].copy_(shard)
        params = [(name, flat[off:off + n]) for (name, _), off, n in zip(self.params, self.offsets, self.local_numels)]
        return FlatGroup(self.index, self.name, params, flat, list(self.offsets), self.decay_end, list(self.notes), [], [])

    def check_not_moved(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise unless every parameter is still the sharded parameter FSDP2 registered at wrap,
        on `device` in `dtype`, with its local shard's size."""
        for (name, p), (module, key), n in zip(self.params, self._owners, self.local_numels):
            held = module._parameters.get(key)
            if held is not p:
                raise RuntimeError(
                    f"parameter '{name}' is not the sharded parameter hift_rt.wrap saw: its module holds "
                    "FSDP2's unsharded parameter (step() runs after backward; after a forward without backward "
                    "call reshard() on the module) or the model replaced it (load_state_dict(assign=True), a "
                    "move or a cast after wrap: wrap again)")
            if p.device != device or p.dtype != dtype or p._local_tensor.numel() != n:
                raise RuntimeError(f"parameter '{name}' was moved, re-cast or resharded after hift_rt.wrap (now "
                                   f"{p.device} {p.dtype}, wrapped on {device} {dtype}); wrap again")


class ShardedGradients:
    """The active group's gradients as FSDP2 leaves them: each sharded parameter's `.grad`, a
    DTensor whose local tensor is this rank's share of the mean over ranks. Same interface as
    hift_rt.gradients.GradientBuffer, which HiFTOptimizer drives; the memory is FSDP2's."""

    nbytes = 0

    def __init__(self, index: _FSDPIndex):
        self.index = index

    def attach(self, params) -> None:
        """Nothing to hook: FSDP2 assigns the gradients."""

    def detach(self) -> None:
        """Nothing to unhook."""

    def activate(self, group: ShardedGroup) -> None:
        for _, p in group.params:
            p.grad = None
            p.requires_grad_(True)
        self.index.refresh_reduce_dtypes(p for _, p in group.params)

    def deactivate(self, group: ShardedGroup) -> None:
        for _, p in group.params:
            p.requires_grad_(False)
            p.grad = None
        self.index.refresh_reduce_dtypes(p for _, p in group.params)

    def zero(self, group: ShardedGroup) -> None:
        for _, p in group.params:
            p.grad = None

    def collect(self, group: ShardedGroup) -> Tuple[List[Optional[torch.Tensor]], List[bool]]:
        """Each parameter's local gradient (n_i,) (None without one) and whether it has one."""
        grads: List[Optional[torch.Tensor]] = []
        for (name, p), n in zip(group.params, group.local_numels):
            g = p.grad
            if g is None:
                grads.append(None)
                continue
            local = g._local_tensor if isinstance(g, DTensor) else None
            if local is None or local.numel() != n or local.dtype != p.dtype or local.device != p.device:
                raise RuntimeError(
                    f"parameter '{name}' has a gradient that is not FSDP2's reduce-scattered shard of {n} "
                    f"{p.dtype} elements on {p.device} (got {type(g).__name__} {tuple(g.shape)} {g.dtype}); "
                    "leave the gradients to FSDP2 (a MixedPrecisionPolicy's reduce_dtype must be the parameters' "
                    "dtype or None)")
            grads.append(local.reshape(-1))
        return grads, [g is not None for g in grads]


# ---- the update ------------------------------------------------------------------------------

class ShardedUpdater(FusedUpdater):
    """FusedUpdater over local layouts: each rank's state covers its local shards only, and a
    parameter's shard is updated in place, per state chunk, by its own launch (see the module
    docstring). The flat code paths (initial state, loading and converting a state) run on
    ShardedGroup.local_flat()."""

    def __init__(self, groups: List[ShardedGroup], store: StateStore, family, options: dict, state_dtype: str,
                 master: Optional[str], active: int, window_bytes: Optional[int], comm: distributed.Communicator):
        Updater.__init__(self, groups, store)
        self.family = family
        self.wrap_options = options
        self.fields = family.fields(options, state_dtype, master, groups[0].params[0][1].dtype)
        self.comm = comm
        self.shards = [(0, group.numel) for group in groups]  # the whole local layout is this rank's
        self.param_steps = [[0] * len(group.params) for group in groups]
        self.block = Q if any(f.per > 1 for f in self.fields) else 1  # int8: updates cover whole blocks
        for group in groups:
            stored = [StoredField(f.name, f.dtype, group.numel // f.per, f.per) for f in self.fields]
            store.define(group.index, stored, self._initial(group.local_flat(), 0, group.numel), elements=group.numel)
        if store.offloaded:
            store.start(active, window_bytes)

    def update(self, group, grad, has_grad, *, lr, options, clip_coef):
        """grad: each parameter's local gradient (n_i,) or None (see ShardedGradients.collect)."""
        steps = [s + 1 if h else s for s, h in zip(self.param_steps[group.index], has_grad)]
        shards = group.local_shards()
        for start, end, views in self.store.stream(group.index):  # local layout coordinates
            for i, (_, _, off, n) in enumerate(group.slices()):
                lo, hi = max(start, off), min(end, off + n)
                if not has_grad[i] or lo >= hi:
                    continue
                self._update_piece(shards[i][lo - off:hi - off], grad[i][lo - off:hi - off], views, lo - start,
                                   step=steps[i], decayed=off < group.decay_end, lr=lr, options=options,
                                   clip_coef=clip_coef)
        self.param_steps[group.index] = steps

    def _update_piece(self, weight, grad, views, at, *, step, decayed, lr, options, clip_coef) -> None:
        """Update weight (m,) with grad (m,) and the state at [at, at + m) of `views`; an int8
        state's last partial block goes through a one-block scratch copy."""
        m = weight.numel()
        body = m - m % self.block
        common = dict(step=step, lr=lr, options=options, clip_coef=clip_coef)
        if body:
            self.family.update(weight[:body], grad[:body], slice_state(views, self.fields, at, at + body),
                               decay_end=body if decayed else 0, **common)
        if body < m:
            scratch = torch.zeros(2, self.block, dtype=weight.dtype, device=weight.device)
            scratch[0, :m - body] = weight[body:]
            scratch[1, :m - body] = grad[body:]
            self.family.update(scratch[0], scratch[1], slice_state(views, self.fields, at + body, at + body + self.block),
                               decay_end=self.block if decayed else 0, **common)
            weight[body:] = scratch[0, :m - body]

    # -- the full state, gathered to rank 0 ------------------------------------------------------
    def _values(self, group: ShardedGroup) -> Dict[str, torch.Tensor]:
        """The group's per-element fields in its local layout as they are now: int8 moments as
        their fp32 values (their blocks are this rank's), masters and other moments as stored."""
        fields = self.store.read(group.index)
        values = {}
        for f in self.fields:
            if f.per > 1:
                continue
            if f.dtype == torch.uint8:
                values[f.name] = dequantize(fields[f.name], fields[f.name + "_absmax"], SIGNED[f.name])
            else:
                values[f.name] = fields[f.name]
        return values

    def group_state(self, group):
        """A collective: rank 0 gets every updated parameter's state as full tensors shaped like the
        parameter (int8 moments as fp32 values), the other ranks None entries."""
        steps = self.param_steps[group.index]
        if not any(steps):  # the same on every rank: FSDP2 gives every rank the same gradients
            return [None] * len(group.params)
        values = self._values(group)
        entries: List[ParamState] = []
        for (_, p, off, n), step in zip(group.slices(), steps):
            if not step:
                entries.append(None)
                continue
            entry: Dict[str, object] = {"step": torch.tensor(float(step))} if self.family.has_step else {}
            for name, value in values.items():
                full = self._gather(p, value[off:off + n])
                if full is not None:
                    entry[name] = full
            entries.append(entry if self.comm.rank == 0 else None)
        return entries

    def _gather(self, p, local: torch.Tensor) -> Optional[torch.Tensor]:
        """Rank 0: the full tensor shaped like p from every rank's local shard (n_r,), over the host
        group; the others None."""
        rows, per_row = _rows(p.shape)
        chunk = -(-rows // self.comm.world) * per_row
        padded = torch.zeros(chunk, dtype=local.dtype)
        padded[:local.numel()] = local.to("cpu")
        parts = self.comm.gather_to_first(padded)
        if parts is None:
            return None
        pieces = [parts[r * chunk:r * chunk + local_numel(p.shape, self.comm.world, r)] for r in range(self.comm.world)]
        return torch.cat(pieces).view(p.shape)

    def load_group_state(self, group, entries):
        """Full entries (shaped like each parameter, as state_dict() or one process saves them):
        each rank takes its rows; int8 moments are converted to this rank's blocks."""
        local_entries = []
        for (_, p, _, n), entry in zip(group.slices(), entries):
            if entry is None:
                local_entries.append(None)
                continue
            local = {}
            for key, value in entry.items():
                if key.endswith("_absmax"):
                    continue
                if torch.is_tensor(value) and value.dim() > 0:
                    full = self._moment_of(entry, key) if value.dtype == torch.uint8 else torch.as_tensor(value)
                    value = self._local_rows(p, full.reshape(-1), n)
                local[key] = value
            local_entries.append(local)
        self.load_local(group, local_entries)

    def _local_rows(self, p, full: torch.Tensor, n: int) -> torch.Tensor:
        rows, per_row = _rows(p.shape)
        chunk = -(-rows // self.comm.world)
        start = min(rows, self.comm.rank * chunk) * per_row
        return full[start:start + n]

    def load_local(self, group: ShardedGroup, entries: List[ParamState]) -> None:
        """Entries over the local shards ((n_i,) tensors; int8 moments with their local blocks, or
        as values): converted and stored as FusedUpdater does for a flat group."""
        FusedUpdater.load_group_state(self, group.local_flat(), entries)

    def check_local(self, group: ShardedGroup, entries: List[ParamState]) -> None:
        FusedUpdater.check_group_state(self, group.local_flat(), entries)

    # -- the sharded (DCP) state -----------------------------------------------------------------
    def sharded_entries(self, group: ShardedGroup, mesh, template: bool) -> Dict[str, dict]:
        """name -> {"step": 0-d tensor, field: DTensor placed like the parameter on `mesh`, ...}
        for every parameter (step 0: never updated, initial state). template=False: the state as
        it is now (views of host memory where the store keeps it there); True: new tensors to load
        into."""
        fields = None if template else self.store.read(group.index)
        out = {}
        for (name, p, off, n), step in zip(group.slices(), self.param_steps[group.index]):
            shape, global_shape = tuple(p._local_tensor.shape), tuple(p.shape)
            rows, per_row = _rows(global_shape)
            entry = {"step": torch.tensor(0.0 if template else float(step))}
            for f in self.fields:
                if f.per > 1:
                    continue  # an int8 moment's scales go with it
                if f.dtype == torch.uint8 and not _blocks_follow_rows(global_shape):
                    entry[f.name] = _placed(self._int8_values(fields, f.name, off, n, template).view(shape),
                                            global_shape, mesh)
                    continue
                local = torch.empty(n, dtype=f.dtype) if template else fields[f.name][off:off + n]
                entry[f.name] = _placed(local.view(shape), global_shape, mesh)
                if f.dtype == torch.uint8:  # one scale per 128 elements of a row: sharded by rows too
                    absmax = torch.empty(n // Q) if template else fields[f.name + "_absmax"][off // Q:(off + n) // Q]
                    entry[f.name + "_absmax"] = _placed(absmax.view(shape[0], per_row // Q), (rows, per_row // Q), mesh)
            out[name] = entry
        return out

    @staticmethod
    def _int8_values(fields, name, off, n, template) -> torch.Tensor:
        if template:
            return torch.empty(n)
        span = aligned(off + n) - off
        return dequantize(fields[name][off:off + span], fields[name + "_absmax"][off // Q:(off + span) // Q],
                          SIGNED[name])[:n]

    def local_entries(self, group: ShardedGroup, loaded: Dict[str, dict]) -> List[ParamState]:
        """The entries over the local shards of a loaded sharded_entries(template=True); never
        updated parameters (step 0) get None (their initial state)."""
        entries: List[ParamState] = []
        for name, _ in group.params:
            entry = loaded[name]
            step = entry["step"]
            if float(step) == 0:
                entries.append(None)
                continue
            local: Dict[str, object] = {"step": step} if self.family.has_step else {}
            for key, value in entry.items():
                if key != "step":
                    local[key] = value._local_tensor.reshape(-1)
            entries.append(local)
        return entries


def _placed(local: torch.Tensor, global_shape: Tuple[int, ...], mesh) -> "DTensor":
    """`local` (this rank's rows, moved to host memory) as a Shard(0) DTensor of `global_shape` on
    the CPU mesh `mesh`: what torch.distributed.checkpoint saves and reshards."""
    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local.to("cpu"), mesh, (Shard(0),), run_check=False, shape=global_shape, stride=stride)


def _blocks_follow_rows(shape: Sequence[int]) -> bool:
    """Whether a parameter's rows hold a multiple of Q elements, so that an int8 block never
    crosses a row (nor a shard, whatever the world size)."""
    rows, per_row = _rows(shape)
    return len(shape) >= 2 and per_row % Q == 0


# ---- the optimizer ---------------------------------------------------------------------------

class FSDPHiFTOptimizer(HiFTOptimizer):
    """HiFTOptimizer over a model sharded by FSDP2 (see the module docstring). hift_rt.wrap
    returns one when the model's parameters are DTensors.

    Everything the single-GPU optimizer offers works the same (strategies, lr policies, clipping,
    GradScaler, offload, window, compact state, describe_groups, checkpoints); sizes are this
    rank's: describe_groups' `buffer_numel` and `decay_end` are the local layout's.
    """

    def __init__(self, model: nn.Module, config: HiFTConfig):
        self._closed = True  # until fully built (close() and __del__ look at it)
        if config.family is None:
            raise ValueError(f"optim={config.optim_name}: under FSDP2 hift_rt runs its fused optimizers "
                             "('adamw', 'adam', 'adagrad', 'sgd'), not a torch.optim class")
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # after a forward without backward the root holds unsharded parameters
        self._fsdp = _FSDPIndex(model)
        self._mesh = _check_sharding(self._fsdp, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        super().__init__(model, config)
        # torch.distributed.checkpoint's get_optimizer_state_dict "initializes" an optimizer whose
        # .state is empty by a step with zero gradients, which would update and rotate: every
        # parameter is marked as having state (which lives in the store: sharded_state_dict()).
        for group in self.groups:
            for _, p in group.params:
                self.state[p] = {}

    # -- what HiFTOptimizer.__init__ builds --------------------------------------------------------
    def _communicator(self) -> distributed.Communicator:
        group = self._mesh.get_group()
        given = self.config.process_group
        if given is False or given is not None and \
                dist.get_process_group_ranks(given) != dist.get_process_group_ranks(group):
            raise ValueError("process_group: under FSDP2 hift_rt works over the ranks the model is sharded on "
                             "(its device mesh); leave process_group=None or pass that mesh's group")
        return distributed.Communicator(group)

    def _build_groups(self, model: nn.Module, cut) -> List[ShardedGroup]:
        with torch.no_grad():
            return [ShardedGroup.build(model, unit_group, self.config.no_decay) for unit_group in cut]

    def _make_gradients(self) -> None:
        self._gradients = ShardedGradients(self._fsdp)
        self._shard_grad = torch.empty(0, dtype=self.dtype, device=self.device)

    def _make_updater(self) -> Updater:
        store = StateStore(len(self.groups), self.device, self.engine)
        with torch.no_grad():
            return ShardedUpdater(self.groups, store, self.config.family, self.defaults, self.config.state_dtype,
                                  self.master_weights, self._rotation.active, self.config.window_bytes(self.device),
                                  self._comm)

    # -- introspection ------------------------------------------------------------------------------
    def memory_breakdown(self) -> dict:
        """This rank's bytes. FSDP2's buffers as modeled by hift_rt.fsdp.memory_breakdown
        (`weights`, `all_gathered`, `gradients`, `gradients_transient`), and hift_rt's own state
        (`state_device`, `state_host`, exact); the same numbers memory_breakdown(model, shards=R)
        plans for the unsharded model."""
        group_of = {id(p): group.index for group in self.groups for _, p in group.params}
        records = []
        for unit_index, unit in enumerate(self._fsdp.units):
            for param_group in unit.param_groups:
                policy = param_group.mp_policy
                for fsdp_param in param_group.fsdp_params:
                    p = fsdp_param.sharded_param
                    gather = policy.param_dtype or p.dtype
                    records.append(_Record(tuple(p.shape), p.dtype.itemsize, unit_index, unit.root, group_of.get(id(p)),
                                           gather.itemsize, (policy.reduce_dtype or gather).itemsize))
        return {**_fsdp_memory(records, self._comm.world), **self._updater.memory()}

    # -- the step ---------------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        """All-reduce over the mesh's ranks: on the device, or over the host group for CPU tensors
        (CPUOffloadPolicy puts parameters and gradients there under an NCCL mesh)."""
        if tensor.device.type == "cpu" and self._comm.host_group is not self._comm.group:
            dist.all_reduce(tensor, op=op, group=self._comm.host_group)
        else:
            self._comm.all_reduce(tensor, op=op)

    def _step(self) -> None:
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        if found_inf is not None:
            # (inf/NaN here, none here), the max over ranks: both set when some ranks saw one and
            # others did not, as a scaler that checked this rank's shards alone would report it.
            here = (found_inf.reshape(()) > 0).float()
            flags = torch.stack([here, 1 - here])
            self._all_reduce(flags, op=dist.ReduceOp.MAX)
            anywhere, somewhere_not = flags.tolist()
            if anywhere and somewhere_not:
                raise RuntimeError(
                    "inf/NaN gradients reported on some ranks only: the scaler checked each rank's gradient shards "
                    "alone, so its update() would lower the loss scale on those ranks only, and the ranks would "
                    "scale their losses differently from then on. torch.amp.GradScaler agrees over the ranks on "
                    "FSDP2's gradients (DTensors); another scaler must agree on found_inf before step() "
                    "(torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler: call scaler.unscale_(opt) "
                    "first). The step was not taken.")
            if anywhere:  # every rank skips the step (no update, no rotation)
                return
        group = self.groups[self._rotation.active]
        group.check_not_moved(self.device, self.dtype)
        grads, has_grad = self._gradients.collect(group)
        if not any(has_grad):  # FSDP2 gives every rank the same gradients (or none): no agreement needed
            self._advance()
            return
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float().reshape(1)
        if self.config.max_grad_norm is not None:
            # The norm over every rank's shards: the sum of each rank's squared local norms.
            squares = torch.zeros((), dtype=torch.float32, device=self.device)
            for g in grads:
                if g is not None:
                    squares += grad_norm(g).square()
            self._all_reduce(squares)
            coef = self._clip(squares.sqrt(), coef)
        self._updater.update(group, grads, has_grad, lr=self._lr(), options=self._options(), clip_coef=coef)
        self._steps[group.index] += 1
        self._advance()

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """As HiFTOptimizer.state_dict: a collective; rank 0's holds every parameter's state as full
        tensors (int8 moments as their fp32 values), loadable by any number of ranks or by one
        process. For large models use sharded_state_dict()."""
        state = super().state_dict()
        state["hift"]["complete"] = self._comm.rank == 0
        return state

    def _meta(self) -> bytes:
        """The rotation, the step counts and the options, serialized (one opaque item for DCP)."""
        saved = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        saved["params"] = list(range(len(self._index)))
        hift = {"version": STATE_DICT_VERSION, "optim": self.config.optim_name, "master_weights": self.master_weights,
                "state_dtype": self.config.state_dtype, "groups": [[n for n, _ in g.params] for g in self.groups],
                "group_steps": list(self._steps), "rotation": self._rotation.state_dict(),
                "cycle_lr": self._cycle_lr, "cycle_lr_of": self._cycle_lr_of, "complete": True,
                "sharded": SHARDED_VERSION}
        buffer = io.BytesIO()
        torch.save({"param_groups": [saved], "hift": hift}, buffer)
        return buffer.getvalue()

    def _checkpoint_mesh(self):
        """A CPU device mesh over the host group: the DTensors of a checkpoint live in host memory."""
        from torch.distributed.device_mesh import DeviceMesh

        if getattr(self, "_cpu_mesh", None) is None:
            self._cpu_mesh = DeviceMesh.from_group(self._comm.host_group, "cpu")
        return self._cpu_mesh

    def sharded_state_dict(self) -> dict:
        """The optimizer's state for torch.distributed.checkpoint.save, loadable at any world size
        with load_sharded_state_dict():

            {"state": {name: {"step": 0-d tensor, field: DTensor placed like the parameter, ...}},
             "meta": bytes (the rotation, step counts and options)}

        Every parameter has an entry (step 0: never updated). Fields as stored (exp_avg, ...,
        master or compensation); an int8 moment as its uint8 codes and `<name>_absmax`, a
        (rows, cols / 128) DTensor, when the parameter's rows hold a multiple of 128 elements, and
        as its fp32 values otherwise. Tensors of offloaded groups are live views of host memory,
        as torch's state dicts hold live state: save them right away. Every rank calls it.
        """
        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed; take sharded_state_dict() before close()")
        with self._atomic("sharded_state_dict"):
            mesh = self._checkpoint_mesh()
            state = {}
            for group in self.groups:
                state.update(self._updater.sharded_entries(group, mesh, template=False))
            return {"state": state, "meta": self._meta()}

    def load_sharded_state_dict(self, checkpoint_id=None, *, key: str = "optim", storage_reader=None) -> None:
        """Load what torch.distributed.checkpoint.save wrote of sharded_state_dict() under `key`,
        on any number of ranks (every rank calls it). Same optimizer, state_dtype and
        master_weights as when saved; the model's weights are loaded first (a Kahan compensation is
        relative to them). Reads the checkpoint twice, one group at a time: first every group is
        checked (a ValueError names the first problem on any rank, on every rank, and nothing
        changes), then every group is loaded; the host holds one group's extra copy at a time.
        """
        import torch.distributed.checkpoint as dcp

        if self._closed:
            raise RuntimeError("this HiFTOptimizer was closed")
        with self._atomic("load_sharded_state_dict"):
            def read(state_dict):
                dcp.load({key: state_dict}, checkpoint_id=checkpoint_id, storage_reader=storage_reader,
                         process_group=self._comm.host_group)
                return state_dict

            meta = torch.load(io.BytesIO(read({"meta": b""})["meta"]), weights_only=True)
            hift = meta.get("hift", {})
            if hift.get("sharded") != SHARDED_VERSION:
                raise ValueError(f"{key!r} in this checkpoint is not a sharded_state_dict() of version {SHARDED_VERSION}")
            # The rotation, the step counts, the options and the group layout, checked as for state_dict().
            plan = self._check_state_dict({"state": {}, "param_groups": meta["param_groups"], "hift": hift})
            for name, ours in (("state_dtype", self.config.state_dtype), ("master_weights", self.master_weights)):
                if hift.get(name) != ours:
                    raise ValueError(f"the checkpoint was saved with {name}={hift.get(name)!r}, this optimizer runs "
                                     f"{ours!r}: wrap with the saved one to load it (or convert through state_dict())")
            mesh = self._checkpoint_mesh()

            def entries_of(group):
                loaded = read({"state": self._updater.sharded_entries(group, mesh, template=True)})
                return self._updater.local_entries(group, loaded["state"])

            for group in self.groups:
                problem = ""
                try:
                    entries = entries_of(group)
                    self._updater.check_local(group, entries)
                    check_steps_within(group, entries, plan["steps"][group.index])
                except ValueError as exc:
                    problem = str(exc)
                problems: List[str] = [""] * self._comm.world
                dist.all_gather_object(problems, problem, group=self._comm.host_group)
                found = next((p for p in problems if p), "")
                if found:
                    raise ValueError(f"sharded checkpoint, group {group.index}: {found}")
            for group in self.groups:
                self._updater.load_local(group, entries_of(group))
            self._apply_position(plan)

    def close(self) -> None:
        """As HiFTOptimizer.close; FSDP2 recomputes the reduce dtypes of the modules (every
        parameter trainable again)."""
        was_open = not getattr(self, "_closed", True)
        super().close()
        if was_open:
            self._fsdp.refresh_reduce_dtypes(p for group in self.groups for _, p in group.params)


# ---- memory ---------------------------------------------------------------------------------

class _Record(NamedTuple):
    """A parameter as the memory model sees it: global shape, bytes per element (its gradient's
    too), its fully_shard unit and whether that is the root, its HiFT group (None if frozen), and
    the bytes per element it is all-gathered (and computed) and reduce-scattered in."""
    shape: Tuple[int, ...]
    itemsize: int
    unit: int
    root: bool
    group: Optional[int]
    gather_itemsize: int
    reduce_itemsize: int


def _fsdp_memory(records: List[_Record], world: int) -> dict:
    """FSDP2's buffers per rank (the same on every rank: FSDP2 pads each shard to the first's).

    weights: the sharded parameters, ceil(rows / R) rows each.
    all_gathered: the unsharded parameters at their peak: the root's (FSDP2 keeps the root
        unsharded from forward to backward by default) and the two largest other units (the one
        computing and the one FSDP2 prefetches).
    gradients: the largest group's sharded gradient (from backward to step()).
    gradients_transient: during the active unit's backward, its unsharded gradient and FSDP2's
        reduce-scatter input (rows padded to a multiple of R), the largest over groups and units.
    """
    def padded_local(shape):
        rows, per_row = _rows(shape)
        return -(-rows // world) * per_row

    weights, unsharded, grads, transient = 0, {}, {}, {}
    for r in records:
        weights += padded_local(r.shape) * r.itemsize
        unsharded[r.unit] = unsharded.get(r.unit, 0) + padded_local(r.shape) * world * r.gather_itemsize
        if r.group is not None:
            grads[r.group] = grads.get(r.group, 0) + padded_local(r.shape) * r.itemsize
            key = (r.group, r.unit)
            transient[key] = transient.get(key, 0) + math.prod(r.shape) * r.gather_itemsize + \
                padded_local(r.shape) * world * r.reduce_itemsize
    roots = {r.unit for r in records if r.root}
    others = sorted((b for unit, b in unsharded.items() if unit not in roots), reverse=True)
    return {"weights": weights,
            "all_gathered": sum(unsharded[unit] for unit in roots) + sum(others[:2]),
            "gradients": max(grads.values(), default=0),
            "gradients_transient": max(transient.values(), default=0)}


def memory_breakdown(model: nn.Module, optim="adamw", *, shards: int, rank: int = 0, device="cuda",
                     device_memory: Optional[int] = None, **arguments) -> dict:
    """What `opt.memory_breakdown()` reports on rank `rank` of `shards` for `model` sharded by FSDP2
    (each block fully_shard-ed, the root holding the rest) and wrapped with `optim` and
    `arguments` (hift_rt.wrap's), computed without sharding, wrapping or allocating anything:
    `model` may live on the meta device, and no process group is needed.

    device: where the model would train ("cuda": offload="auto" offloads, state_window="auto" is
    1/64 of `device_memory`, the card's bytes). Rank 0 holds the largest shards. Returns bytes:
    weights, all_gathered, gradients, gradients_transient (FSDP2's, see _fsdp_memory), and
    state_device, state_host (hift_rt's, exactly as the state store allocates them).
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1 or not 0 <= rank < shards:
        raise ValueError(f"shards must be an int >= 1 and rank in [0, shards), got shards={shards!r}, rank={rank!r}")
    config = HiFTConfig.from_arguments(optim, **{"lr": 0.0, **arguments})
    if config.family is None:
        raise ValueError("memory_breakdown plans the fused optimizers ('adamw', 'adam', 'adagrad', 'sgd')")
    device = torch.device(device)
    cut = grouping.cut(model, config.units_per_group, config.groups)
    _, dtype = grouping.check_single_device_dtype([np for group in cut for np in group.params])
    master, offload = config.memory_policy(device, dtype)
    if device.type == "cuda" and config.state_window == "auto" and device_memory is None \
            and not torch.cuda.is_available():
        raise ValueError("state_window='auto' is a share of the card's memory: pass device_memory= (bytes)")
    window = config.window_bytes(device, device_memory)
    fields = config.family.fields(config.options, config.state_dtype, master, dtype)

    group_of = {id(p): group.index for group in cut for _, p in group.params}
    unit_of = {}
    for index, unit in enumerate(grouping.build_units(model)):
        for _, p in unit.params:
            unit_of[id(p)] = index if unit.block else -1  # -1: the root
    records = [_Record(tuple(p.shape), p.dtype.itemsize, unit_of.get(id(p), -1), unit_of.get(id(p), -1) == -1,
                       group_of.get(id(p)), p.dtype.itemsize, p.dtype.itemsize)
               for _, p in model.named_parameters()]

    stored = []
    for group in cut:
        _, params = _decayed_first(group.params, config.no_decay)
        _, numel = local_layout([local_numel(p.shape, shards, rank) for _, p in params])
        stored.append([StoredField(f.name, f.dtype, numel // f.per, f.per) for f in fields])
    if offload:
        state = {"state_device": plan_device(stored, window, StateStore.RING)[3],
                 "state_host": sum(max(blob_nbytes(s), 1) for s in stored)}
    else:
        state = {"state_device": sum(blob_nbytes(s) for s in stored), "state_host": 0}
    return {**_fsdp_memory(records, shards), **state}
