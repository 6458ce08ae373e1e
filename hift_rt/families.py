"""The fused optimizer families: torch's option names and defaults, the fp32 state each keeps per
element (in the order it sits in a group's state blob), and the call into hift_rt.kernels.

A family's options are exactly torch.optim's; an option we do not support raises, it is never
ignored. Implementation switches of torch (`foreach`, `fused`, `capturable`, `differentiable`)
are accepted only at their "no preference" values: hift_rt always runs its own fused kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .kernels import adagrad_update, adamw_update, sgd_update

_IMPLEMENTATION_SWITCHES = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}


@dataclass(frozen=True)
class Family:
    name: str
    defaults: Dict[str, object]
    unsupported: Dict[str, object]  # option -> the only value we accept
    has_step: bool  # torch keeps a "step" entry in this optimizer's per-parameter state
    state_names: Callable[[dict], Tuple[str, ...]]
    update: Callable[..., None]

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


def check_options(name: str, options: dict) -> None:
    """The kernels check these too, at every step; checking at wrap reports a typo at once."""
    for key in ("eps", "weight_decay", "momentum", "dampening", "lr_decay"):
        if key in options and not float(options[key]) >= 0.0:
            raise ValueError(f"optim={name!r}: {key} must be >= 0, got {options[key]!r}")
    if "betas" in options:
        if len(options["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in options["betas"]):
            raise ValueError(f"optim={name!r}: betas must be two numbers in [0, 1), got {options['betas']!r}")
    if options.get("nesterov") and (options["momentum"] <= 0 or options["dampening"] != 0):
        raise ValueError(f"optim={name!r}: nesterov needs momentum > 0 and dampening = 0")


def _adam_state(options):
    return ("exp_avg", "exp_avg_sq")


def _adam_update(decoupled):
    def update(param, grad, state, *, step, lr, options, decay_end, master, clip_coef):
        adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                     betas=options["betas"], eps=options["eps"], weight_decay=options["weight_decay"],
                     decoupled=decoupled, maximize=options["maximize"], decay_end=decay_end,
                     master=master, clip_coef=clip_coef)
    return update


def _adagrad_update(param, grad, state, *, step, lr, options, decay_end, master, clip_coef):
    adagrad_update(param, grad, state["sum"], step=step, lr=lr, lr_decay=options["lr_decay"],
                   weight_decay=options["weight_decay"], eps=options["eps"], maximize=options["maximize"],
                   decay_end=decay_end, master=master, clip_coef=clip_coef)


def _sgd_state(options):
    return ("momentum_buffer",) if options["momentum"] != 0 else ()


def _sgd_update(param, grad, state, *, step, lr, options, decay_end, master, clip_coef):
    buffer: Optional[torch.Tensor] = state.get("momentum_buffer")
    if options["momentum"] != 0 and buffer is None:
        raise ValueError("optim='sgd': momentum was 0 at wrap (no momentum buffer was allocated); "
                         "it cannot be switched on afterwards")
    sgd_update(param, grad, buffer, lr=lr, momentum=options["momentum"], dampening=options["dampening"],
               nesterov=options["nesterov"], weight_decay=options["weight_decay"], maximize=options["maximize"],
               first_step=step == 1, decay_end=decay_end, master=master, clip_coef=clip_coef)


_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "maximize": False}
FAMILIES = {
    "adamw": Family("adamw", {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, {"amsgrad": False}, True,
                    _adam_state, _adam_update(True)),
    "adam": Family("adam", {**_ADAM_DEFAULTS, "weight_decay": 0.0}, {"amsgrad": False, "decoupled_weight_decay": False},
                   True, _adam_state, _adam_update(False)),
    "adagrad": Family("adagrad", {"lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
                                  "eps": 1e-10, "maximize": False}, {}, True, lambda o: ("sum",), _adagrad_update),
    "sgd": Family("sgd", {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0,
                          "maximize": False}, {}, False, _sgd_state, _sgd_update),
}


def initial_state_value(name: str, options: dict) -> float:
    """What a state buffer holds before the first update (Adagrad's initial accumulator)."""
    return float(options["initial_accumulator_value"]) if name == "sum" else 0.0
