"""A Hugging Face causal LM's training loss without its (batch, seq, vocab) logits.

    handle = hift_rt.efficient_lm_loss(model)   # a second call returns the same handle
    out = model(input_ids=ids, labels=ids)      # out.loss: the model's loss; out.logits: None
    out = model(input_ids=ids)                  # without labels: as before, logits included
    handle.remove()                             # the model as it was

How: the handle replaces `model.forward` on the instance. A call with labels runs the model's own
forward, during which, for that call only, the head (`get_output_embeddings()`) returns its input
wrapped in a _HeadInput instead of logits, and the model's `loss_function` turns that input into
the loss with hift_rt.kernels.linear_cross_entropy over the head's weight and bias: the math of
Hugging Face's ForCausalLMLoss (labels shifted by one, or `shift_labels`; `ignore_index`; mean
over the kept labels, or over `num_items_in_batch`), the logits computed chunk by chunk in the
compute dtype and never held whole. The output then has no logits: `outputs.logits` is None, and
the tuple of `return_dict=False` leaves them out as it leaves out every None field. Everything
else in the model's forward (its base model and arguments, gradient checkpointing, auxiliary
losses added to the loss) runs unchanged. The head's parameters are read at every call, so a
model wrapped by hift_rt.wrap (parameters re-homed into flat buffers, requires_grad toggled each
step) works, and a frozen head skips its weight's gradient. A PEFT model is handled through its
base model (`get_base_model()`).

What it cannot compute exactly is refused with ValueError when applied or at the call: no
`get_output_embeddings()`, a head that is not a plain torch.nn.Linear (LoRA on the head,
quantized layers, a replaced forward or forward hooks), a loss other than ForCausalLMLoss (a
custom `loss_function` or `loss_type`), and logit soft-capping or scaling in the config
(`final_logit_softcapping`, `logit_scale`, `logits_scaling`). A model that does anything else with
its logits between the head and the loss meets the _HeadInput, which refuses every use (TypeError
or AttributeError naming efficient_lm_loss) instead of computing a different loss.

Exactness against the model's own loss (tests/test_linear_cross_entropy.py, tiny Llama on the CPU,
every parameter's gradient): fp32 loss within 1e-6 relative (measured <= 3e-7) and gradients
within 1e-5 of each gradient's largest entry (measured <= 8e-7); bf16, or fp32 under bf16
autocast, loss within 2e-3 relative (measured <= 2e-7: the logits are rounded to bf16 as the
model's own head rounds them) and gradients within 3e-2 of the largest entry (measured <= 1.2e-2,
about 3 bf16 ulps: G is rounded to bf16 before its matmuls, the model's own loss rounds G / D).

Owns: efficient_lm_loss, its handle, check_supported. May call: hift_rt.kernels.linear_cross_entropy,
transformers (the stock ForCausalLMLoss, to recognize it).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch import nn

from .kernels import linear_cross_entropy
from .kernels.linear_cross_entropy import check_chunk_size

# Config fields by which a model changes its logits before the loss (Gemma 2/3, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _refusal(model_name: str, use: str) -> str:
    return (f"hift_rt.efficient_lm_loss: {model_name} uses its logits ({use}) before its loss function, so the "
            "efficient loss cannot compute the same loss; call remove() on the handle to use the model's own loss")


class _HeadInput:
    """What the head returns during a call with labels: its input, for the loss function. Any
    other use of it raises."""

    __slots__ = ("hidden", "head", "model_name")

    def __init__(self, hidden: torch.Tensor, head: nn.Linear, model_name: str):
        self.hidden, self.head, self.model_name = hidden, head, model_name

    def __getattr__(self, name):
        raise AttributeError(_refusal(self.model_name, f"attribute {name!r}"))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = next((a.model_name for a in args if isinstance(a, _HeadInput)), "the model")
        raise TypeError(_refusal(name, getattr(func, "__name__", str(func))))

    def _refuse(self, *args):
        raise TypeError(_refusal(self.model_name, "an operator"))

    __getitem__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __pow__ = __neg__ = _refuse


def _check_head(model: nn.Module) -> nn.Linear:
    name = type(model).__name__
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(f"hift_rt.efficient_lm_loss: {name} has no output embeddings (get_output_embeddings() "
                         "returns None or is missing): not a causal LM with a head")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise ValueError(f"hift_rt.efficient_lm_loss: {name}'s head is a {type(head).__name__}, not a plain "
                         "torch.nn.Linear; only a linear head's loss can be computed without its logits")
    if "forward" in head.__dict__ or head._forward_hooks:
        raise ValueError(f"hift_rt.efficient_lm_loss: {name}'s head has a replaced forward or forward hooks, "
                         "which would not see the logits they expect")
    return head


def _check_model(model: nn.Module) -> nn.Linear:
    """The model's head, once everything that would change the loss is ruled out."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    name = type(model).__name__
    head = _check_head(model)
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        if getattr(config, field, None) is not None:
            raise ValueError(f"hift_rt.efficient_lm_loss: {name} transforms its logits before the loss "
                             f"(config.{field} = {getattr(config, field)}); not supported")
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        raise ValueError(f"hift_rt.efficient_lm_loss: {name}'s loss is {getattr(model, 'loss_function', None)!r} "
                         f"(loss_type {getattr(model, 'loss_type', None)!r}), not transformers' ForCausalLMLoss; "
                         "only that loss is computed without logits")
    return head


class EfficientLMLoss:
    """The handle efficient_lm_loss returns; it is also the model's replaced `forward`."""

    def __init__(self, model: nn.Module, chunk_size: Optional[int]):
        self.model, self.chunk_size = model, chunk_size
        self._instance_forward = model.__dict__.get("forward")  # e.g. accelerate's autocast wrapper
        self.__wrapped__ = model.forward  # the forward we call; inspect.signature follows it
        self._signature = inspect.signature(model.forward)
        if "labels" not in self._signature.parameters:
            raise ValueError(f"hift_rt.efficient_lm_loss: {type(model).__name__}.forward takes no labels")

    def __call__(self, *args, **kwargs):
        try:
            labels = self._signature.bind_partial(*args, **kwargs).arguments.get("labels")
        except TypeError:
            labels = None  # the model's forward raises its own error for these arguments
        if labels is None:
            return self.__wrapped__(*args, **kwargs)
        with self._armed(_check_model(self.model)):
            output = self.__wrapped__(*args, **kwargs)
        return _without_logits(output)

    @contextlib.contextmanager
    def _armed(self, head: nn.Linear):
        """For one call: the head returns a _HeadInput and the model's loss function is ours."""
        model_name = type(self.model).__name__
        had_loss = "_loss_function" in self.model.__dict__
        saved_loss = self.model.__dict__.get("_loss_function")
        head.forward = lambda hidden: _HeadInput(hidden, head, model_name)
        self.model.loss_function = self._loss
        try:
            yield
        finally:
            del head.forward
            if had_loss:
                self.model.loss_function = saved_loss
            else:
                del self.model._loss_function

    def _loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
              shift_labels=None, **kwargs):
        """ForCausalLMLoss's signature and math (other keyword arguments are ignored, as it
        ignores them), from the head's input instead of logits."""
        name = type(self.model).__name__
        if not isinstance(logits, _HeadInput):
            raise ValueError(f"hift_rt.efficient_lm_loss: {name}'s loss got logits that its output embeddings "
                             "did not produce; its head is not get_output_embeddings()")
        hidden, head = logits.hidden, logits.head
        if vocab_size is not None and vocab_size != head.out_features:
            raise ValueError(f"hift_rt.efficient_lm_loss: {name}'s loss expects a vocabulary of {vocab_size}, its "
                             f"head has {head.out_features} outputs")
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if shift_labels.numel() != hidden.shape[0]:
            raise ValueError(f"hift_rt.efficient_lm_loss: {shift_labels.numel()} labels for {hidden.shape[0]} "
                             f"positions (labels {tuple(labels.shape)})")
        return linear_cross_entropy(hidden, head.weight, shift_labels.reshape(-1), head.bias,
                                    ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                    chunk_size=self.chunk_size)

    def remove(self) -> None:
        """Give the model back its forward (a second call does nothing)."""
        current = self.model.__dict__.get("forward")
        if current is not self:
            if isinstance(current, EfficientLMLoss) or current is self._instance_forward:
                return
            raise RuntimeError(f"hift_rt.efficient_lm_loss: {type(self.model).__name__}.forward was replaced after "
                               "efficient_lm_loss was applied; remove that replacement first")
        if self._instance_forward is None:
            del self.model.forward
        else:
            self.model.forward = self._instance_forward


def _without_logits(output):
    """The model's output without the _HeadInput its head returned: a ModelOutput rebuilt
    without it (logits None), a tuple without that element."""
    if isinstance(output, tuple):
        return tuple(v for v in output if not isinstance(v, _HeadInput))
    fields = {k: v for k, v in output.items() if not isinstance(v, _HeadInput)}
    return type(output)(**fields)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The module whose forward computes logits and loss: a PEFT model's base model, else model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"hift_rt.efficient_lm_loss: expected a torch.nn.Module, got {type(model).__name__}")
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def check_supported(model: nn.Module) -> None:
    """Raise ValueError (TypeError for a non-module) if efficient_lm_loss would refuse `model`."""
    _check_model(_causal_lm(model))


def efficient_lm_loss(model: nn.Module, *, chunk_size: Optional[int] = None) -> EfficientLMLoss:
    """Make `model` (a Hugging Face causal LM, or a PEFT model around one) compute its loss, when
    called with `labels=`, through hift_rt.kernels.linear_cross_entropy without full logits (see
    the module docstring). `chunk_size`: tokens per chunk, default the kernel's memory rule.
    Returns the handle (`remove()` undoes it); applying it again returns the same handle.
    Raises ValueError for what it cannot compute exactly."""
    model = _causal_lm(model)
    check_chunk_size(chunk_size)
    current = model.__dict__.get("forward")
    if isinstance(current, EfficientLMLoss):
        if current.chunk_size != chunk_size:
            raise ValueError(f"hift_rt.efficient_lm_loss: already applied with chunk_size={current.chunk_size}; "
                             "remove() it first to change chunk_size")
        return current
    _check_model(model)
    handle = EfficientLMLoss(model, chunk_size)
    model.forward = handle
    return handle
