"""The two ways a group is updated.

FusedUpdater: hift_rt's own kernels over the group's flat buffers; the state of every group is one
fp32 blob in a StateStore (device slot + pinned host buffers when offloaded).

TorchClassUpdater: any torch.optim.Optimizer subclass, one instance per group over the group's
flat tensor (split in two parameters when some elements get no weight decay; fp32 master copies
for bf16/fp16 models). Its state tensors, created by the optimizer itself, and the masters are
moved to and from pinned host memory tensor by tensor through the transfer engine.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .state_store import StateStore


class FusedUpdater:
    def __init__(self, opt):
        self.opt = opt
        self.family = opt.family
        self.state_names = self.family.state_names(opt.defaults)
        self.n_buffers = len(self.state_names) + (1 if opt.master_weights else 0)
        self.store = StateStore([g.numel * self.n_buffers for g in opt.groups], opt.device, opt.engine)
        # Updates each parameter has had (torch's per-parameter "step"): they differ within a
        # group only when some parameters went without a gradient on some steps.
        self.param_steps = [[0] * len(g.params) for g in opt.groups]
        for g in opt.groups:
            self.store.write(g.index, self._initial_blob(g))
        if self.store.offloaded:
            self.store.load(opt.active_group)

    def _initial_blob(self, g) -> torch.Tensor:
        """State before the first update: zeros (Adagrad: its initial accumulator), and the master
        as the fp32 value of the weights."""
        n = g.numel
        blob = torch.empty(n * self.n_buffers, dtype=torch.float32, device=g.flat.device)
        for k, value in enumerate(self.family.initial_state(n, g.flat.device, self.opt.defaults).values()):
            blob[k * n:(k + 1) * n].copy_(value)
        if self.opt.master_weights:
            blob[len(self.state_names) * n:].copy_(g.flat)
        return blob

    def _split(self, blob: torch.Tensor, n: int):
        state = {name: blob[k * n:(k + 1) * n] for k, name in enumerate(self.state_names)}
        master = blob[len(self.state_names) * n:(len(self.state_names) + 1) * n] if self.opt.master_weights else None
        return state, master

    @staticmethod
    def _runs(g, has_grad, steps):
        """(start, end, step) element ranges to update: consecutive parameters that have a
        gradient and the same step count. The usual case is one run over the whole buffer."""
        runs = []
        for (_, p), off, updated, step in zip(g.params, g.offsets, has_grad, steps):
            if not updated:
                continue
            if runs and runs[-1][1] == off and runs[-1][2] == step:
                runs[-1][1] = off + p.numel()
            else:
                runs.append([off, off + p.numel(), step])
        if len(runs) == 1 and runs[0][:2] == [0, g.offsets[-1] + g.params[-1][1].numel()]:
            runs[0][1] = g.numel  # the zero padding too: one aligned launch
        return runs

    def update(self, g, grad, has_grad, *, lr, options, clip_coef):
        if self.store.offloaded:
            self.store.make_ready(g.index)
        state, master = self._split(self.store.view(g.index), g.numel)
        steps = [s + 1 if updated else s for s, updated in zip(self.param_steps[g.index], has_grad)]
        for start, end, step in self._runs(g, has_grad, steps):
            part = slice(start, end)
            self.family.update(g.flat[part], grad[part], {k: v[part] for k, v in state.items()}, step=step,
                               lr=lr, options=options, decay_end=min(max(g.decay_end - start, 0), end - start),
                               master=None if master is None else master[part], clip_coef=clip_coef)
        self.param_steps[g.index] = steps

    def switch(self, g: int, h: int) -> None:
        if self.store.offloaded:
            self.store.switch(g, h)

    def memory(self) -> dict:
        return {"state_device": self.store.device_bytes(), "state_host": self.store.host_bytes()}

    def exposed_wait_seconds(self) -> float:
        return self.store.exposed_wait_seconds()

    # -- checkpoints -------------------------------------------------------------------------
    def per_param_state(self) -> Dict[int, dict]:
        out = {}
        for g in self.opt.groups:
            steps = self.param_steps[g.index]
            if not any(steps):
                continue
            state, master = self._split(self.store.read(g.index), g.numel)
            for (_, p), off, step in zip(g.params, g.offsets, steps):
                if step == 0:
                    continue  # never updated: no state, as in torch
                entry = {}
                if self.family.has_step:
                    entry["step"] = torch.tensor(float(step))
                for name, buf in state.items():
                    entry[name] = buf[off:off + p.numel()].view(p.shape)
                if master is not None:
                    entry["master"] = master[off:off + p.numel()].view(p.shape)
                if entry:  # plain SGD in fp32 keeps nothing, as in torch
                    out[self.opt._index[id(p)]] = entry
        return out

    def load_per_param_state(self, state: dict, hift: Optional[dict]) -> None:
        for g in self.opt.groups:
            blob = self._initial_blob(g)
            bufs, master = self._split(blob, g.numel)
            steps = []
            for (name, p), off in zip(g.params, g.offsets):
                entry = state.get(self.opt._index[id(p)])
                if entry is None:
                    steps.append(0)  # never updated: initial state
                    continue
                for key, buf in bufs.items():
                    if key not in entry:
                        raise ValueError(f"state of parameter '{name}' has no '{key}'")
                    buf[off:off + p.numel()].copy_(entry[key].reshape(-1))
                if master is not None and "master" in entry:
                    master[off:off + p.numel()].copy_(entry["master"].reshape(-1))
                # SGD keeps no step: a momentum buffer means at least one update.
                steps.append(int(float(entry["step"])) if "step" in entry else 1)
            self.param_steps[g.index] = steps
            self.store.write(g.index, blob)

    def group_steps_from_state(self) -> List[int]:
        """Per group, the most updates any of its parameters had (a plain torch state dict
        carries no group count)."""
        return [max(steps) for steps in self.param_steps]

    def after_load(self, active: int) -> None:
        if self.store.offloaded:
            self.store.load(active)

    def extra_state(self) -> dict:
        return {}

    def close(self) -> None:
        self.store.close()


Item = Tuple[object, Optional[str]]  # (Parameter, None) or (state dict, key)


class TorchClassUpdater:
    def __init__(self, opt, options: dict):
        self.opt = opt
        self.device = opt.device
        self.engine = opt.engine
        self.inner: List[torch.optim.Optimizer] = []
        self.params: List[List[nn.Parameter]] = []
        self.ranges: List[List[Tuple[int, int]]] = []
        self.no_decay_group: List[Optional[int]] = []
        self._hosts: Dict[int, object] = {}     # group -> HostBuffer holding its evicted tensors
        self._pending: Dict[int, List[int]] = {}
        for g in opt.groups:
            ranges = [(0, g.decay_end), (g.decay_end, g.numel)] if opt.no_decay else [(0, g.numel)]
            ranges = [r for r in ranges if r[1] > r[0]]
            params = []
            for lo, hi in ranges:
                data = g.flat[lo:hi].float() if opt.master_weights else g.flat[lo:hi]
                params.append(nn.Parameter(data))
            specs = [{"params": [p]} for p in params]
            try:
                inner = opt.torch_class(specs, lr=opt.defaults["lr"], **options)
            except TypeError as exc:
                raise ValueError(f"optim={opt.optim_name}: {exc}") from exc
            nd = None
            if opt.no_decay and g.decay_end < g.numel:
                if "weight_decay" not in inner.defaults:
                    raise ValueError(f"no_decay needs an optimizer with a weight_decay option; {opt.optim_name} has none")
                nd = len(ranges) - 1
                inner.param_groups[nd]["weight_decay"] = 0.0
            self.inner.append(inner)
            self.params.append(params)
            self.ranges.append(ranges)
            self.no_decay_group.append(nd)
            if self.engine is not None and g.index != opt.active_group:
                self._place(g.index, on_device=False)
        if self.engine is not None:
            self.engine.synchronize()

    # -- residency ---------------------------------------------------------------------------
    def _items(self, gi: int) -> List[Item]:
        """The tensors that follow the group between device and host: fp32 masters and every
        state tensor the optimizer keeps (scalars such as `step` stay where they are)."""
        items: List[Item] = []
        if self.opt.master_weights:
            items += [(p, None) for p in self.params[gi]]
        state = self.inner[gi].state
        for p in self.params[gi]:
            entries = state.get(p, {})
            items += [(entries, key) for key, v in entries.items() if torch.is_tensor(v) and v.numel() > 1]
        return items

    @staticmethod
    def _get(item: Item) -> torch.Tensor:
        obj, key = item
        return obj.data if key is None else obj[key]

    @staticmethod
    def _set(item: Item, t: torch.Tensor) -> None:
        obj, key = item
        if key is None:
            obj.data = t  # the Parameter object stays: the optimizer's state is keyed by it
        else:
            obj[key] = t

    def _host_buffer(self, gi: int, nbytes: int):
        buf = self._hosts.get(gi)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()  # waits for transfers that still touch it
            buf = self.engine.alloc_host(nbytes)
            self._hosts[gi] = buf
        return buf

    def _place(self, gi: int, on_device: bool) -> None:
        """Move group gi's tensors to the device (prefetch) or into its host buffer (evict),
        through the engine when they come from or go to that buffer."""
        items = self._items(gi)
        if on_device:
            tickets = []
            for item in items:
                t = self._get(item)
                if self._in_host_buffer(gi, t):
                    dev = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                    tickets.append(self.engine.h2d(dev.view(-1), t.view(-1)))
                    self._set(item, dev)
                elif t.device != self.device:
                    self._set(item, t.to(self.device))
            self._pending[gi] = tickets
            return
        tensors = [self._get(it) for it in items]
        if all(self._in_host_buffer(gi, t) for t in tensors):
            return
        sizes = [(t.numel() * t.element_size() + 63) // 64 * 64 for t in tensors]  # 64-byte aligned
        host = self._host_buffer(gi, max(sum(sizes), 1))
        offset = 0
        for item, t, size in zip(items, tensors, sizes):
            view = host.view(t.dtype, offset, t.numel())
            if t.device == self.device:
                self.engine.d2h(view, t.reshape(-1))  # after the update queued on the compute stream
            else:
                view.copy_(t.reshape(-1))
            self._set(item, view.view(t.shape))
            offset += size
        self._pending.pop(gi, None)

    def _in_host_buffer(self, gi: int, t: torch.Tensor) -> bool:
        buf = self._hosts.get(gi)
        return (buf is not None and t.device.type == "cpu"
                and buf.ptr <= t.data_ptr() < buf.ptr + buf.nbytes)

    def _make_ready(self, gi: int) -> None:
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for ticket in self._pending.pop(gi, []):
            self.engine.wait(ticket, stream)

    def exposed_wait_seconds(self) -> float:
        return float("nan")  # not measured on this path

    # -- the step ----------------------------------------------------------------------------
    def update(self, g, grad, has_grad, *, lr, options, clip_coef):
        gi = g.index
        if self.engine is not None:
            self._make_ready(gi)
        if clip_coef is not None:
            grad.mul_(clip_coef)  # the flat gradient is dropped after this step anyway
        inner = self.inner[gi]
        updated = [off for (_, p), off, h in zip(g.params, g.offsets, has_grad) if h]
        for p, (lo, hi) in zip(self.params[gi], self.ranges[gi]):
            # The optimizer sees one tensor per range: it skips a range without any gradient;
            # within a range, parameters without one take part with a zero gradient.
            if not any(lo <= off < hi for off in updated):
                p.grad = None
                continue
            p.grad = grad[lo:hi].float() if self.opt.master_weights else grad[lo:hi]
        for i, pg in enumerate(inner.param_groups):
            pg["lr"] = lr
            for key, value in options.items():
                if key in pg and not (key == "weight_decay" and i == self.no_decay_group[gi]):
                    pg[key] = value
        inner.step()
        for p, (lo, hi) in zip(self.params[gi], self.ranges[gi]):
            if self.opt.master_weights and p.grad is not None:
                g.flat[lo:hi].copy_(p.data)
            p.grad = None

    def switch(self, g: int, h: int) -> None:
        if self.engine is not None:
            self._place(g, on_device=False)
            self._place(h, on_device=True)

    def memory(self) -> dict:
        on_device = sum(self._get(it).numel() * self._get(it).element_size()
                        for gi in range(len(self.inner)) for it in self._items(gi)
                        if self._get(it).device == self.device and self.device.type != "cpu")
        return {"state_device": on_device, "state_host": sum(b.nbytes for b in self._hosts.values())}

    # -- checkpoints -------------------------------------------------------------------------
    def per_param_state(self) -> dict:
        return {}  # the per-group optimizers' own state dicts travel in extra_state()

    @staticmethod
    def _to_cpu(obj):
        if torch.is_tensor(obj):
            return obj.detach().to("cpu", copy=True)
        if isinstance(obj, dict):
            return {k: TorchClassUpdater._to_cpu(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(TorchClassUpdater._to_cpu(v) for v in obj)
        return obj

    def extra_state(self) -> dict:
        if self.engine is not None:
            self.engine.synchronize()  # evicted tensors are read on the host below
        return {"inner": [self._to_cpu(o.state_dict()) for o in self.inner],
                "masters": [[self._to_cpu(p.data) for p in ps] for ps in self.params] if self.opt.master_weights else None}

    def load_per_param_state(self, state: dict, hift: Optional[dict]) -> None:
        if hift is None:
            raise ValueError(f"optim={self.opt.optim_name}: only a HiFTOptimizer state dict can be loaded")
        extra = hift["updater"]
        for gi, inner in enumerate(self.inner):
            self._place(gi, on_device=True)
            if self.engine is not None:
                self.engine.synchronize()
            inner.load_state_dict(extra["inner"][gi])
            if self.opt.master_weights:
                for p, saved in zip(self.params[gi], extra["masters"][gi]):
                    p.data.copy_(saved)
            if self.engine is not None:
                self._place(gi, on_device=False)
                self.engine.synchronize()

    def group_steps_from_state(self) -> List[int]:
        raise AssertionError("unreachable: load_per_param_state refuses state dicts without 'hift'")

    def after_load(self, active: int) -> None:
        if self.engine is not None:
            self._place(active, on_device=True)

    def close(self) -> None:
        for buf in self._hosts.values():
            buf.free()
        self._hosts = {}
