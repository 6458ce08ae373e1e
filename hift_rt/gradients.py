"""The active group's gradient: one flat buffer that autograd accumulates into.

While group g is active, each of its parameters has `requires_grad=True` and `.grad` = a view of
the buffer at the parameter's offset, so backward accumulates in place, across micro-batches,
without a copy. Every other parameter has `requires_grad=False` and no gradient. A parameter that
gets no gradient between two zeroings is reported as such (torch.optim skips a None gradient, and
so does the runtime).

Owns GradientBuffer; may call hift_rt.flat (FlatGroup) only.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Set, Tuple

import torch

from .flat import FlatGroup


class GradientBuffer:
    """(numel,) gradient storage sized for the largest group, in the parameters' dtype."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer = torch.zeros(numel, dtype=dtype, device=device)
        self._views: Dict[int, torch.Tensor] = {}  # id(param) -> its view, active group only
        self._touched: Set[int] = set()  # id(param) of active parameters autograd gave a gradient
        self._hooks: list = []

    def attach(self, params) -> None:
        """Register the post-accumulate-grad hook (see adopt) on every parameter. The hooks hold
        this buffer weakly: dropping the optimizer frees it (and its pinned memory) while the model
        lives on."""
        ref = weakref.ref(self)

        def hook(p):
            buffer = ref()
            if buffer is not None:
                buffer.adopt(p)
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def detach(self) -> None:
        """Remove the hooks and forget the views (the parameters are handed back)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._views = {}
        self._touched = set()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def activate(self, group: FlatGroup) -> None:
        """Zero the buffer and hand group's parameters their views; they become trainable."""
        grad = self.buffer[:group.numel]
        grad.zero_()
        self._touched = set()
        self._views = {}
        for _, p, off, n in group.slices():
            view = grad[off:off + n].view(p.shape)
            self._views[id(p)] = view
            p.requires_grad_(True)
            p.grad = view

    def deactivate(self, group: FlatGroup) -> None:
        """Freeze group's parameters and drop their gradients."""
        for _, p in group.params:
            p.requires_grad_(False)
            p.grad = None
        self._views = {}

    def zero(self, group: FlatGroup) -> None:
        """Zero the active group's gradient; its `.grad` stay (or become again) views of the buffer."""
        self.buffer[:group.numel].zero_()
        self._touched = set()
        for _, p in group.params:
            p.grad = self._views[id(p)]

    def adopt(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: note that `p` got a gradient, and move a gradient that autograd
        did not accumulate into the buffer (the .grad was set to None, e.g. by model.zero_grad())
        into it, so the transient copy is freed at once."""
        view = self._views.get(id(p))
        if view is None or p.grad is None or p.grad.is_sparse:
            return  # not in the active group, or collect() reports the problem
        self._touched.add(id(p))
        if p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad.reshape(view.shape))
            p.grad = view

    def collect(self, group: FlatGroup) -> Tuple[torch.Tensor, List[bool]]:
        """The active group's (numel,) flat gradient, with gradients set by hand folded in, and for
        each of its parameters whether it has a gradient since the last zeroing."""
        grad = self.buffer[:group.numel]
        has_grad = []
        for name, p in group.params:
            view = self._views[id(p)]
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"parameter '{name}' has a sparse gradient; hift_rt needs dense "
                                   "gradients (e.g. nn.Embedding(sparse=False))")
            if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)  # set by hand, or by autograd after .grad was set to None
                has_grad.append(True)
            else:
                has_grad.append(p.grad is not None and id(p) in self._touched)
                if not has_grad[-1]:
                    view.zero_()  # no gradient since the last zeroing: None for torch
            p.grad = view
        return grad, has_grad
