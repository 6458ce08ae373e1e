"""Cutting a model along depth: parameters -> units -> groups.

Units, bottom to top:
- the *input* unit: every trainable parameter registered before the main block stack
  (embeddings, ...);
- one unit per block of the main stack: the `nn.ModuleList` holding the most parameters whose
  children are all of one class (`model.layers`, `transformer.h`, `encoder.layer`, ...);
- the *output* unit: every trainable parameter registered after it (final norm, head).
Order is `named_parameters()` order; a tied parameter counts once, where it first appears;
frozen parameters (`requires_grad=False`) are never trained. A model without such a list gets one
unit per direct child module holding parameters (and one for the root's own parameters). Empty
units are dropped. Groups are consecutive runs of `units_per_group` units, bottom to top.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

NamedParams = List[Tuple[str, nn.Parameter]]


@dataclass
class Unit:
    name: str
    params: NamedParams = field(default_factory=list)


def find_block_stack(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """The ModuleList with the most parameters whose children all share one class, or None."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        count = sum(p.numel() for p in module.parameters())
        if count > best_count:
            best, best_count = (name, module), count
    return best


def _trainable(model: nn.Module) -> NamedParams:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_units(model: nn.Module) -> List[Unit]:
    """Units bottom to top, as the module docstring says; only trainable parameters."""
    params = _trainable(model)
    stack = find_block_stack(model)
    units: List[Unit] = []
    if stack is not None:
        prefix = stack[0] + "." if stack[0] else ""  # "" when the model itself is the stack
        inputs, outputs = Unit("input"), Unit("output")
        blocks: Dict[str, Unit] = {}
        for name, p in params:
            if name.startswith(prefix):
                index = name[len(prefix):].split(".", 1)[0]
                blocks.setdefault(index, Unit(prefix + index)).params.append((name, p))
            elif blocks:
                outputs.params.append((name, p))
            else:
                inputs.params.append((name, p))
        # ModuleList children are named "0", "1", ...: keep the stack's own order.
        ordered = [blocks[str(i)] for i in range(len(stack[1])) if str(i) in blocks]
        units = [inputs, *ordered, outputs]
    else:
        by_child: Dict[str, Unit] = {}
        for name, p in params:
            head = name.split(".", 1)[0] if "." in name else ""
            by_child.setdefault(head, Unit(head or "<root>")).params.append((name, p))
        units = list(by_child.values())
    return [u for u in units if u.params]


@dataclass
class Group:
    """One HiFT group: its units' parameters, bottom to top."""
    index: int
    unit_names: List[str]
    params: NamedParams

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)

    @property
    def name(self) -> str:
        return self.unit_names[0] if len(self.unit_names) == 1 else f"{self.unit_names[0]}..{self.unit_names[-1]}"


def groups_from_units(units: Sequence[Unit], units_per_group: int) -> List[Group]:
    if not isinstance(units_per_group, int) or units_per_group < 1:
        raise ValueError(f"units_per_group must be a positive int, got {units_per_group!r}")
    groups = []
    for start in range(0, len(units), units_per_group):
        chunk = units[start:start + units_per_group]
        groups.append(Group(len(groups), [u.name for u in chunk], [np for u in chunk for np in u.params]))
    return groups


def groups_from_prefixes(model: nn.Module, prefixes: Sequence[Sequence[str]]) -> List[Group]:
    """Groups given as lists of parameter-name prefixes ("model.layers.0" matches
    "model.layers.0.mlp.up.weight"); every trainable parameter must land in exactly one group."""
    if isinstance(prefixes, (str, bytes)) or not prefixes:
        raise ValueError("groups= must be a non-empty list of lists of parameter-name prefixes")
    params = _trainable(model)
    owner: Dict[str, List[int]] = {name: [] for name, _ in params}
    for gi, group in enumerate(prefixes):
        if isinstance(group, str) or not group:
            raise ValueError(f"groups[{gi}] must be a non-empty list of prefixes, got {group!r}")
        for name in owner:
            if any(name == pre or name.startswith(pre.rstrip(".") + ".") for pre in group):
                owner[name].append(gi)
    missing = [n for n, g in owner.items() if not g]
    duplicated = {n: g for n, g in owner.items() if len(g) > 1}
    if missing:
        raise ValueError(f"groups= leaves {len(missing)} trainable parameter(s) in no group: {missing[:5]}")
    if duplicated:
        first = list(duplicated.items())[:5]
        raise ValueError(f"groups= puts {len(duplicated)} parameter(s) in more than one group: {first}")
    groups = [Group(gi, [", ".join(g)], [(n, p) for n, p in params if owner[n] == [gi]]) for gi, g in enumerate(prefixes)]
    empty = [g.index for g in groups if not g.params]
    if empty:
        raise ValueError(f"groups= entries {empty} match no trainable parameter")
    return groups


def check_single_device_dtype(params: NamedParams) -> Tuple[torch.device, torch.dtype]:
    devices = {p.device for _, p in params}
    if len(devices) != 1:
        raise ValueError(f"trainable parameters are on several devices {sorted(map(str, devices))}; "
                         "hift_rt.wrap needs the model on one device")
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) != 1:
        raise ValueError(f"trainable parameters have several dtypes {sorted(map(str, dtypes))}; "
                         "cast the model to one dtype before hift_rt.wrap")
    return devices.pop(), dtypes.pop()
