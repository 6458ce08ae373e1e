"""The fused optimizer families, described once: for each `optim=` name, torch's option names and
defaults, the torch.optim class whose single-tensor loop it reproduces, the state it keeps per
element (in the order it sits in a group's state), and the calls into hift_rt.kernels (the update
and its float64 reference). The runtime, the kernel tests and the runtime tests all read this table.

A family's options are exactly torch.optim's; an option we do not support raises, it is never
ignored. Implementation switches of torch (`foreach`, `fused`, `capturable`, `differentiable`)
are accepted only at their "no preference" values: hift_rt always runs its own fused kernels.

This module may call hift_rt.kernels only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .kernels import adagrad_ref, adagrad_update, adamw_ref, adamw_update, sgd_ref, sgd_update

_IMPLEMENTATION_SWITCHES = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One fused optimizer.

    update(param, grad, state, *, step, lr, options, decay_end, master, clip_coef): one step over
        flat (n,) buffers in place; `state` maps each of state_names(options) to an (n,) fp32
        buffer; `step` counts updates including this one; `options` are torch's (see defaults).
    reference(param, grad, state, *, step, lr, options, decay_end, clip_coef) -> (param, state):
        the same step in float64, inputs untouched (for a master, pass the master as param).
    """
    name: str
    torch_class: type
    defaults: Dict[str, object]
    unsupported: Dict[str, object]  # option -> the only value we accept
    has_step: bool  # torch keeps a "step" entry in this optimizer's per-parameter state
    state_names: Callable[[dict], Tuple[str, ...]]
    update: Callable[..., None]
    reference: Callable[..., Tuple[torch.Tensor, State]]

    def options(self, given: dict) -> dict:
        """torch's defaults overridden by `given`, after rejecting what we cannot honour."""
        allowed = {**_IMPLEMENTATION_SWITCHES, **self.unsupported}
        unknown = sorted(set(given) - set(self.defaults) - set(allowed))
        if unknown:
            raise ValueError(f"optim={self.name!r} has no option(s) {unknown}; "
                             f"supported: {sorted(self.defaults)}")
        for key, only in allowed.items():
            if key in given and given[key] != only and not (only is None and given[key] is False):
                raise ValueError(f"optim={self.name!r}: {key}={given[key]!r} is not supported by hift_rt "
                                 f"(it runs its own fused kernels); leave {key} at {only!r}")
        options = {**self.defaults, **{k: v for k, v in given.items() if k in self.defaults}}
        if "betas" in options:
            options["betas"] = tuple(float(b) for b in options["betas"])
        check_options(self.name, options)
        return options

    def initial_state(self, n: int, device, options: dict) -> State:
        """The state before the first update, (n,) fp32 each: zeros, Adagrad's sum at its
        initial_accumulator_value."""
        return {name: torch.full((n,), float(options["initial_accumulator_value"]) if name == "sum" else 0.0,
                                 dtype=torch.float32, device=device)
                for name in self.state_names(options)}


def check_options(name: str, options: dict) -> None:
    """Values torch.optim refuses, refused at wrap (the kernels check again at every step)."""
    for key in ("eps", "weight_decay", "momentum", "dampening", "lr_decay", "initial_accumulator_value"):
        if key in options:
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < math.inf:
                raise ValueError(f"optim={name!r}: {key} must be a finite number >= 0, got {value!r}")
    if "betas" in options:
        if len(options["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in options["betas"]):
            raise ValueError(f"optim={name!r}: betas must be two numbers in [0, 1), got {options['betas']!r}")
    if options.get("nesterov") and (options["momentum"] <= 0 or options["dampening"] != 0):
        raise ValueError(f"optim={name!r}: nesterov needs momentum > 0 and dampening = 0")


def _adam_state(options):
    return ("exp_avg", "exp_avg_sq")


def _adam_update(decoupled):
    def update(param, grad, state, *, step, lr, options, decay_end=None, master=None, clip_coef=None):
        adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                     betas=options["betas"], eps=options["eps"], weight_decay=options["weight_decay"],
                     decoupled=decoupled, maximize=options["maximize"], decay_end=decay_end,
                     master=master, clip_coef=clip_coef)
    return update


def _adam_reference(decoupled):
    def reference(param, grad, state, *, step, lr, options, decay_end=None, clip_coef=None):
        p, m, v = adamw_ref(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                            betas=options["betas"], eps=options["eps"], weight_decay=options["weight_decay"],
                            decoupled=decoupled, maximize=options["maximize"], decay_end=decay_end,
                            clip_coef=clip_coef)
        return p, {"exp_avg": m, "exp_avg_sq": v}
    return reference


def _adagrad_update(param, grad, state, *, step, lr, options, decay_end=None, master=None, clip_coef=None):
    adagrad_update(param, grad, state["sum"], step=step, lr=lr, lr_decay=options["lr_decay"],
                   weight_decay=options["weight_decay"], eps=options["eps"], maximize=options["maximize"],
                   decay_end=decay_end, master=master, clip_coef=clip_coef)


def _adagrad_reference(param, grad, state, *, step, lr, options, decay_end=None, clip_coef=None):
    p, s = adagrad_ref(param, grad, state["sum"], step=step, lr=lr, lr_decay=options["lr_decay"],
                       weight_decay=options["weight_decay"], eps=options["eps"], maximize=options["maximize"],
                       decay_end=decay_end, clip_coef=clip_coef)
    return p, {"sum": s}


def _sgd_state(options):
    return ("momentum_buffer",) if options["momentum"] != 0 else ()


def _sgd_update(param, grad, state, *, step, lr, options, decay_end=None, master=None, clip_coef=None):
    buffer: Optional[torch.Tensor] = state.get("momentum_buffer")
    if options["momentum"] != 0 and buffer is None:
        raise ValueError("optim='sgd': momentum was 0 at wrap (no momentum buffer was allocated); "
                         "it cannot be switched on afterwards")
    sgd_update(param, grad, buffer, lr=lr, momentum=options["momentum"], dampening=options["dampening"],
               nesterov=options["nesterov"], weight_decay=options["weight_decay"], maximize=options["maximize"],
               first_step=step == 1, decay_end=decay_end, master=master, clip_coef=clip_coef)


def _sgd_reference(param, grad, state, *, step, lr, options, decay_end=None, clip_coef=None):
    p, b = sgd_ref(param, grad, state.get("momentum_buffer"), lr=lr, momentum=options["momentum"],
                   dampening=options["dampening"], nesterov=options["nesterov"],
                   weight_decay=options["weight_decay"], maximize=options["maximize"], first_step=step == 1,
                   decay_end=decay_end, clip_coef=clip_coef)
    return p, ({} if b is None else {"momentum_buffer": b})


_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "maximize": False}
FAMILIES = {
    "adamw": Family("adamw", torch.optim.AdamW, {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, {"amsgrad": False},
                    True, _adam_state, _adam_update(True), _adam_reference(True)),
    "adam": Family("adam", torch.optim.Adam, {**_ADAM_DEFAULTS, "weight_decay": 0.0},
                   {"amsgrad": False, "decoupled_weight_decay": False}, True, _adam_state,
                   _adam_update(False), _adam_reference(False)),
    "adagrad": Family("adagrad", torch.optim.Adagrad, {"lr_decay": 0.0, "weight_decay": 0.0,
                                                       "initial_accumulator_value": 0.0, "eps": 1e-10,
                                                       "maximize": False},
                      {}, True, lambda options: ("sum",), _adagrad_update, _adagrad_reference),
    "sgd": Family("sgd", torch.optim.SGD, {"momentum": 0.0, "dampening": 0.0, "nesterov": False,
                                           "weight_decay": 0.0, "maximize": False},
                  {}, False, _sgd_state, _sgd_update, _sgd_reference),
}
