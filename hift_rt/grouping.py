"""Cutting a model along depth: parameters -> units -> groups.

This module owns the automatic cut (`cut`, `build_units`, `groups_from_units`), the cut given as
name prefixes (`groups_from_prefixes`) and the one-device, one-dtype check. It only reads the
model: its module tree, `named_parameters()`, and the source of its `forward` methods (through
`inspect` and `ast`). It calls nothing else in hift_rt.

Units, bottom to top (only trainable parameters; a tied parameter counts once, where
`named_parameters()` first lists it):
- Every *block stack* is cut into one unit per block. A block stack is an `nn.ModuleList` or
  `nn.Sequential` with at least two children holding trainable parameters, whatever their classes
  (Jamba mixes Mamba and attention layers). A block is not searched further (a T5 block's `layer`
  list, a mixture of experts stay whole), except that a block which is itself such a container is
  cut into its own blocks (`nn.Sequential(embed, nn.Sequential(*blocks), head)`).
- Any other module is transparent. Its *items* (its own parameters and its children) are put in
  dataflow order, the stacks below an item are cut, and consecutive items without a stack form one
  *glue* unit: "input" before the first block, "output" after the last, and between two stacks
  (an encoder's final norm and a decoder's embeddings) a unit named by its items' paths.
- Dataflow order is the order in which the module's `forward` first mentions `self.<item>`, read
  from its source with `ast`, calls to the class's own methods followed in place (DeBERTa-v2 reads
  `rel_embeddings` inside `self.get_rel_embedding()`). An item that `forward` does not mention, or
  every item when there is no readable source, stays after the item registered before it. An item
  first used inside the loop over a stack (DeBERTa-v2's `conv`, applied after layer 0) lands after
  that stack, and its unit says so in `note`. No class or attribute names are special.
- A block holding more than min(2/k, 3/4) of the parameters (k units) that has block stacks of
  its own is replaced by its own pieces, until none is left: Swin's, ConvNeXt's and ResNet's
  stages become their blocks, while stages of balanced size stay whole.
- A model without any block stack gets one unit per item of its first module with more than one
  item (wrappers holding a single child are looked through).
Groups are runs of `units_per_group` consecutive units, bottom to top.

Balance (`cut` checks it): with k groups and N trainable parameters, a group holding more than
min(2/k, 3/4) * N is oversized (the 3/4 cap makes the check mean something for k <= 2). A group
that is one unit gets a note instead of a warning when no automatic cut could do better: when one
parameter is at least half of the unit (GPT-2's `wte`, T5's `shared`: a parameter is never split)
or when the unit is one block (the model's own granularity). Every other oversized group (several
units, or glue in which no structure was found) is named in one `GroupingWarning`, which says how
to pass `groups=` and lists this model's units in that form.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Collection, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import nn

NamedParams = List[Tuple[str, nn.Parameter]]
CONTAINERS = (nn.ModuleList, nn.Sequential)
OVERSIZED_CAP = 0.75  # share above which a group is oversized whatever k (2/k >= 1 for k <= 2)


class GroupingWarning(UserWarning):
    """The automatic cut left a group far larger than its share of the trainable parameters."""


@dataclass
class Unit:
    """Parameters that always share a group.

    name: "input", "output", a block's module path ("model.layers.3"), or for glue between two
    stacks its items' paths joined by ", ". prefixes: module paths or parameter names that cover
    exactly `params`, as `groups=` takes them. note: why something sits where it does, or "".
    block: whether the unit is one block of a block stack.
    """
    name: str
    params: NamedParams = field(default_factory=list)
    prefixes: List[str] = field(default_factory=list)
    note: str = ""
    block: bool = False


@dataclass
class Group:
    """One HiFT group: its units' parameters, bottom to top, and their units' notes."""
    index: int
    unit_names: List[str]
    params: NamedParams
    notes: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.unit_names[0] if len(self.unit_names) == 1 else f"{self.unit_names[0]}..{self.unit_names[-1]}"


class _Item(NamedTuple):
    """A module's own parameter (module None) or child, with the trainable parameters under it."""
    attr: str
    path: str
    module: Optional[nn.Module]
    params: NamedParams


@dataclass
class _Piece:
    """A block, or one item of glue; consecutive glue pieces become one unit. `module` is the
    block's module (None for a parameter), which `_refine` may cut further."""
    block: bool
    path: str
    params: NamedParams
    notes: List[str] = field(default_factory=list)
    module: Optional[nn.Module] = None


class _SelfMentions(ast.NodeVisitor):
    """The `self.<name>` attributes a class's method mentions, in source order, each with the
    `self.<name>`s iterated by the `for` loops around it; a call to another method of the class
    is followed where it is made (each method once)."""

    def __init__(self, cls: type):
        self.cls = cls
        self.mentions: List[Tuple[str, FrozenSet[str]]] = []
        self._loops: List[FrozenSet[str]] = []
        self._entered: Set[str] = set()

    def visit_method(self, name: str) -> bool:
        """Visits method `name`'s body; False when it is not the class's own or has no source."""
        function = inspect.getattr_static(self.cls, name, None)
        if not inspect.isfunction(function) or name in self._entered:
            return False
        if function is inspect.getattr_static(nn.Module, name, None):
            return False  # torch's own methods (the unimplemented forward) name no child
        self._entered.add(name)
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            return False
        if not tree.body or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
            return False
        for statement in tree.body[0].body:
            self.visit(statement)
        return True

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)  # the iterable is evaluated before the target is bound
        self.visit(node.target)
        self._loops.append(frozenset(_self_attributes(node.iter)))
        for statement in node.body:
            self.visit(statement)
        self._loops.pop()
        for statement in node.orelse:
            self.visit(statement)

    visit_AsyncFor = visit_For

    def visit_Call(self, node: ast.Call) -> None:
        for argument in [*node.args, *node.keywords]:  # `self.head(self.norm(x))` runs norm first
            self.visit(argument)
        self.visit(node.func)

    def visit_Expr(self, node: ast.Expr) -> None:
        call = node.value
        if isinstance(call, ast.Call) and _is_self_attribute(call.func):
            # A method called for its side effects only is not followed: it says nothing about
            # where data flows (RWKV's `self._rescale_layers()` walks the blocks before the embedding).
            self.mentions.append((call.func.attr, frozenset().union(*self._loops)))
            for argument in [*call.args, *call.keywords]:
                self.visit(argument)
        else:
            self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _is_self_attribute(node):
            self.mentions.append((node.attr, frozenset().union(*self._loops)))
            self.visit_method(node.attr)
        self.generic_visit(node)


def _is_self_attribute(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


def _self_attributes(node: ast.AST) -> List[str]:
    return [n.attr for n in ast.walk(node) if _is_self_attribute(n)]


@functools.lru_cache(maxsize=None)
def _forward_mentions(cls: type) -> Optional[Tuple[Tuple[str, FrozenSet[str]], ...]]:
    """`_SelfMentions` of `cls.forward`, or None when it has no readable source of its own."""
    visitor = _SelfMentions(cls)
    return tuple(visitor.mentions) if visitor.visit_method("forward") else None


def _trainable(model: nn.Module) -> NamedParams:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _items(module: nn.Module, path: str, params: NamedParams) -> List[_Item]:
    """`module`'s own parameters, then its children, in registration order, each with its share of
    `params` (the trainable parameters under `module`); items without one are left out."""
    prefix = path + "." if path else ""
    by_attr: Dict[str, NamedParams] = {}
    for name, p in params:
        by_attr.setdefault(name[len(prefix):].split(".", 1)[0], []).append((name, p))
    own = [_Item(attr, prefix + attr, None, by_attr[attr])
           for attr, _ in module.named_parameters(recurse=False) if attr in by_attr]
    children = [_Item(attr, prefix + attr, child, by_attr[attr])
                for attr, child in module.named_children() if attr in by_attr]
    return own + children


def _is_stack(module: nn.Module, items: List[_Item]) -> bool:
    """A container with two or more children holding trainable parameters (its own parameters
    do not count: a weight-norm ParametrizationList holds `original0`, `original1`)."""
    return isinstance(module, CONTAINERS) and sum(item.module is not None for item in items) >= 2


def _dataflow_order(module: nn.Module, items: List[_Item], stacks: FrozenSet[str]) -> Tuple[List[_Item], Dict[str, str]]:
    """`items` in the order `module.forward` first mentions them (see the module docstring), and
    a note for each item placed after a stack only because it is first used inside its loop."""
    mentions = _forward_mentions(type(module))
    if mentions is None:
        return items, {}
    first: Dict[str, Tuple[int, FrozenSet[str]]] = {}
    for position, (attr, loops) in enumerate(mentions):
        first.setdefault(attr, (position, loops))
    path_of = {item.attr: item.path for item in items}
    keys, notes, previous = [], {}, -1
    for registered, item in enumerate(items):
        if item.attr in first:
            previous, loops = first[item.attr]
            keys.append((previous, 0, registered))
            inside = sorted((loops & stacks) - {item.attr})
            if inside:
                notes[item.attr] = (f"{item.path} is first used inside the loop over {path_of[inside[0]]}, "
                                    "between its blocks, so it is placed after them")
        else:  # not mentioned: keep it right after the item registered before it
            keys.append((previous, 1, registered))
    order = sorted(range(len(items)), key=keys.__getitem__)
    return [items[i] for i in order], notes


def _expand(module: nn.Module, path: str, params: NamedParams) -> List[_Piece]:
    """The pieces of `module` (whose trainable parameters are `params`) bottom to top: a block
    stack gives its blocks, another module its items in dataflow order with the stacks below them
    expanded; a module without a stack below is one glue piece."""
    items = _items(module, path, params)
    if _is_stack(module, items):
        pieces = []
        for item in items:
            if isinstance(item.module, CONTAINERS):
                pieces += [_Piece(True, p.path, p.params, p.notes, p.module)
                           for p in _expand(item.module, item.path, item.params)]
            else:
                pieces.append(_Piece(True, item.path, item.params, module=item.module))
        return pieces
    below = {item.attr: _expand(item.module, item.path, item.params) for item in items if item.module is not None}
    stacks = frozenset(attr for attr, pieces in below.items() if any(p.block for p in pieces))
    if not stacks:
        return [_Piece(False, path, params, module=module)]
    ordered, notes = _dataflow_order(module, items, stacks)
    pieces = []
    for item in ordered:
        if item.attr in stacks:
            pieces += below[item.attr]
        else:
            pieces.append(_Piece(False, item.path, item.params, [notes[item.attr]] if item.attr in notes else []))
    return pieces


def _unit_count(pieces: List[_Piece]) -> int:
    """How many units `_glue_units(pieces)` makes: the blocks and the runs of glue."""
    return sum(p.block or i == 0 or pieces[i - 1].block for i, p in enumerate(pieces))


def _limit(k: int) -> float:
    """The largest share of the trainable parameters that one of k groups (or units) may hold."""
    return min(2 / k, OVERSIZED_CAP)


def _refine(pieces: List[_Piece]) -> List[_Piece]:
    """Replaces each block holding more than `_limit` of the parameters (k counted in units) that
    has block stacks of its own by its own pieces, until none is left (see the module docstring)."""
    total = sum(_numel(p.params) for p in pieces)
    pieces = list(pieces)
    while True:
        limit = _limit(_unit_count(pieces)) * total
        for i, piece in enumerate(pieces):
            if not piece.block or piece.module is None or _numel(piece.params) <= limit:
                continue
            inner = _expand(piece.module, piece.path, piece.params)
            if any(p.block for p in inner):
                pieces[i:i + 1] = inner
                break
        else:
            return pieces


def _without_stacks(model: nn.Module, params: NamedParams) -> List[Unit]:
    """One unit per item of the first module with more than one item, in dataflow order."""
    module, path = model, ""
    items = _items(module, path, params)
    while len(items) == 1 and items[0].module is not None:
        module, path = items[0].module, items[0].path
        items = _items(module, path, params)
    ordered, _ = _dataflow_order(module, items, frozenset())
    return [Unit(item.path, item.params, [item.path]) for item in ordered]


def _glue_units(pieces: List[_Piece]) -> List[Unit]:
    """Blocks become units; each run of glue pieces becomes one unit, named "input" before the
    first block, "output" after the last, and by its pieces' paths in between."""
    units: List[Unit] = []
    run: List[_Piece] = []
    blocks_left = sum(p.block for p in pieces)

    def close_run() -> None:
        if not run:
            return
        paths = [p.path for p in run]
        name = "input" if not units else "output" if not blocks_left else ", ".join(paths)
        units.append(Unit(name, [np for p in run for np in p.params], paths,
                          "; ".join(n for p in run for n in p.notes)))
        run.clear()

    for piece in pieces:
        if piece.block:
            close_run()
            blocks_left -= 1
            units.append(Unit(piece.path, piece.params, [piece.path], "; ".join(piece.notes), block=True))
        else:
            run.append(piece)
    close_run()
    return units


def _note_tied(model: nn.Module, units: List[Unit]) -> None:
    """Adds "X is also Y (tied)" to the note of the unit that trains a tied parameter."""
    names: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for unit in units:
        tied = [f"{name} is also {', '.join(names[id(p)][1:])} (tied)" for name, p in unit.params if len(names[id(p)]) > 1]
        unit.note = "; ".join(n for n in [unit.note, *tied] if n)


def build_units(model: nn.Module, names: Optional[Collection[str]] = None) -> List[Unit]:
    """Units bottom to top, as the module docstring says, over the trainable parameters, or over
    the parameters named in `names` (a wrapped model's: its inactive groups are frozen)."""
    params = _trainable(model) if names is None else [(n, p) for n, p in model.named_parameters() if n in names]
    if not params:
        return []
    pieces = _expand(model, "", params)
    units = _glue_units(_refine(pieces)) if any(p.block for p in pieces) else _without_stacks(model, params)
    _note_tied(model, units)
    return units


def groups_from_units(units: Sequence[Unit], units_per_group: int) -> List[Group]:
    """Runs of `units_per_group` consecutive units, bottom to top; the last run may be shorter."""
    if not isinstance(units_per_group, int) or isinstance(units_per_group, bool) or units_per_group < 1:
        raise ValueError(f"units_per_group must be a positive int, got {units_per_group!r}")
    groups = []
    for start in range(0, len(units), units_per_group):
        chunk = units[start:start + units_per_group]
        groups.append(Group(len(groups), [u.name for u in chunk], [np for u in chunk for np in u.params],
                            [u.note for u in chunk if u.note]))
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


def _numel(params: NamedParams) -> int:
    return sum(p.numel() for _, p in params)


def _groups_example(units: Sequence[Unit]) -> str:
    """`groups=` with one unit per group, shortened to its first two and last entries."""
    lists = [repr(u.prefixes) for u in units]
    if len(lists) > 4:
        lists = lists[:2] + ["..."] + lists[-1:]
    return f"groups=[{', '.join(lists)}]"


def _check_balance(groups: List[Group], units: Sequence[Unit]) -> None:
    """Notes or warns about oversized groups, as the module docstring says."""
    k, total = len(groups), sum(_numel(g.params) for g in groups)
    limit = _limit(k)
    unit_named = {u.name: u for u in units}
    oversized, several_units = [], False
    for g in groups:
        size = _numel(g.params)
        if size <= limit * total:
            continue
        share = f"holds {size / total:.0%} of the trainable parameters, more than {limit:.0%}"
        if len(g.unit_names) == 1:
            biggest, biggest_name = max((p.numel(), n) for n, p in g.params)
            if 2 * biggest >= size:
                g.notes.append(f"{share}, because {biggest_name} is {biggest / size:.0%} of its one unit "
                               "and no cut splits a parameter")
                continue
            if unit_named[g.unit_names[0]].block:
                g.notes.append(f"{share}: it is one block, which the automatic cut does not split "
                               "(groups= can, by parameter name)")
                continue
        oversized.append(f"group {g.index} ({g.name}) holds {size / total:.0%}")
        several_units |= len(g.unit_names) > 1
    if not oversized:
        return
    if k == 1:
        what = (f"the cut gives 1 group of {len(units)} unit(s): every step updates every parameter, "
                "which is plain full fine-tuning")
    else:
        what = (f"of {k} groups, {', '.join(oversized)} of the {total} trainable parameters, more than "
                f"{limit:.0%} (twice a group's share 1/k, at most {OVERSIZED_CAP:.0%})")
    fix = ("Use a smaller units_per_group, or pass" if several_units
           else f"The automatic cut found no finer structure in {'it' if len(oversized) == 1 else 'them'}: pass")
    warnings.warn(f"hift_rt: {what}. {fix} groups= as lists of parameter-name prefixes, one list per "
                  f"group, bottom to top, every trainable parameter in exactly one; one unit per group "
                  f"here is {_groups_example(units)}", GroupingWarning, stacklevel=3)


def cut(model: nn.Module, units_per_group: int = 1,
        groups: Optional[Sequence[Sequence[str]]] = None) -> List[Group]:
    """The groups of `model`: `groups_from_prefixes(model, groups)` when `groups` is given (the
    caller's cut, not checked for balance), else runs of `units_per_group` units of
    `build_units(model)`, with a note on each unavoidably oversized group and a GroupingWarning
    naming the others (see the module docstring)."""
    if groups is not None:
        return groups_from_prefixes(model, groups)
    units = build_units(model)
    result = groups_from_units(units, units_per_group)
    if result:
        _check_balance(result, units)
    return result


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
