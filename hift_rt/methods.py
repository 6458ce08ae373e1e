"""Ways of fine-tuning a model, one class each, in one registry (`METHODS`, name -> class) shared by
the finetune job (hift_rt/job/, `--compare`), the finetune benchmark (hift_rt/bench/finetune.py)
and the fidelity benchmark (hift_rt/bench/fidelity.py):

  full            torch.optim.AdamW over every trainable parameter (fused on CUDA); under
                  torch.distributed (initialized, more than one rank) in DistributedDataParallel
  lora            peft LoRA r=16 on every linear layer of a Llama-style block, trained with full
  layerwise-sync  the HiFT reference code's way: one group trainable per step, top-down, its AdamW
                  state moved to the device before the step and back to the CPU after it, with
                  synchronous copies (one process)
  hift            hift_rt.wrap (data parallel under torch.distributed, as wrap's process_group=None)

and the peers a user would pick instead of hift to save memory, each with its authors' published
settings (quoted in its docstring) and, where one is on PyPI, the package that implements it (the
`[peers]` extra; a missing package makes `unavailable()` say which, and building the method raise
`Unavailable`). They run in one process.

  badam           BAdam: badam's BlockOptimizer around torch AdamW, one layer trained at a time
  lisa            LISA, written from the paper (no package): embeddings and head always trained,
                  a few middle layers drawn at random every K steps
  galore          GaLore AdamW (galore-torch): attention and MLP gradients projected to rank r
  apollo          APOLLO AdamW (apollo-torch): channel-wise scaling from a random rank-r projection
  adam-mini       Adam-mini (adam-mini): one second moment per head, neuron or block
  adalomo         AdaLomo (lomo-optim): factored second moments, the update fused into backward
  adamw8bit       bitsandbytes' AdamW8bit: blockwise 8-bit moments

A method takes a model that the caller built (device and dtype as it wants) and owns the
optimizer over it. One training step is

    method.before_forward(step)            # which parameters train in this step
    loss = method.model(...).loss           # the caller's forward (autocast, accumulation, ...)
    method.backward(loss)                   # once per accumulated micro-batch (adalomo: once)
    method.update()                         # clip, optimizer step, zero the gradients

`method.optimizer` is the torch.optim.Optimizer whose `param_groups` LR schedulers drive;
`groups` is the number of steps in which every block is visited once (1 for the methods that
train all their parameters every step); the parameters a step trains are those with
`requires_grad` after `before_forward`. `Settings.options` are a method's own options (`OPTIONS`
lists them with their defaults; hift passes its options to wrap).

Memory, `breakdown()`: bytes counted from the tensors, not from formulas. `weights`; and at the
peak so far of gradients + optimizer state on the device, the instant each method holds both
(right after its optimizer's update, before the gradients are released; adalomo: at every
gradient hook of the backward): `gradients` (the distinct storages of every `.grad`, plus the
copies a package keeps elsewhere: BAdam's fp32 gradients), `state_device` and `state_host` (every
tensor in the optimizer's state but step counters, and the tensors a package keeps in objects or
elsewhere: GaLore's and APOLLO's projections, BAdam's fp32 master copy of the active block,
AdaLomo's factored moments). A view counts its whole storage: what it keeps alive. hift: the
runtime's exact count (`memory_breakdown()`). Workspace an update allocates and frees is not
counted for any method.

Biases and norms get no weight decay in every method (`Settings.no_decay`, name substrings), as
Hugging Face's Trainer does (BAdam and Adam-mini: by their own rules). With
`Settings.efficient_loss` every method's model computes its loss through
hift_rt.efficient_lm_loss (no full logits), applied when the method is built and removed by
`close()`. Owns: the methods and their registry. May call: hift_rt.wrap and the optimizer's
public API, hift_rt.efficient_lm_loss, hift_rt.grouping, torch.optim, torch.distributed (DDP),
peft, badam, galore_torch, apollo_torch, adam_mini, lomo_optim, bitsandbytes.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import grouping
from .config import name_matcher
from .loss import efficient_lm_loss

NamedParams = List[Tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class Settings:
    """Hyperparameters every method reads; `optim`..`master_weights` are hift's own (wrap's
    arguments of those names); `options` a method's own (its OPTIONS; hift: more of wrap's)."""
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None   # None: no clipping
    no_decay: Tuple[str, ...] = ("bias", "norm")
    optim: str = "adamw"
    strategy: str = "bottom_up"
    units_per_group: int = 1
    offload: Union[str, bool] = "auto"
    seed: int = 0
    state_dtype: str = "fp32"
    master_weights: Union[str, bool] = "auto"
    state_window: Union[str, int, None] = "auto"
    efficient_loss: bool = False            # the model's loss through hift_rt.efficient_lm_loss
    options: Tuple[Tuple[str, object], ...] = ()


class Unavailable(RuntimeError):
    """The package that implements a method is not installed."""


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: views of one buffer count it once, whole."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _tensors_in(value) -> List[torch.Tensor]:
    """The tensors of one optimizer-state entry: a tensor, a list of them, or an object (a
    package's projector) holding them as attributes."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if torch.is_tensor(v)]
    if hasattr(value, "__dict__"):  # its own tensors only: an object it refers to is not its state
        return [t for v in vars(value).values() if torch.is_tensor(v) or isinstance(v, (list, tuple))
                for t in _tensors_in(v)]
    return []


def optimizer_state(opt: torch.optim.Optimizer, params: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """The state tensors of `params` (default: every parameter with state), step counters left out."""
    states = opt.state.values() if params is None else [opt.state.get(p, {}) for p in params]
    return [t for state in states for key, value in state.items() if key != "step" for t in _tensors_in(value)]


def _decay_groups(named: NamedParams, settings: Settings) -> List[dict]:
    """Param groups: the decayed parameters, then the others with weight_decay 0 (empty ones left out)."""
    exempt = name_matcher(settings.no_decay)  # the rule hift_rt.wrap applies
    decay = [p for n, p in named if not exempt(n)]
    rest = [p for n, p in named if exempt(n)]
    return [g for g in ({"params": decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


def _adamw(named: NamedParams, settings: Settings) -> torch.optim.AdamW:
    """torch's AdamW with the decayed parameters in param group 0 and the others in group 1."""
    device = named[0][1].device
    return torch.optim.AdamW(_decay_groups(named, settings), lr=settings.lr, weight_decay=settings.weight_decay,
                             fused=device.type == "cuda")


def _data_parallel_world() -> int:
    """Ranks of the initialized torch.distributed default group (1 when there is none)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Method:
    """The protocol in the module docstring; subclasses set `optimizer` and `update()`."""

    name = ""
    groups = 1
    accumulates = True            # backward() may run several times per update (micro-batches)
    package: Optional[str] = None  # the PyPI package that implements it
    module: Optional[str] = None   # its import name
    OPTIONS: Dict[str, object] = {}
    optimizer: torch.optim.Optimizer

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this method cannot run here (its package is not installed), or None."""
        if cls.module is None or importlib.util.find_spec(cls.module) is not None:
            return None
        return f"needs the package {cls.package} (pip install 'hift_rt[peers]')"

    @classmethod
    def check_options(cls, options: dict) -> None:
        """ValueError naming an option this method does not have."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"{cls.name} has no option {', '.join(unknown)} "
                             f"(its options: {', '.join(cls.OPTIONS) or 'none'})")

    def __init__(self, model: nn.Module, settings: Settings):
        missing = self.unavailable()
        if missing:
            raise Unavailable(f"{self.name} {missing}")
        self.check_options(dict(settings.options))
        self.options = {**self.OPTIONS, **dict(settings.options)}
        self.model, self.settings = model, settings
        self.efficient_loss = efficient_lm_loss(model) if settings.efficient_loss else None
        self._peak = {"gradients": 0, "state_device": 0, "state_host": 0}
        # Seconds spent counting memory (wall clock and this process's CPU time): the benchmarks and
        # the job take them out of the step times they report, so the count does not weigh on the
        # methods that are counted inside their steps (every one but hift, whose runtime keeps its
        # own figures).
        self.accounting = {"wall": 0.0, "cpu": 0.0}
        self._handles = []

    def before_forward(self, step: int) -> None:
        """Called before the forward pass of optimizer step `step` (0-based)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        raise NotImplementedError

    def _clip_step_zero(self, params: Sequence[torch.Tensor]) -> None:
        """Clip `params`' gradients (those that have one) to max_grad_norm, step, zero the gradients."""
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- memory ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _gradient_tensors(self) -> List[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _state_tensors(self) -> List[torch.Tensor]:
        return optimizer_state(self.optimizer)

    def _count(self, incoming: Sequence[torch.Tensor] = ()) -> dict:
        """Gradients (plus `incoming`, a gradient a hook is handed) and state alive now, in bytes."""
        device = self._device()
        state = self._state_tensors()
        return {"gradients": distinct_bytes(self._gradient_tensors() + list(incoming)),
                "state_device": distinct_bytes(t for t in state if t.device == device),
                "state_host": distinct_bytes(t for t in state if t.device != device)}

    def _record(self, incoming: Sequence[torch.Tensor] = ()) -> None:
        """Count now and keep the peak of gradients + state on the device (and of host state)."""
        wall, cpu = time.perf_counter(), time.process_time()
        now = self._count(incoming)
        if now["gradients"] + now["state_device"] > self._peak["gradients"] + self._peak["state_device"]:
            self._peak.update(gradients=now["gradients"], state_device=now["state_device"])
        self._peak["state_host"] = max(self._peak["state_host"], now["state_host"])
        self.accounting["wall"] += time.perf_counter() - wall
        self.accounting["cpu"] += time.process_time() - cpu

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Count after every step of `optimizer`, before anything releases its gradients."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self._record()))

    def breakdown(self) -> dict:
        """Bytes: weights; gradients, state_device, state_host at the peak so far (module docstring)."""
        return {"weights": _bytes(self.model.parameters()), **self._peak}

    def transfers(self) -> dict:
        """The transfer engine's figures (hift with offload); empty for the others."""
        return {}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Release what the method holds beyond the model (hift: pinned memory, the engine) and
        give the model back its own loss."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.efficient_loss is not None:
            self.efficient_loss.remove()


class Full(Method):
    """Every trainable parameter, every step: torch AdamW, clip_grad_norm_ when max_grad_norm.
    Under torch.distributed with more than one rank `model` becomes DistributedDataParallel(model):
    each rank runs its micro-batch and the gradients are averaged over ranks, as hift_rt's are."""

    name = "full"

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(p.dtype == torch.float16 for _, p in self.named):
            raise ValueError("torch's AdamW cannot train float16 weights without fp32 master weights "
                             "(GradScaler refuses to unscale float16 gradients): use float32 or bfloat16")
        self.params = [p for _, p in self.named]
        self.optimizer = _adamw(self.named, settings)
        self._watch(self.optimizer)
        if _data_parallel_world() > 1:
            self.model = nn.parallel.DistributedDataParallel(model)

    def update(self) -> None:
        self._clip_step_zero(self.params)

    def close(self) -> None:
        """Also unwrap DistributedDataParallel: its reducer holds the process group, which must
        not outlive destroy_process_group (a gloo group torn down at interpreter exit can abort)."""
        super().close()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model = self.model.module


class Lora(Full):
    """peft LoRA (r=16, alpha=32) on the attention and MLP projections; `model` becomes the
    peft model, whose adapter weights Full trains."""

    name, package, module = "lora", "peft", "peft"
    TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __init__(self, model: nn.Module, settings: Settings):
        missing = self.unavailable()
        if missing:
            raise Unavailable(f"{self.name} {missing}")
        from peft import LoraConfig, get_peft_model

        super().__init__(get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(self.TARGETS))),
                         settings)


class LayerwiseSync(Full):
    """HiFT without a runtime: hift_rt.grouping's groups, visited top-down; one torch AdamW over
    all of them (each parameter keeps its own step count, so each group is updated as by its own
    AdamW); before a group's step its state is copied to the device and after it back to the CPU,
    synchronously. `max_grad_norm` clips the active group. Memory: the active group's state counts
    as on the device, the others' as in host memory (on a CPU run both are the CPU)."""

    name = "layerwise-sync"

    def __init__(self, model: nn.Module, settings: Settings):
        if _data_parallel_world() > 1:
            raise ValueError("LayerwiseSync runs in one process (its groups' requires_grad changes every step, "
                             "which DistributedDataParallel does not allow)")
        cut = grouping.cut(model, settings.units_per_group)  # the runtime's cut, with its warnings
        super().__init__(model, settings)
        self.group_params = [[p for _, p in g.params] for g in cut]
        self.groups = len(cut)
        self.device = self.params[0].device
        self.active: Optional[int] = None
        for p in self.params:
            p.requires_grad_(False)

    def _move_state(self, g: int, device) -> None:
        for p in self.group_params[g]:
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)

    def before_forward(self, step: int) -> None:
        g = self.groups - 1 - step % self.groups
        if g == self.active:
            return
        if self.active is not None:
            for p in self.group_params[self.active]:
                p.requires_grad_(False)
        for p in self.group_params[g]:
            p.requires_grad_(True)
        self._move_state(g, self.device)
        self.active = g

    def update(self) -> None:
        self._clip_step_zero(self.group_params[self.active])  # the other groups have no gradient: skipped
        self._move_state(self.active, "cpu")

    def _count(self, incoming: Sequence[torch.Tensor] = ()) -> dict:
        active = {id(p) for p in self.group_params[self.active]} if self.active is not None else set()
        return {"gradients": distinct_bytes(self._gradient_tensors()),
                "state_device": distinct_bytes(optimizer_state(self.optimizer, [p for p in self.params
                                                                                 if id(p) in active])),
                "state_host": distinct_bytes(optimizer_state(self.optimizer, [p for p in self.params
                                                                               if id(p) not in active]))}

    def close(self) -> None:
        super().close()
        for p in self.params:
            p.requires_grad_(True)


class HiFT(Method):
    """hift_rt.wrap(model, settings.optim, ...), `Settings.options` passed on to wrap (they take
    precedence over the fields); float16 weights get a GradScaler, whose scale the update kernel
    undoes."""

    name = "hift"

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Any: wrap checks its own arguments."""

    def __init__(self, model: nn.Module, settings: Settings):
        import hift_rt

        super().__init__(model, settings)
        arguments = dict(strategy=settings.strategy, units_per_group=settings.units_per_group,
                         offload=settings.offload, max_grad_norm=settings.max_grad_norm, no_decay=settings.no_decay,
                         seed=settings.seed, weight_decay=settings.weight_decay, state_dtype=settings.state_dtype,
                         master_weights=settings.master_weights, state_window=settings.state_window)
        arguments.update(self.options)
        self.optimizer = hift_rt.wrap(model, settings.optim, lr=settings.lr, **arguments)
        self.groups = len(self.optimizer.groups)
        device = next(p.device for p in model.parameters())
        fp16 = any(p.dtype == torch.float16 for p in model.parameters())
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)  # an inf/NaN step changes nothing, rotation included
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()

    def breakdown(self) -> dict:
        return self.optimizer.memory_breakdown()

    def transfers(self) -> dict:
        return self.optimizer.transfer_stats()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.scaler:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.scaler:
            self.scaler.load_state_dict(state["grad_scaler"])

    def close(self) -> None:
        super().close()
        self.optimizer.close()


# ---- the peers --------------------------------------------------------------------------------

class _Peer(Method):
    """A peer: one process; its trainable parameters `named` / `params`; update = clip the
    parameters that have gradients, step, zero. Not checkpointed (the job saves hift runs only),
    except where a subclass says otherwise."""

    def __init__(self, model: nn.Module, settings: Settings):
        if _data_parallel_world() > 1:
            raise ValueError(f"{self.name} runs in one process here (no data parallelism)")
        super().__init__(model, settings)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]

    def update(self) -> None:
        self._clip_step_zero(self.params)

    def state_dict(self) -> dict:
        raise NotImplementedError(f"{self.name}'s state is not checkpointed (the job saves hift runs only)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{self.name}'s state is not checkpointed (the job saves hift runs only)")


def _quarter_width(model: nn.Module, method: str) -> int:
    """hidden_size / 4: the rank GaLore's and APOLLO's READMEs use for every model size (128 for
    the 512-wide LLaMA-60M, 1024 for the 4096-wide LLaMA-7B)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not hidden:
        raise ValueError(f"{method}: the model has no config.hidden_size to take the rank from: give rank=")
    return max(1, hidden // 4)


def low_rank_targets(model: nn.Module) -> List[nn.Parameter]:
    """The weights GaLore's and APOLLO's training scripts project: those of the nn.Linear modules
    whose path contains "attn" or "mlp" (torchrun_main.py's target_modules_list), trainable."""
    return [module.weight for path, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(key in path for key in ("attn", "mlp"))
            and module.weight.requires_grad]


def _low_rank_groups(model: nn.Module, named: NamedParams, settings: Settings, low_rank: dict) -> List[dict]:
    targets = {id(p) for p in low_rank_targets(model)}
    regular = [(n, p) for n, p in named if id(p) not in targets]
    projected = [p for _, p in named if id(p) in targets]
    return _decay_groups(regular, settings) + ([{"params": projected, **low_rank}] if projected else [])


class BAdam(_Peer):
    """BAdam (Luo et al., arXiv 2404.02827): the package's BlockOptimizer around torch AdamW. The
    blocks are the transformer layers (the package's own partition, `infer_param_groups`); the
    active block trains for `switch_every` steps, then the next one in `switch_mode` order, and the
    optimizer state of the block left behind is dropped (`base_optimizer.state` is reset at each
    switch). The active block's weights get an fp32 master copy that AdamW updates (for fp32
    weights a second fp32 copy); its gradients are moved into fp32 copies before the update.

    Published settings (the package README, "Hyperparameter Suggestion"): "setting
    switch_block_every = min(max(n/(BD), 50), 100) usually yields fast convergence speed"
    (n training examples, B the batch, D blocks): 50 here, the rule's value whenever one pass
    over the data is at most 50·D steps; "switch_mode='random' (random reshuffling update
    order) ... The default is 'random'"; "By default, the embedding layer and language modeling
    head is not included in the training blocks" (include_embedding / include_lm_head).
    `switch_every=1` switches every step: the closest to HiFT, but dropping the state.
    The random order is drawn from torch's global generator (the package's way), which is this
    method's own, seeded with Settings.seed, while the package runs. BAdam exempts biases from
    weight decay but not norms (its test for a norm looks at the parameter, not its module)."""

    name, package, module = "badam", "badam", "badam"
    OPTIONS = {"switch_every": 50, "switch_mode": "random", "include_embedding": False, "include_lm_head": False}

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        from badam import BlockOptimizer

        self.base = _adamw(self.named, settings)
        self._rng = torch.Generator().manual_seed(settings.seed).get_state()
        with self._package(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="BAdam expect model")  # fp32 weights: by choice
            self.optimizer = BlockOptimizer(self.base, self.named, switch_block_every=self.options["switch_every"],
                                            switch_mode=self.options["switch_mode"],
                                            include_embedding=self.options["include_embedding"],
                                            include_lm_head=self.options["include_lm_head"], verbose=0)
        self.groups = self.optimizer.block_num
        self._watch(self.base)

    @contextlib.contextmanager
    def _package(self):
        """While BlockOptimizer runs: torch's global CPU generator is this method's own, and what
        the package prints (every switch) is dropped."""
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
            torch.set_rng_state(self._rng)
            yield
            self._rng = torch.get_rng_state()

    def update(self) -> None:
        with self._package():
            self._clip_step_zero(self.params)

    def _masters(self) -> List[torch.Tensor]:
        return list(self.optimizer.param_idx2hp.values())

    def _gradient_tensors(self) -> List[torch.Tensor]:
        return super()._gradient_tensors() + [p.grad for p in self._masters() if p.grad is not None]

    def _state_tensors(self) -> List[torch.Tensor]:
        return optimizer_state(self.base) + self._masters()


class LISA(_Peer):
    """LISA (Pan et al., arXiv 2403.17919, Algorithm 1), written from the paper (there is no
    package): the parameters outside the block stack (embeddings, final norm, head) always train;
    of the middle layers (hift_rt.grouping's blocks) `layers` are drawn uniformly without
    replacement every `interval` steps, the others frozen; one torch AdamW over everything, whose
    state of a layer that is frozen again is dropped (a layer drawn again keeps its state; the
    always-trained parameters keep theirs).

    Published settings: LMFlow, the authors' implementation, `lisa_activated_layers=2`,
    `lisa_interval_steps=20` (its defaults; the paper's γ = 2 sampling layers); the draws come from
    a generator seeded with Settings.seed. Checkpointed: the state holds the active layers and the
    generator."""

    name = "lisa"
    OPTIONS = {"layers": 2, "interval": 20}

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        layers, interval = self.options["layers"], self.options["interval"]
        self.blocks = [[p for _, p in unit.params] for unit in grouping.build_units(model) if unit.block]
        if not (isinstance(layers, int) and 1 <= layers <= len(self.blocks)):
            raise ValueError(f"lisa: layers must be a whole number from 1 to the model's {len(self.blocks)} layers, "
                             f"got {layers!r}")
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"lisa: interval must be a whole number of steps >= 1, got {interval!r}")
        self.optimizer = _adamw(self.named, settings)  # a parameter without a gradient is skipped
        self._watch(self.optimizer)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.active: List[int] = []
        for block in self.blocks:
            for p in block:
                p.requires_grad_(False)

    def _activate(self, drawn: List[int]) -> None:
        for i in set(self.active) - set(drawn):
            for p in self.blocks[i]:
                p.requires_grad_(False)
                p.grad = None
                self.optimizer.state.pop(p, None)
        for i in drawn:
            for p in self.blocks[i]:
                p.requires_grad_(True)
        self.active = drawn

    def before_forward(self, step: int) -> None:
        if step % self.options["interval"] == 0:
            order = torch.randperm(len(self.blocks), generator=self.generator)
            self._activate(sorted(order[:self.options["layers"]].tolist()))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "active": list(self.active),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._activate(list(state["active"]))
        self.generator.set_state(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        super().close()
        for block in self.blocks:
            for p in block:
                p.requires_grad_(True)


class GaLore(_Peer):
    """GaLore (Zhao et al., arXiv 2403.03507), the package's GaLoreAdamW: the gradient of every
    attention and MLP weight (low_rank_targets) is projected to rank r by the SVD of the gradient,
    recomputed every `update_proj_gap` steps, and Adam runs on the projection; the other
    parameters get plain AdamW (the package's, eps 1e-6).

    Published settings (the README's usage): `{'rank': 128, 'update_proj_gap': 200, 'scale': 0.25,
    'proj_type': 'std'}` for LLaMA-60M (width 512), `--rank 1024 --galore_scale 0.25` for
    LLaMA-7B: rank = width / 4 by default here. For fp32 weights the package keeps its projection
    as a slice of the SVD factor, whose whole storage stays alive (counted so)."""

    name, package, module = "galore", "galore-torch", "galore_torch"
    OPTIONS = {"rank": None, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        from galore_torch import GaLoreAdamW

        low_rank = {"rank": self.options["rank"] or _quarter_width(model, self.name),
                    "update_proj_gap": self.options["update_proj_gap"], "scale": self.options["scale"],
                    "proj_type": self.options["proj_type"]}
        self.optimizer = GaLoreAdamW(_low_rank_groups(model, self.named, settings, low_rank), lr=settings.lr,
                                     weight_decay=settings.weight_decay, no_deprecation_warning=True)
        self._watch(self.optimizer)


class Apollo(_Peer):
    """APOLLO (Zhu et al., arXiv 2412.05270), the package's APOLLOAdamW: Adam's moments of a
    random rank-r projection of each attention and MLP gradient (low_rank_targets) give a
    channel-wise scaling of the raw gradient, with Fira's norm-growth limiter; the other
    parameters get plain AdamW (eps 1e-6).

    Published settings (the README): "rank: 256 for APOLLO works well for 1B and 7B model",
    "num_rank: ... 1/4 of the original dim for APOLLO (same as Galore)" (rank = width / 4 here),
    `'proj': 'random'`, `scale_type: channel` ("APOLLO"), "scale 1: Default value for APOLLO",
    `'update_proj_gap': 200`, `'proj_type': 'std'`. APOLLO-Mini is `rank=1, scale_type=tensor,
    scale=128`."""

    name, package, module = "apollo", "apollo-torch", "apollo_torch"
    OPTIONS = {"rank": None, "proj": "random", "scale_type": "channel", "scale": 1, "update_proj_gap": 200,
               "proj_type": "std"}

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        from apollo_torch import APOLLOAdamW

        low_rank = {"rank": self.options["rank"] or _quarter_width(model, self.name),
                    **{key: self.options[key] for key in ("proj", "scale_type", "scale", "update_proj_gap", "proj_type")}}
        self.optimizer = APOLLOAdamW(_low_rank_groups(model, self.named, settings, low_rank), lr=settings.lr,
                                     weight_decay=settings.weight_decay)
        self._watch(self.optimizer)


class AdamMini(_Peer):
    """Adam-mini (Zhang et al., arXiv 2406.16793), the package's Adam_mini: Adam's first moment per
    element, one second moment per attention head (queries, keys), per output neuron (values,
    output projection, MLP, embeddings, head) or per block (norms).

    Published settings (the README): "Regarding learning rate (lr), weight_decay, beta1, beta2,
    eps, we recommend using the same values as those used for AdamW"; "If you are training
    Transformers, please also pass ... dim ... n_heads ... n_kv_heads" (from the model's config
    here). The package takes the number of visible GPUs for its world size and would all-gather
    over an uninitialized process group on a machine with several: one process here, world 1."""

    name, package, module = "adam-mini", "adam-mini", "adam_mini"

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        from adam_mini import Adam_mini

        config = getattr(model, "config", None)
        if not all(hasattr(config, key) for key in ("hidden_size", "num_attention_heads")):
            raise ValueError("adam-mini needs the model's config.hidden_size and config.num_attention_heads")
        self.optimizer = Adam_mini(self.named, lr=settings.lr, weight_decay=settings.weight_decay,
                                   dim=config.hidden_size, n_heads=config.num_attention_heads,
                                   n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)
        self.optimizer.world_size = 1
        self._watch(self.optimizer)


@contextlib.contextmanager
def _cuda_means(device: torch.device):
    """lomo-optim 0.1.1 allocates AdaLomo's state with `.cuda()` (adalomo.py, __init__): inside,
    that is the model's device (a CPU model's state on the CPU, a model on cuda:1's on cuda:1)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor.to(device)
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


class AdaLomo(_Peer):
    """AdaLomo (Lv et al., arXiv 2310.10195), the package's AdaLomo: a factored second moment (a
    row and a column vector per matrix, as Adafactor), the update RMS-clipped and scaled by the
    weight's RMS, applied in a hook as each gradient is computed, so that one or two gradients
    are alive at a time (`fused_backward`); update() has nothing left to do. It cannot accumulate
    gradients over micro-batches.

    Published settings (the package README): "We recommend to use AdaLomo without gradnorm to get
    better performance and higher throughput": Settings.max_grad_norm is not applied unless
    `clip_grad_norm=True` (the package's two backward passes: one for the norm, one for the
    update); otherwise the package's defaults (loss_scale 2**10, eps (1e-30, 1e-3),
    clip_threshold 1.0, decay_rate -0.8). The lr is relative (times the weight's RMS), so its grid
    is not AdamW's. The package keeps no handles to its hooks; close() removes them from the
    parameters."""

    name, package, module = "adalomo", "lomo-optim", "lomo_optim"
    accumulates = False
    OPTIONS = {"clip_grad_norm": False}

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        from lomo_optim import AdaLomo as Package

        class Fused(Package):
            def step(self, closure=None):
                """Nothing: the update ran in the backward pass; called once per update, as torch's
                LR schedulers expect of an optimizer."""

        for p in self.params:  # registered first, so each runs before the package's update hook
            self._handles.append(p.register_hook(lambda grad: self._record(incoming=[grad])))
        clip = settings.max_grad_norm if self.options["clip_grad_norm"] else None
        with _cuda_means(self._device()):
            self.optimizer = Fused(model, lr=settings.lr, weight_decay=settings.weight_decay, clip_grad_norm=clip)
        self._package_hooks = [(p, key) for p in self.params for key, hook in p._backward_hooks.items()
                               if hook is self.optimizer.grad_func]
        self._updated = False

    def backward(self, loss: torch.Tensor) -> None:
        if self._updated:
            raise ValueError("adalomo updates the weights inside backward(): it cannot accumulate gradients "
                             "over micro-batches (one backward per update)")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.optimizer.clip_grad_norm:
            self.optimizer.grad_norm(loss)
        self.optimizer.fused_backward(loss, lr)
        self._updated = True

    def update(self) -> None:
        self.optimizer.step()
        self._updated = False

    def _state_tensors(self) -> List[torch.Tensor]:
        opt = self.optimizer
        return [*opt.exp_avg_sq.values(), *opt.exp_avg_sq_row.values(), *opt.exp_avg_sq_col.values()]

    def close(self) -> None:
        super().close()
        for p, key in self._package_hooks:
            p._backward_hooks.pop(key, None)


class AdamW8bit(_Peer):
    """bitsandbytes' AdamW8bit (Dettmers et al., arXiv 2110.02861): both moments as 8-bit
    dynamic-code blocks of 256 with an fp32 absmax each; parameters under 4096 elements keep fp32
    moments (`min_8bit_size`). Chosen over torchao's AdamW8bit because galore-torch and
    apollo-torch already install bitsandbytes (no new dependency), its optimizers run on the CPU
    (0.50), and it is the 8-bit AdamW of Hugging Face's Trainer (`optim="adamw_bnb_8bit"`).
    Published settings: the package's defaults (betas (0.9, 0.999), eps 1e-8, min_8bit_size 4096,
    percentile_clipping 100)."""

    name, package, module = "adamw8bit", "bitsandbytes", "bitsandbytes"

    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__(model, settings)
        import bitsandbytes

        self.optimizer = bitsandbytes.optim.AdamW8bit(_decay_groups(self.named, settings), lr=settings.lr,
                                                      weight_decay=settings.weight_decay)
        self._watch(self.optimizer)


METHODS = {cls.name: cls for cls in (Full, Lora, LayerwiseSync, HiFT, BAdam, LISA, GaLore, Apollo, AdamMini,
                                     AdaLomo, AdamW8bit)}
PEERS = ("lora", "badam", "lisa", "galore", "apollo", "adam-mini", "adalomo", "adamw8bit")
