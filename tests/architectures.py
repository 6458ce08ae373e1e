"""Small configs of real transformers architectures, built on the meta device (no memory, no
download), each with its HiFT units written out by hand, independently of hift_rt.grouping.

A layout is a list, bottom to top, of
- a list of name prefixes: one glue unit holding exactly the parameters under them, or
- a class name: every module of that class, in `named_modules()` order, is one block unit.
"""
import torch
from torch import nn


def _build(model_class, config):
    with torch.device("meta"):
        return model_class(config)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return _build(LlamaForCausalLM, cfg), [["model.embed_tokens"], "LlamaDecoderLayer", ["model.norm", "lm_head"]]


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    return _build(GPT2LMHeadModel, cfg), [["transformer.wte", "transformer.wpe"], "GPT2Block", ["transformer.ln_f"]]


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    return _build(BertModel, cfg), [["embeddings"], "BertLayer", ["pooler"]]


def t5():
    """Tied embeddings (shared = both stacks' embed_tokens = lm_head); the encoder's final norm
    acts between the encoder's last block and the decoder's first."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=96, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2,
                   num_heads=2, relative_attention_num_buckets=8)
    return _build(T5ForConditionalGeneration, cfg), [
        ["shared"], "T5Block:encoder", ["encoder.final_layer_norm"], "T5Block:decoder", ["decoder.final_layer_norm"]]


def bart():
    """Each stack's `layernorm_embedding` is registered after its layers but acts before them."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=96, d_model=16, encoder_layers=3, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    return _build(BartForConditionalGeneration, cfg), [
        ["model.shared", "model.encoder.embed_positions", "model.encoder.layernorm_embedding"],
        "BartEncoderLayer",
        ["model.decoder.embed_positions", "model.decoder.layernorm_embedding"],
        "BartDecoderLayer"]  # lm_head is tied to model.shared: nothing is left above the decoder


def whisper():
    """The encoder's sinusoidal positions are frozen; proj_out is tied to the decoder's tokens."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=3,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    return _build(WhisperForConditionalGeneration, cfg), [
        ["model.encoder.conv1", "model.encoder.conv2"],
        "WhisperEncoderLayer",
        ["model.encoder.layer_norm", "model.decoder.embed_tokens", "model.decoder.embed_positions"],
        "WhisperDecoderLayer",
        ["model.decoder.layer_norm"]]


def opt():
    """OPT registers project_out, project_in and final_layer_norm before its layers; the first
    acts after them, the second before, the third after."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=96, hidden_size=16, word_embed_proj_dim=8, num_hidden_layers=3, ffn_dim=32,
                    num_attention_heads=2, max_position_embeddings=32)
    return _build(OPTForCausalLM, cfg), [
        ["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"],
        "OPTDecoderLayer",
        ["model.decoder.final_layer_norm", "model.decoder.project_out"]]


def deberta_v2():
    """rel_embeddings and its LayerNorm are registered after the layers and read (through
    get_rel_embedding) before them; conv is applied inside the loop, after layer 0."""
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(vocab_size=96, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=32, relative_attention=True,
                          position_buckets=8, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"],
                          position_biased_input=False, conv_kernel_size=3)
    return _build(DebertaV2Model, cfg), [
        ["embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"], "DebertaV2Layer", ["encoder.conv"]]


def jamba():
    """One ModuleList mixing Mamba and attention layers (attention every 2nd layer)."""
    from transformers import JambaConfig, JambaForCausalLM

    cfg = JambaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1,
                      expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4,
                      mamba_expand=2, mamba_dt_rank=4)
    return _build(JambaForCausalLM, cfg), [
        ["model.embed_tokens"], "JambaMambaDecoderLayer|JambaAttentionDecoderLayer", ["model.final_layernorm", "lm_head"]]


def vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                    image_size=8, patch_size=4)
    return _build(ViTModel, cfg), [["embeddings"], "ViTLayer", ["layernorm", "pooler"]]


class Block(nn.Module):
    """A pre-norm transformer block as timm writes it."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class TimmViT(nn.Module):
    """timm's VisionTransformer pattern: blocks in one nn.Sequential, cls_token and pos_embed
    as the root's own parameters, read by a helper method."""

    def __init__(self, dim=16, depth=4, patch=4, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def _pos_embed(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x):
        x = self._pos_embed(self.patch_embed(x).flatten(2).transpose(1, 2))
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def timm_vit():
    return TimmViT(), [["patch_embed", "cls_token", "pos_embed"], "Block", ["norm", "head"]]


ARCHITECTURES = {f.__name__: f for f in (llama, gpt2, bert, t5, bart, whisper, opt, deberta_v2, jamba, vit, timm_vit)}


def expected_units(model, layout):
    """The layout's units as (prefixes, is a block) pairs, blocks expanded to their module paths.
    A block entry "Class:prefix" takes only the modules of that class under `prefix`; "A|B" both."""
    units = []
    for entry in layout:
        if isinstance(entry, list):
            units.append((entry, False))
            continue
        classes, _, under = entry.partition(":")
        units += [([name], True) for name, module in model.named_modules()
                  if type(module).__name__ in classes.split("|") and name.startswith(under)]
    return units
