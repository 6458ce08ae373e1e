"""The fused optimizer families, described once: for each `optim=` name, torch's option names and
defaults, the torch.optim class whose single-tensor loop it reproduces, the state it keeps per
element, the buffers that state occupies in each format (fields), the calls into
hift_rt.kernels (the update and its float64 reference), and the conversions of a state between
formats. The runtime, the kernel tests and the runtime tests all read this table.

A family's options are exactly torch.optim's; an option we do not support raises, it is never
ignored. Implementation switches of torch (`foreach`, `fused`, `capturable`, `differentiable`)
are accepted only at their "no preference" values: hift_rt always runs its own fused kernels.

Formats. `state_dtype` "fp32" (torch's), "bf16" or "int8" stores every moment of a family
(AdamW/Adam exp_avg and exp_avg_sq, Adagrad sum, SGD momentum_buffer) as (n,) fp32, (n,) bf16, or
(n,) uint8 codes plus "<name>_absmax" (n / Q,) fp32 (hift_rt.kernels.quantization; the first
moment and the momentum take the signed code, exp_avg_sq and sum the unsigned one). A bf16/fp16
param may add `master` "fp32" (field "master", (n,) fp32) or "kahan" (field "compensation", (n,)
in the param's dtype); without either its updates are lossy (see hift_rt/kernels/_common.py).

This module may call hift_rt.kernels only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .kernels import (
    Q, adagrad_ref, adagrad_update, adamw_ref, adamw_update, dequantize, quantize, sgd_ref,
    sgd_update,
)

IMPLEMENTATION_SWITCHES = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}

State = Dict[str, torch.Tensor]

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}
MASTERS = (None, "fp32", "kahan")
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Which moments take the signed int8 code (they change sign) and which the unsigned one.
SIGNED = {"exp_avg": True, "exp_avg_sq": False, "sum": False, "momentum_buffer": True}


@dataclass(frozen=True)
class Field:
    """One flat buffer of a group's state: `name`, `dtype`, and one element per `per` parameter
    elements (1, or Q for an int8 moment's absmax)."""
    name: str
    dtype: torch.dtype
    per: int


def bytes_per_element(fields: List[Field]) -> float:
    """Bytes the fields hold per parameter element, e.g. 4.0625 for AdamW int8 + kahan (bf16)."""
    return sum(torch.empty((), dtype=f.dtype).element_size() / f.per for f in fields)


def slice_state(state: State, fields: List[Field], start: int, end: int) -> State:
    """Views of elements [start, end) of every field: [start // per, end // per) of each. With
    per > 1 fields (int8 absmax) start and end must be multiples of per, so that the chunk holds
    whole blocks; the kernels cannot see where a chunk starts, so this is where it is checked."""
    for field in fields:
        if field.per > 1 and (start % field.per or end % field.per):
            raise ValueError(f"{field.name}: the chunk [{start}, {end}) must start and end on a multiple "
                             f"of {field.per} elements (whole int8 blocks)")
    return {f.name: state[f.name][start // f.per:end // f.per] for f in fields}


@dataclass(frozen=True)
class Family:
    """One fused optimizer.

    update(param, grad, state, *, step, lr, options, decay_end, master, clip_coef): one step over
        flat (n,) buffers in place; `state` maps each field of fields(...) to its buffer (fp32
        moments by default; "master" / "compensation" may be in `state` or master= be given);
        `step` counts updates including this one; `options` are torch's (see defaults).
    reference(param, grad, state, *, step, lr, options, decay_end, clip_coef) -> (weight, state):
        the same step in float64 on the same fields, inputs untouched: the new weight and the
        new moments (keyed by state_names) before any rounding or quantization.
    """
    name: str
    torch_class: type
    defaults: Dict[str, object]
    unsupported: Dict[str, object]  # option -> the only value we accept
    has_step: bool  # torch keeps a "step" entry in this optimizer's per-parameter state
    moments: Tuple[str, ...]  # every moment it may keep; state_names picks those its options use
    state_names: Callable[[dict], Tuple[str, ...]]
    _kernel: Callable[..., None]  # (param, grad, state, *, step, lr, options, **weights...)
    _reference: Callable[..., Tuple[torch.Tensor, State]]  # same, float64 values

    def options(self, given: dict) -> dict:
        """torch's defaults overridden by `given`, after rejecting what we cannot honour."""
        allowed = {**IMPLEMENTATION_SWITCHES, **self.unsupported}
        unknown = sorted(set(given) - set(self.defaults) - set(allowed))
        if unknown:
            raise ValueError(f"optim={self.name!r} has no option(s) {unknown}; "
                             f"supported: {sorted(self.defaults)}")
        _refuse_other_values(self.name, given, allowed)
        options = {**self.defaults, **{k: v for k, v in given.items() if k in self.defaults}}
        if "betas" in options:
            options["betas"] = tuple(float(b) for b in options["betas"])
        check_options(self.name, options)
        return options

    def check_loaded_options(self, saved: dict) -> None:
        """A saved param_group (ours or torch's) must not carry a math option we do not run
        (e.g. torch's amsgrad=True); implementation switches (foreach, fused) do not change the
        math and are not checked."""
        _refuse_other_values(self.name, saved, self.unsupported)

    def initial_state(self, n: int, device, options: dict) -> State:
        """The state before the first update, (n,) fp32 each: zeros, Adagrad's sum at its
        initial_accumulator_value (to_format converts it to another format)."""
        return {name: torch.full((n,), float(options["initial_accumulator_value"]) if name == "sum" else 0.0,
                                 dtype=torch.float32, device=device)
                for name in self.state_names(options)}

    def fields(self, options: dict, state_dtype: str = "fp32", master: Optional[str] = None,
               param_dtype: torch.dtype = torch.float32) -> List[Field]:
        """The buffers of a group's state in the order they sit: each moment (then its absmax
        for int8), then "master" (master="fp32") or "compensation" (master="kahan")."""
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype: expected one of {sorted(STATE_DTYPES)}, got {state_dtype!r}")
        if master not in MASTERS:
            raise ValueError(f"master: expected one of {MASTERS}, got {master!r}")
        if master is not None and param_dtype not in LOW_PRECISION:
            raise ValueError(f"master: {master!r} is only for bf16/fp16 params, got {param_dtype} "
                             f"(an fp32 param is its own master)")
        fields = []
        for name in self.state_names(options):
            fields.append(Field(name, STATE_DTYPES[state_dtype], 1))
            if state_dtype == "int8":
                fields.append(Field(name + "_absmax", torch.float32, Q))
        if master == "fp32":
            fields.append(Field("master", torch.float32, 1))
        elif master == "kahan":
            fields.append(Field("compensation", param_dtype, 1))
        return fields

    def update(self, param, grad, state: State, *, step, lr, options, decay_end=None, master=None,
               clip_coef=None) -> None:
        moments, weights = self._split(state, master)
        self._kernel(param, grad, moments, step=step, lr=lr, options=options, decay_end=decay_end,
                     clip_coef=clip_coef, **weights)

    def reference(self, param, grad, state: State, *, step, lr, options, decay_end=None,
                  clip_coef=None) -> Tuple[torch.Tensor, State]:
        values = self.to_fp32(state, _fields_of(state), param, dtype=torch.float64)
        weight = values.pop("master", param.double())
        return self._reference(weight, grad, values, step=step, lr=lr, options=options,
                               decay_end=decay_end, clip_coef=clip_coef)

    def to_format(self, state_fp32: State, fields: List[Field], param) -> State:
        """A state in the format of `fields` from fp32 moments (n,) and, optionally, an fp32
        "master" (n,) (absent: the param's value). Moments are copied, rounded to bf16, or
        quantized; the compensation is round(master - param). New tensors, on param's device."""
        def fp32(tensor):
            return tensor.to(device=param.device, dtype=torch.float32, copy=True)

        state = {}
        master = fp32(param if "master" not in state_fp32 else state_fp32["master"])
        for field in fields:
            if field.name == "master":
                state["master"] = master
            elif field.name == "compensation":
                state["compensation"] = (master - param.float()).to(field.dtype)
            elif field.dtype == torch.uint8:
                _check_blocks(field.name, param)
                state[field.name], state[field.name + "_absmax"] = quantize(
                    fp32(state_fp32[field.name]), SIGNED[field.name])
            elif field.per == 1:
                state[field.name] = fp32(state_fp32[field.name]).to(field.dtype)
        return state

    def to_fp32(self, state: State, fields: List[Field], param, dtype=torch.float32) -> State:
        """The fp32 moments (n,) of a state in the format of `fields`, plus "master" when the
        format has one: the master itself, or param + compensation (kahan). New tensors;
        dtype=torch.float64 gives exact values (for references)."""
        values = {}
        for field in fields:
            if field.name == "master":
                values["master"] = state["master"].to(dtype, copy=True)
            elif field.name == "compensation":
                values["master"] = param.to(dtype) + state["compensation"].to(dtype)
            elif field.dtype == torch.uint8:
                values[field.name] = dequantize(state[field.name], state[field.name + "_absmax"].to(dtype),
                                                SIGNED[field.name])
            elif field.per == 1:
                values[field.name] = state[field.name].to(dtype, copy=True)
        return values

    def _split(self, state: State, master):
        """(moments and absmax, weights keywords) of an update's `state`."""
        weights = {"master": master, "compensation": state.get("compensation")}
        if "master" in state:
            if master is not None:
                raise ValueError("master: given both in state and as master=")
            weights["master"] = state["master"]
        moments = {k: v for k, v in state.items() if k not in ("master", "compensation")}
        names = set(self.moments)
        unknown = sorted(set(moments) - names - {n + "_absmax" for n in names})
        if unknown:
            raise ValueError(f"state: optim={self.name!r} has no field(s) {unknown}")
        return moments, weights


def _fields_of(state: State) -> List[Field]:
    """The fields a state holds, read from its keys and dtypes."""
    return [Field(name, t.dtype, Q if name.endswith("_absmax") else 1) for name, t in state.items()]


def _check_blocks(name, param):
    if param.numel() % Q != 0:
        raise ValueError(f"{name}: the int8 format needs a multiple of {Q} elements, got {param.numel()}")


def _refuse_other_values(name: str, given: dict, allowed: Dict[str, object]) -> None:
    """ValueError for an option in `allowed` set to anything but its one accepted value."""
    for key, only in allowed.items():
        if key in given and given[key] != only and not (only is None and given[key] is False):
            raise ValueError(f"optim={name!r}: {key}={given[key]!r} is not supported by hift_rt "
                             f"(it runs its own fused kernels); leave {key} at {only!r}")


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


# ---- the calls into hift_rt.kernels, per family ------------------------------------------------

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _adam_state(options):
    return _ADAM_MOMENTS


def _adam_kernel(decoupled):
    def update(param, grad, state, *, step, lr, options, **common):
        adamw_update(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                     betas=options["betas"], eps=options["eps"], weight_decay=options["weight_decay"],
                     decoupled=decoupled, maximize=options["maximize"],
                     exp_avg_absmax=state.get("exp_avg_absmax"),
                     exp_avg_sq_absmax=state.get("exp_avg_sq_absmax"), **common)
    return update


def _adam_reference(decoupled):
    def reference(weight, grad, state, *, step, lr, options, decay_end, clip_coef):
        p, m, v = adamw_ref(weight, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr,
                            betas=options["betas"], eps=options["eps"], weight_decay=options["weight_decay"],
                            decoupled=decoupled, maximize=options["maximize"], decay_end=decay_end,
                            clip_coef=clip_coef)
        return p, {"exp_avg": m, "exp_avg_sq": v}
    return reference


def _adagrad_kernel(param, grad, state, *, step, lr, options, **common):
    adagrad_update(param, grad, state["sum"], step=step, lr=lr, lr_decay=options["lr_decay"],
                   weight_decay=options["weight_decay"], eps=options["eps"], maximize=options["maximize"],
                   state_sum_absmax=state.get("sum_absmax"), **common)


def _adagrad_reference(weight, grad, state, *, step, lr, options, decay_end, clip_coef):
    p, s = adagrad_ref(weight, grad, state["sum"], step=step, lr=lr, lr_decay=options["lr_decay"],
                       weight_decay=options["weight_decay"], eps=options["eps"], maximize=options["maximize"],
                       decay_end=decay_end, clip_coef=clip_coef)
    return p, {"sum": s}


def _sgd_state(options):
    return ("momentum_buffer",) if options["momentum"] != 0 else ()


def _sgd_kernel(param, grad, state, *, step, lr, options, **common):
    buffer: Optional[torch.Tensor] = state.get("momentum_buffer")
    if options["momentum"] != 0 and buffer is None:
        raise ValueError("optim='sgd': momentum was 0 at wrap (no momentum buffer was allocated); "
                         "it cannot be switched on afterwards")
    sgd_update(param, grad, buffer, lr=lr, momentum=options["momentum"], dampening=options["dampening"],
               nesterov=options["nesterov"], weight_decay=options["weight_decay"], maximize=options["maximize"],
               first_step=step == 1, momentum_buffer_absmax=state.get("momentum_buffer_absmax"), **common)


def _sgd_reference(weight, grad, state, *, step, lr, options, decay_end, clip_coef):
    p, b = sgd_ref(weight, grad, state.get("momentum_buffer"), lr=lr, momentum=options["momentum"],
                   dampening=options["dampening"], nesterov=options["nesterov"],
                   weight_decay=options["weight_decay"], maximize=options["maximize"], first_step=step == 1,
                   decay_end=decay_end, clip_coef=clip_coef)
    return p, ({} if b is None else {"momentum_buffer": b})


_ADAM_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8, "maximize": False}
FAMILIES = {
    "adamw": Family("adamw", torch.optim.AdamW, {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, {"amsgrad": False},
                    True, _ADAM_MOMENTS, _adam_state, _adam_kernel(True), _adam_reference(True)),
    "adam": Family("adam", torch.optim.Adam, {**_ADAM_DEFAULTS, "weight_decay": 0.0},
                   {"amsgrad": False, "decoupled_weight_decay": False}, True, _ADAM_MOMENTS, _adam_state,
                   _adam_kernel(False), _adam_reference(False)),
    "adagrad": Family("adagrad", torch.optim.Adagrad, {"lr_decay": 0.0, "weight_decay": 0.0,
                                                       "initial_accumulator_value": 0.0, "eps": 1e-10,
                                                       "maximize": False},
                      {}, True, ("sum",), lambda options: ("sum",), _adagrad_kernel, _adagrad_reference),
    "sgd": Family("sgd", torch.optim.SGD, {"momentum": 0.0, "dampening": 0.0, "nesterov": False,
                                           "weight_decay": 0.0, "maximize": False},
                  {}, False, ("momentum_buffer",), _sgd_state, _sgd_kernel, _sgd_reference),
}
