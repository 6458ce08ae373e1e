"""What a job trains on: the model (the embedded default or a local Hugging Face directory), its
tokenizer (the directory's, or UTF-8 bytes), the text (`--data` .txt or .jsonl, or Python's own
pydoc topics) and the seeded sampler of training windows.

Owns: DEFAULT_MODEL, ByteTokenizer, load_text, WindowSampler, build_model, load_tokenizer. May
call: torch, transformers, hift_rt.job.errors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

from .errors import JobError, first_line

DEFAULT_MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255: no files, no download."""
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))


def load_text(path: Optional[str]) -> str:
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    p = Path(path)
    if not p.is_file():
        raise JobError(f"--data: no such file: {path}")
    if p.suffix == ".txt":
        return p.read_text(encoding="utf-8", errors="replace")
    if p.suffix != ".jsonl":
        raise JobError(f"--data must be a .txt file or a .jsonl file with a \"text\" field, got {path}")
    try:
        lines = p.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise JobError(f"--data {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobError(f"--data {path}: line {number} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise JobError(f"--data {path}: line {number} is nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise JobError(f"--data {path}: line {number} has no string field \"text\"")
        texts.append(record["text"])
    if not texts:
        raise JobError(f"--data {path}: no records")
    return "\n\n".join(texts)


class WindowSampler:
    """Random windows of seq_len tokens from a token stream, from a seeded generator whose state
    travels with checkpoints (a resumed run sees the same batches). Each call draws
    batch_size x world windows, the same on every rank, and returns rank's batch_size of them
    (batch_size, seq_len): `world` ranks see what one process with batch_size x world sees."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if tokens.numel() < seq_len + 2:
            raise JobError(f"the training text has {tokens.numel()} tokens, fewer than --seq-len {seq_len} + 2")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size * self.world,),
                               generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return torch.stack([self.tokens[s:s + self.seq_len] for s in mine.tolist()])


def build_model(path: Optional[str], option: str, device: torch.device, dtype: torch.dtype, seed: int):
    """(model, description): the embedded default (path None) or a local HF directory, which
    `option` (--model or --resume) named."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading and saving bars would break ours and the error line

    if path is None:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**DEFAULT_MODEL))
        return model.to(device, dtype), "a small Llama-shaped model from RANDOM weights"
    from transformers import AutoModelForCausalLM

    directory = Path(path)
    if not directory.is_dir():
        raise JobError(f"{option}: no such directory: {path}")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise JobError(f"{option} {path}: no weights (*.safetensors or *.bin) in this directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 -- a corrupt or truncated file raises anything
        raise JobError(f"{option} {path}: cannot load the model ({first_line(exc)})") from None
    return model.to(device, dtype), f"{path} ({type(model).__name__})"


def load_tokenizer(path: Optional[str], option: str, vocab_size: int):
    """The directory's Hugging Face tokenizer, or bytes where it has no tokenizer files."""
    if path is None or not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        if vocab_size < ByteTokenizer.vocab_size:
            raise JobError(f"{option} {path}: no tokenizer files and a vocabulary too small for bytes")
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 -- as above
        raise JobError(f"{option} {path}: cannot load the tokenizer ({first_line(exc)})") from None
    tokenizer.model_max_length = int(1e12)  # we cut windows ourselves
    return tokenizer
