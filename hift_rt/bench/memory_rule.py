"""The memory rule of hift_rt.methods worked out from parameter shapes, for a model too large to
build: bytes of gradients alive and of optimizer state (on the device, in host memory) at the
peak of one steady-state step, as `Method.breakdown()` counts them from the tensors of a model
that runs. `rule(kind, options, config)` gives them for a Llama-shaped model (`LLAMA_2_7B` for
Llama-2-7B's shape); the test suite checks it against the counted bytes of small models.

N parameters, b bytes per weight (4 fp32, 2 bf16); per method (its docstring in
hift_rt/methods.py says why):

  full       gradients b N, state 2 b N (m, v in the weights' dtype)
  lora       P = r (in + out) per adapted linear layer (r = 16): gradients b P, state 2 b P
  hift       G = the largest group's flat buffer (each parameter rounded up to 256 elements):
             gradients b G; state S per element (fp32 weights, fp32 state: 8; bf16 weights add
             the master: 4 fp32, 2 kahan; int8 moments 2 (1 + 4/128)): S G on the device (the
             whole-group slot; a smaller state_window bounds it) and S (sum of G) in host memory
             with offload (and "auto": these shapes run on a GPU), all of it on the device without
  badam      B = the largest block (a layer): fp32 gradients 4 B, state 8 B (fp32 m, v) + 4 B
             (the fp32 master copy)
  lisa       A = the parameters outside the layers, L = the largest layer, γ = layers:
             gradients b (A + γ L), state 2 b (A + γ L)
  galore     gradients b N; per projected m x n weight (r = rank): state 2 b m r (m >= n) or
             2 b r n, and the projection: for fp32 weights the SVD factor it is a slice of,
             4 n n or 4 m m, for bf16 b r n or b m r; other parameters 2 b n
  apollo     gradients b N; per projected weight: 2 b m r + b r n (m >= n) or 2 b r n + b m r,
             plus b for the norm-growth limiter's norm; other parameters 2 b n
  adam-mini  gradients b N; state b N (m) + b per second moment: a row of each q and k head, of
             each output neuron of v, o, the MLP, the embeddings and the head, one per norm
  adalomo    gradients b (head + final norm): the first two gradients of the backward, each
             alive until the next one is computed (the embeddings and the first norm, the last
             two, are as large); state 4 (m + n) per matrix, 4 n per vector
  adamw8bit  gradients b N; per parameter of 4096 elements or more 2 n + 8 ceil(n / 256), else
             8 n (fp32 moments), plus the two 256-entry fp32 code tables once

Owns: the rule's formulas and LLAMA_2_7B. May call: hift_rt.grouping, hift_rt.methods (which
parameters a method projects), hift_rt.flat (PARAM_ALIGN), transformers (a meta-device model for
the shapes).
"""
import math
import re
from typing import Dict, Optional

import torch

from .. import grouping, methods
from ..flat import PARAM_ALIGN

LLAMA_2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000}
LORA_RANK = 16
# Bytes per element of a moment in each state_dtype (int8: a code, and one fp32 absmax per 128)
# and of each master_weights format; "auto" is an fp32 master for bf16/fp16 weights.
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "int8": 1 + 4 / 128}
MASTER_BYTES = {"fp32": 4, "kahan": 2}


def meta_model(config: dict):
    """A LlamaForCausalLM with `config` on the meta device: its parameters' names, shapes and
    modules, no memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**config))


def _sizes(named) -> int:
    return sum(p.numel() for _, p in named)


def _layer_of(name: str) -> Optional[str]:
    found = re.findall(r".*layers\.[^.]*\.", name)  # BAdam's infer_param_groups pattern
    return found[0] if found else None


def _hift(model, options: dict, b: int) -> dict:
    units = grouping.build_units(model)
    groups = grouping.groups_from_units(units, options.get("units_per_group", 1))
    sizes = [sum(math.ceil(p.numel() / PARAM_ALIGN) * PARAM_ALIGN for _, p in g.params) for g in groups]
    per_element = 2 * MOMENT_BYTES[options.get("state_dtype", "fp32")]
    master = options.get("master_weights", "auto")
    if b != 4 and master is not False:
        per_element += MASTER_BYTES["fp32" if master in ("auto", True) else master]
    if options.get("offload", "auto") in (True, "auto"):  # auto: on, as on the GPU these shapes need
        return {"gradients": b * max(sizes), "state_device": round(per_element * max(sizes)),
                "state_host": round(per_element * sum(sizes))}
    return {"gradients": b * max(sizes), "state_device": round(per_element * sum(sizes)), "state_host": 0}


def _low_rank(model, options: dict, b: int, kind: str) -> dict:
    rank = options.get("rank") or model.config.hidden_size // 4
    targets = {id(p) for p in methods.low_rank_targets(model)}
    state = 0
    for _, p in model.named_parameters():
        if id(p) not in targets:
            state += 2 * b * p.numel()
            continue
        m, n = p.shape
        if kind == "galore":
            state += 2 * b * (m * rank if m >= n else rank * n)
            state += (4 * n * n if m >= n else 4 * m * m) if b == 4 else b * (rank * n if m >= n else m * rank)
        else:
            state += 2 * b * (m * rank if m >= n else rank * n) + b * (rank * n if m >= n else m * rank) + b
    return {"gradients": b * _sizes(model.named_parameters()), "state_device": state, "state_host": 0}


def _adam_mini(model, b: int) -> dict:
    config = model.config
    head_numel = config.hidden_size * config.hidden_size // config.num_attention_heads
    rows = 0
    for name, p in model.named_parameters():
        if any(key in name for key in ("q_proj", "k_proj")):
            rows += p.numel() // head_numel
        elif any(key in name for key in ("embed", "lm_head", "v_proj", "o_proj", "mlp")):
            rows += p.shape[0]
        else:
            rows += 1
    n = _sizes(model.named_parameters())
    return {"gradients": b * n, "state_device": b * (n + rows), "state_host": 0}


def _adamw8bit(model, b: int) -> dict:
    state, eight_bit = 0, False
    for _, p in model.named_parameters():
        n = p.numel()
        if n >= 4096:
            state += 2 * n + 2 * 4 * math.ceil(n / 256)
            eight_bit = True
        else:
            state += 8 * n
    return {"gradients": b * _sizes(model.named_parameters()), "state_device": state + (2 * 256 * 4 if eight_bit else 0),
            "state_host": 0}


def rule(kind: str, options: Dict[str, object], config: dict, weight_bytes: int = 4) -> Optional[dict]:
    """Bytes of gradients, state_device and state_host at the peak for method `kind` with its
    `options` (as Settings.options; hift: wrap's, with `offload`) on a Llama of `config`, weights
    of `weight_bytes` bytes; None for a method without a formula here."""
    model = meta_model(config)
    named = list(model.named_parameters())
    n, b = _sizes(named), weight_bytes
    if kind == "full":
        return {"gradients": b * n, "state_device": 2 * b * n, "state_host": 0}
    if kind == "lora":
        adapted = sum(LORA_RANK * sum(p.shape) for name, p in named
                      if name.endswith(".weight") and name.split(".")[-2] in methods.Lora.TARGETS)
        return {"gradients": b * adapted, "state_device": 2 * b * adapted, "state_host": 0}
    if kind == "hift":
        return _hift(model, options, b)
    if kind == "badam":
        options = {**methods.BAdam.OPTIONS, **options}
        blocks: Dict[str, int] = {}
        for name, p in named:
            block = _layer_of(name) or ("embed" if "embed" in name and options["include_embedding"] else
                                        "head" if options["include_lm_head"] else None)
            if block is not None:
                blocks[block] = blocks.get(block, 0) + p.numel()
        largest = max(blocks.values())
        return {"gradients": 4 * largest, "state_device": 12 * largest, "state_host": 0}
    if kind == "lisa":
        layers = {**methods.LISA.OPTIONS, **options}["layers"]
        per_layer: Dict[str, int] = {}
        for name, p in named:
            layer = _layer_of(name)
            if layer is not None:
                per_layer[layer] = per_layer.get(layer, 0) + p.numel()
        trained = n - sum(per_layer.values()) + layers * max(per_layer.values())
        return {"gradients": b * trained, "state_device": 2 * b * trained, "state_host": 0}
    if kind in ("galore", "apollo"):
        return _low_rank(model, options, b, kind)
    if kind == "adam-mini":
        return _adam_mini(model, b)
    if kind == "adalomo":
        shapes = dict(named)
        if "lm_head.weight" not in shapes:
            return None
        state = sum(4 * (sum(p.shape) if p.dim() == 2 else p.numel()) for _, p in named)
        return {"gradients": b * (shapes["lm_head.weight"].numel() + shapes["model.norm.weight"].numel()),
                "state_device": state, "state_host": 0}
    if kind == "adamw8bit":
        return _adamw8bit(model, b)
    return None

