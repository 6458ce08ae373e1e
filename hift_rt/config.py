"""HiFTConfig: everything `hift_rt.wrap` takes, validated once, in one object that `wrap`, the
optimizer and the Hugging Face Trainer integration share.

Owns the argument checks, the resolution of `optim=` (a fused family from hift_rt.families or a
torch.optim.Optimizer subclass, not one that cuts a model into groups itself: HiFTOptimizer says
so by its `runs_groups_itself`) and the dtype/offload policy; may call hift_rt.families and
hift_rt.rotation (for the strategy names) only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed

from .families import FAMILIES, STATE_DTYPES, Family
from .rotation import STRATEGIES

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LR_POLICIES = ("cycle", "step")
MASTER_WEIGHTS = ("auto", True, False, "fp32", "kahan")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def name_matcher(no_decay) -> Optional[Callable[[str], bool]]:
    """`no_decay` as a function name -> bool: None, a function, or name substrings."""
    if no_decay is None or callable(no_decay):
        return no_decay
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    if not isinstance(no_decay, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in no_decay):
        raise TypeError(f"no_decay must be None, a function name -> bool, or parameter-name substrings "
                        f"(a string or a list of strings), got {no_decay!r}")
    substrings = tuple(no_decay)
    return lambda name: any(s in name for s in substrings)


@dataclass
class HiFTConfig:
    """The settings of one HiFT set-up; see `hift_rt.wrap` for what each means.

    `hyperparameters` are the optimizer's own options (torch's names); after construction
    `family` (fused) or `torch_class`, `options` (validated hyperparameters) and `optim_name` say
    what runs, and `no_decay` is a function name -> bool (or None).
    """
    lr: float
    optim: Union[str, type] = "adamw"
    strategy: str = "bottom_up"
    units_per_group: int = 1
    groups: Optional[Sequence[Sequence[str]]] = None
    offload: Union[str, bool] = "auto"
    lr_policy: str = "step"
    max_grad_norm: Optional[float] = None
    no_decay: Union[None, str, Sequence[str], Callable[[str], bool]] = None
    master_weights: Union[str, bool] = "auto"
    state_dtype: str = "fp32"
    seed: int = 0
    state_window: Union[str, int, None] = "auto"
    process_group: object = None
    hyperparameters: dict = field(default_factory=dict)

    family: Optional[Family] = field(init=False, default=None)
    torch_class: Optional[type] = field(init=False, default=None)
    options: dict = field(init=False, default_factory=dict)
    optim_name: str = field(init=False, default="")

    @classmethod
    def from_arguments(cls, optim: Union[str, type] = "adamw", **arguments) -> "HiFTConfig":
        """wrap()'s arguments: the config's fields by name, every other keyword an optimizer
        hyperparameter."""
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "hyperparameters"}
        if "lr" not in arguments:
            raise TypeError("hift_rt.wrap needs lr=")
        known = {k: v for k, v in arguments.items() if k in names}
        return cls(optim=optim, hyperparameters={k: v for k, v in arguments.items() if k not in names}, **known)

    def __post_init__(self):
        if not _finite_number(self.lr) or self.lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        self.lr = float(self.lr)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.lr_policy not in LR_POLICIES:
            raise ValueError(f"lr_policy must be 'cycle' or 'step', got {self.lr_policy!r}")
        if self.offload not in ("auto", True, False):
            raise ValueError(f"offload must be 'auto', True or False, got {self.offload!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)}, got {self.state_dtype!r}")
        if self.max_grad_norm is not None and not (_finite_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {self.max_grad_norm!r}")
        if isinstance(self.units_per_group, bool) or not isinstance(self.units_per_group, int) or self.units_per_group < 1:
            raise ValueError(f"units_per_group must be a positive int, got {self.units_per_group!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -2 ** 63 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")
        window = self.state_window
        if not (window in ("auto", None) or isinstance(window, int) and not isinstance(window, bool) and window > 0):
            raise ValueError(f"state_window must be 'auto', None (the whole group) or a byte count > 0, got {window!r}")
        if self.process_group is not None and self.process_group is not False and \
                not isinstance(self.process_group, torch.distributed.ProcessGroup):
            raise ValueError(f"process_group must be None (the default group when torch.distributed is "
                             f"initialized), False (none) or a ProcessGroup, got {self.process_group!r}")
        self.no_decay = name_matcher(self.no_decay)
        self._resolve_optim()

    def _resolve_optim(self) -> None:
        optim = self.optim
        if isinstance(optim, str) and optim in FAMILIES:
            self.family = FAMILIES[optim]
            self.options = self.family.options(self.hyperparameters)
            self.optim_name = optim
        elif isinstance(optim, type) and getattr(optim, "runs_groups_itself", False):
            raise ValueError(f"optim={optim.__qualname__} cuts the model into groups itself; give the optimizer "
                             f"each group runs: one of {sorted(FAMILIES)} or a torch.optim.Optimizer subclass")
        elif isinstance(optim, type) and issubclass(optim, torch.optim.Optimizer):
            self.torch_class = optim
            self.options = dict(self.hyperparameters)
            self.optim_name = f"{optim.__module__}.{optim.__qualname__}"
        else:
            raise ValueError(f"unknown optim {optim!r}: expected one of {sorted(FAMILIES)} "
                             "or a torch.optim.Optimizer subclass")

    def memory_policy(self, device: torch.device, dtype: torch.dtype) -> Tuple[Optional[str], bool]:
        """(master, offload) for parameters of `dtype` on `device`: master is None (the
        parameters are their own master), "fp32" (an fp32 copy) or "kahan" (a compensation
        buffer in the parameters' dtype); offload says whether inactive groups' state lives in
        host memory."""
        if not dtype.is_floating_point:
            raise ValueError(f"parameters are {dtype}; only floating-point parameters can be trained")
        if self.family is not None and dtype not in FUSED_DTYPES:
            raise ValueError(f"parameters are {dtype}; the fused kernels take float32, bfloat16 or float16")
        master = self.master_weights
        if master == "auto":
            master = "fp32" if dtype != torch.float32 else None
        elif master is True:
            master = "fp32"
        elif master is False:
            master = None
        if master is not None and dtype == torch.float32:
            raise ValueError(f"master_weights={self.master_weights!r} needs bfloat16 or float16 parameters; "
                             "float32 parameters are their own master")
        if self.torch_class is not None and (master == "kahan" or self.state_dtype != "fp32"):
            raise ValueError(f"optim={self.optim_name}: master_weights='kahan' and state_dtype other than "
                             "'fp32' need a fused optimizer ('adamw', 'adam', 'adagrad', 'sgd')")
        offload = device.type == "cuda" if self.offload == "auto" else self.offload
        return master, bool(offload)

    def window_bytes(self, device: torch.device, total_memory: Optional[int] = None) -> Optional[int]:
        """The device bytes an offloaded group's state may stream through (None: the whole group).

        "auto": on CUDA 1/64 of the card's memory (`total_memory`, by default the card's own), at
        least 64 MiB and at most 1 GiB (256 MiB on a 16 GB card, 384 MiB on 24 GB, 1 GiB on 80 GB
        and more); a group whose state fits keeps it whole. Elsewhere the whole group (the host
        backend has no device memory to save).
        """
        if self.state_window != "auto":
            return self.state_window
        if device.type != "cuda":
            return None
        if total_memory is None:
            total_memory = torch.cuda.get_device_properties(device).total_memory
        return min(max(total_memory // 64, 64 << 20), 1 << 30)
