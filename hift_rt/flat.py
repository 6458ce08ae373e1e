"""A group re-homed into one flat buffer: the parameters of a group become views of one (n,)
tensor, so that one kernel launch updates the whole group and one transfer moves its state.

Owns FlatGroup and `rehome`; may call hift_rt.grouping (for the Group it re-homes) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .grouping import Group

# Every parameter starts at a multiple of PARAM_ALIGN elements and every flat buffer holds a
# multiple of it, so that (1) each parameter's slice of any per-element state buffer starts
# 16-byte aligned (Triton then vectorizes to 128-bit loads and stores), and (2) a parameter owns
# whole quantization blocks of a blockwise-quantized state (block sizes divide 256), so its state
# can be cut out per parameter for a checkpoint. The gaps are zero and stay zero (no parameter
# covers them, their gradient is zero). Cost: at most 255 elements per parameter.
PARAM_ALIGN = 256


def aligned(n: int) -> int:
    """n rounded up to a multiple of PARAM_ALIGN."""
    return -(-n // PARAM_ALIGN) * PARAM_ALIGN


@dataclass
class FlatGroup:
    """One group re-homed: its parameters (decayed first) as views of `flat`.

    flat: (numel,) the parameters' storage, numel a multiple of PARAM_ALIGN.
    offsets[i]: element offset of params[i] in flat. Elements [0, decay_end) get weight decay.
    """
    index: int
    name: str
    params: List[Tuple[str, nn.Parameter]]
    flat: torch.Tensor
    offsets: List[int]
    decay_end: int
    notes: List[str]
    _data_ptrs: List[int]  # each parameter's data_ptr at wrap (moved-model check)
    _owners: List[Tuple[nn.Module, str]]  # where the model holds each parameter (moved-model check)

    @property
    def numel(self) -> int:
        """Elements of the flat buffer (alignment gaps included)."""
        return self.flat.numel()

    def slices(self):
        """(name, parameter, offset, numel) per parameter, in flat order."""
        return [(name, p, off, p.numel()) for (name, p), off in zip(self.params, self.offsets)]

    def check_not_moved(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise if the model moved, re-cast or replaced a parameter since wrap: the optimizer
        would otherwise update buffers the model no longer uses."""
        for (name, p), ptr, (module, key) in zip(self.params, self._data_ptrs, self._owners):
            held = module._parameters.get(key)
            if held is not p:  # the model swapped in a new Parameter (e.g. .to() across device types)
                p = held if held is not None else p
                ptr = None
            if p.data_ptr() != ptr or p.device != device or p.dtype != dtype:
                raise RuntimeError(
                    f"parameter '{name}' was moved or re-cast after hift_rt.wrap (now {p.device} {p.dtype}, "
                    f"wrapped on {device} {dtype}); move or cast the model before wrap, then wrap again")


def _owner(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    module_name, _, key = name.rpartition(".")
    return model.get_submodule(module_name), key


def rehome(model: nn.Module, group: Group, no_decay: Optional[Callable[[str], bool]], shards: int = 1) -> FlatGroup:
    """Copy a group's parameters into one flat buffer, decayed ones first, and make each parameter
    a view of it; the buffer is padded to `shards` equal parts of whole PARAM_ALIGN blocks (data
    parallel ranks each own one). The old storage of each parameter is dropped as soon as it is
    copied, so the device holds at most one group twice."""
    decayed = [(n, p) for n, p in group.params if no_decay is None or not no_decay(n)]
    params = decayed + [(n, p) for n, p in group.params if no_decay is not None and no_decay(n)]
    offsets, end = [], 0
    for _, p in params:
        offsets.append(end)
        end = aligned(end + p.numel())
    decay_end = offsets[len(decayed)] if len(decayed) < len(params) else end
    first = params[0][1]
    flat = torch.zeros(-(-end // (shards * PARAM_ALIGN)) * shards * PARAM_ALIGN, dtype=first.dtype, device=first.device)
    with torch.no_grad():
        for (_, p), off in zip(params, offsets):
            view = flat[off:off + p.numel()].view(p.shape)
            view.copy_(p.detach())
            p.data = view
    return FlatGroup(group.index, group.name, params, flat, offsets, decay_end, list(group.notes),
                     [p.data_ptr() for _, p in params], [_owner(model, n) for n, _ in params])
