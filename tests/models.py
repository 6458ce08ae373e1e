"""Tiny models for the runtime tests, each with its HiFT units written out by hand (independently
of hift_rt.grouping), a batch maker, a loss and a side-by-side training loop."""
import contextlib

import torch
from torch import nn


def tiny_llama(seed=0, layers=4, hidden_size=16, intermediate_size=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=32)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    units = [["model.embed_tokens"]] + [[f"model.layers.{i}"] for i in range(layers)] + [["model.norm", "lm_head"]]
    return model, units


def tiny_gpt2(seed=0, layers=3):
    """GPT-2 shape with lm_head tied to the token embedding (counted once, in the input unit)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.config.use_cache = False
    assert model.lm_head.weight is model.transformer.wte.weight
    units = [["transformer.wte", "transformer.wpe"]] + [[f"transformer.h.{i}"] for i in range(layers)] + [["transformer.ln_f"]]
    return model, units


def mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 15), nn.Tanh(), nn.Linear(15, 4))
    return model, [["0"], ["1"], ["3"], ["5"]]


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": mlp}


def batches(kind, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "mlp":
            out.append((torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)))
        else:
            out.append(torch.randint(0, 64, (2, 9), generator=gen))
    return out


def loss_of(kind, model, batch):
    if kind == "mlp":
        x, y = batch
        return (model(x) - y).pow(2).mean()
    return model(input_ids=batch, labels=batch).loss


def merge_units(units, per_group):
    return [sum(units[i:i + per_group], []) for i in range(0, len(units), per_group)]


def train_side_by_side(kind, pairs, data, autocast=None):
    """For each batch, on each (model, optimizer) pair: forward (under `autocast()` if given),
    backward, step, zero_grad."""
    for batch in data:
        for model, opt in pairs:
            with autocast() if autocast else contextlib.nullcontext():
                loss = loss_of(kind, model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()


def assert_params_close(a, b, rtol=1e-5, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
