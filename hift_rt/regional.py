"""torch.compile for HiFT: each unit's module compiled on its own (regional compilation).

    model = hift_rt.compile(model, **torch_compile_kwargs)   # before or after hift_rt.wrap

Why not `torch.compile(model)`: dynamo guards every parameter's `requires_grad`, and HiFT changes
which group has it at every step, so a whole-model graph holds for one group only: k groups are
k recompiles of the whole model, and past `torch._dynamo.config.recompile_limit` (8) the model
runs eagerly from then on (a tiny 12-layer Llama, 14 groups, inductor on two shared CPU cores: 8
whole-model compiles in 173-320 s, then eager; this module: 5 graphs in about 50 s, then none).

What is compiled: the modules of the cut's units (hift_rt.grouping.build_units), each with
`Module.compile(**kwargs)`, as torchtitan and torchtune compile each transformer block: every
block of a block stack, and each module that makes up a glue unit (the items of the input and
output units, e.g. Llama's final norm). Not compiled: the model itself and every module above the
blocks (the code between blocks stays eager: a graph around the blocks would guard the blocks'
parameters again), parameters held directly by such a module, and torch.nn's own layers without
children (nn.Embedding, nn.Linear, nn.LayerNorm, ...): each is one operator, there is nothing to
fuse, dynamo does not trace torch.nn's code as the entry of a compiled region (Module.compile leaves
it eager anyway), and the head stays free for hift_rt.efficient_lm_loss, which replaces the head's
forward during a call.

How many graphs: dynamo keys its cache by code object and, since torch 2.5, passes parameters as
graph inputs, so the blocks of one class and shape share graphs. A module's graph depends on
whether its parameters train and whether its input needs a gradient; HiFT gives a block three
states, each one graph: the active block (parameters trainable, input without gradient), a
frozen block above the active group (input needs a gradient: backward runs through it) and a
frozen block below it (no autograd at all). A group of several units adds a fourth (a trainable
block whose input needs a gradient). So a Llama compiles 3 block graphs whatever its depth, plus 2
for its final norm, and none of them recompiles afterwards: the first cycle compiles everything.
Guards on anything else the runtime changes between steps do not exist: gradients accumulate
outside the compiled graphs (into `.grad` views of the flat gradient buffer), parameters that are
views of one flat buffer are graph inputs of the same shape and stride every step (dynamo does not
guard aliasing between parameters), and GradScaler and the efficient loss act outside the compiled
modules. A `groups=` cut that splits a block adds one state per group that holds part of it.

Two dynamo settings, as torchtitan's per-block compile sets them (compile never lowers a limit):
- `recompile_limit` (8) counts the graphs of one code object, which every block of a class
  shares, and Hugging Face's checkpointing wrapper is one code object for all of its layer
  classes. A T5 (3 + 3 layers, 9 groups) needs 23 graphs there: four block variants (the first
  encoder and decoder blocks hold the relative position bias), and a decoder block has more
  states than a chain's 4 (its input and the encoder's output need gradients or not apart); at
  8, its blocks ran eagerly from the ninth graph on. It and `accumulated_recompile_limit` are
  raised to 4 × the modules compiled (T5 above: 32; a chain of L blocks needs 3 or 4 graphs per
  block variant, far fewer), so the limit still stops a module that recompiles for another
  reason (`TORCH_LOGS=recompiles` names it).
- `skip_fwd_side_effects_in_bwd_under_checkpoint = True`: with gradient checkpointing, a block's
  forward that sets a Python attribute (Hugging Face's hub-kernel context variable in every
  Llama layer) is otherwise a graph break inside the checkpoint, and the whole block runs
  eagerly; the side effect is not one the recomputation needs (its operators are in the graph).

Owns: compile, compiled_modules, warn_if_whole_model_compiled. May call: hift_rt.grouping
(build_units), torch.compile (through Module.compile), torch._dynamo.config.
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Tuple

import torch
from torch import nn

from .grouping import build_units

# Graphs allowed per compiled module: a block of a chain needs at most 4 (its parameters
# trainable or frozen, times its input needing a gradient or not), shared by every block of its
# variant; see the module docstring for modules with several inputs.
STATES_PER_MODULE = 4


def _is_torch_layer(module: nn.Module) -> bool:
    """A torch.nn layer of torch's own without children: one operator (see the module docstring)."""
    return type(module).__module__.startswith("torch.") and not any(True for _ in module.children())


def _unit_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(path, module) of every module that holds a unit of `model`'s cut or an item of a glue
    unit, bottom to top, except torch.nn's own layers without children."""
    managed = model.__dict__.get("_hift_rt_managed")  # set by hift_rt.wrap: its inactive groups are frozen
    out = []
    for unit in build_units(model, managed):
        for path in unit.prefixes:
            try:
                module = model.get_submodule(path)
            except AttributeError:  # a parameter held by a module above the blocks: left eager
                continue
            if path and not _is_torch_layer(module):
                out.append((path, module))
    return out


def _whole_model_compiled(model: nn.Module) -> bool:
    """torch.compile(model) or model.compile(). Dynamo is not imported for the check (1 s): an
    OptimizedModule exists only once it is."""
    dynamo = sys.modules.get("torch._dynamo")
    return model._compiled_call_impl is not None or (
        dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule))


def warn_if_whole_model_compiled(model: nn.Module) -> None:
    """hift_rt.wrap's check: a model compiled as a whole recompiles at every step (module docstring)."""
    if _whole_model_compiled(model):
        warnings.warn("hift_rt.wrap: the model is compiled as a whole (torch.compile(model) or model.compile()); "
                      "its graph guards every parameter's requires_grad, which HiFT changes at every step, so it "
                      "is recompiled for each group and runs eagerly past torch._dynamo.config.recompile_limit. "
                      "Use hift_rt.compile(model) on the model itself instead: one region per unit, no recompiles",
                      stacklevel=4)


def compiled_modules(model: nn.Module) -> List[str]:
    """Paths of `model`'s submodules that Module.compile has compiled, in model order."""
    return [name for name, m in model.named_modules() if name and m._compiled_call_impl is not None]


def compile(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile each of `model`'s HiFT units on its own, in place; returns `model`.

    `compile_kwargs` go to torch.compile (backend, mode, fullgraph, dynamic, options). Call it
    before or after hift_rt.wrap, on the model itself (not on `torch.compile(model)`). Compiling
    is lazy: the graphs are built during the first cycle of training steps, at most four per
    distinct block (see the module docstring), then reused. `compiled_modules(model)` lists what
    was compiled. Raises TypeError for a non-module and ValueError for a model that is already
    compiled as a whole (which would trace the blocks again inside the whole model's graph).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"hift_rt.compile takes an nn.Module, got {type(model).__name__}")
    if _whole_model_compiled(model):
        raise ValueError("hift_rt.compile takes a model that is not compiled as a whole (torch.compile(model) or "
                         "model.compile()): a whole-model graph guards every parameter's requires_grad, which HiFT "
                         "changes at every step, and would trace the blocks again. Pass the model itself (for "
                         "torch.compile(model), its ._orig_mod)")
    modules = _unit_modules(model)
    if not modules:
        warnings.warn("hift_rt.compile found nothing to compile: the model's units are torch.nn layers without "
                      "children (or it has no trainable parameters), which torch.compile leaves as they are",
                      stacklevel=2)
        return model
    config = torch._dynamo.config
    needed = STATES_PER_MODULE * len(modules)
    for names in (("recompile_limit", "cache_size_limit"),  # torch >= 2.7's name, then the older one
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next(n for n in names if hasattr(config, n))
        setattr(config, name, max(getattr(config, name), needed))
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for _, module in modules:
        module.compile(**compile_kwargs)
    return model
