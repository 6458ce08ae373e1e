"""The two text corpora of the fidelity benchmark, as byte-level tokens, with held-out splits.

Both exist in every Python installation, so the benchmark runs offline:
  A  Python's pydoc topics (`pydoc_data.topics`, ~465 KB of English about the language), the
     pretraining domain;
  B  the source code of a fixed, sorted list of pure-Python standard-library modules, read from
     the running interpreter's own files (`sysconfig`'s stdlib directory), the fine-tuning domain.
The text of both depends on the Python version; `Corpus.sha256` identifies it.

Tokens are the text's UTF-8 bytes (vocabulary 256). Each document is split at 90% of its bytes:
the head goes to training, the tail to the held-out stream, so that the held-out text covers
every document. This module reads files and builds tensors; it calls nothing of hift_rt.
"""
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import List

import torch

HELDOUT_FRACTION = 0.1
# Long-standing pure-Python modules (a file `NAME.py` or a package `NAME/__init__.py`), sorted.
STDLIB_MODULES = (
    "argparse", "ast", "calendar", "configparser", "contextlib", "csv", "dataclasses", "difflib",
    "enum", "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "locale",
    "logging", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shlex", "shutil",
    "smtplib", "statistics", "string", "tarfile", "textwrap", "threading", "tokenize",
    "traceback", "typing", "uuid", "zipfile",
)
MIN_STDLIB_BYTES = 16 << 10  # fewer than this means the interpreter ships without its sources


class CorpusError(Exception):
    """The text a corpus needs is not available here."""


@dataclass
class Corpus:
    name: str
    source: str                # where the text came from, in words
    documents: List[str]       # what was read, in order (topic keys or module names)
    train: torch.Tensor        # (n_train,) int64 byte tokens
    heldout: torch.Tensor      # (n_heldout,) int64 byte tokens
    sha256: str                # of the UTF-8 text of all documents, in order

    def describe(self) -> dict:
        return {"source": self.source, "documents": len(self.documents), "train_tokens": self.train.numel(),
                "heldout_tokens": self.heldout.numel(), "sha256": self.sha256}


def byte_tokens(data: bytes) -> torch.Tensor:
    """(len(data),) int64: one token per byte."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def _split(name: str, source: str, keys: List[str], texts: List[bytes]) -> Corpus:
    train, heldout, digest = [], [], hashlib.sha256()
    for text in texts:
        cut = int(len(text) * (1 - HELDOUT_FRACTION))
        train.append(text[:cut])
        heldout.append(text[cut:])
        digest.update(text)
    return Corpus(name, source, keys, byte_tokens(b"\n\n".join(train)), byte_tokens(b"\n\n".join(heldout)),
                  digest.hexdigest())


def pydoc_topics() -> Corpus:
    """Corpus A: every pydoc topic, sorted by key."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return _split("A", "pydoc_data.topics", keys, [topics[k].encode("utf-8") for k in keys])


def _module_file(stdlib: str, module: str) -> str:
    path = os.path.join(stdlib, module + ".py")
    return path if os.path.isfile(path) else os.path.join(stdlib, module, "__init__.py")


def stdlib_source(max_bytes: int) -> Corpus:
    """Corpus B: the first max_bytes / len(STDLIB_MODULES) bytes of each module's source (so a
    cap keeps every module), modules missing from this interpreter skipped."""
    if max_bytes < MIN_STDLIB_BYTES:
        raise CorpusError(f"the stdlib corpus needs at least {MIN_STDLIB_BYTES} bytes, got a cap of {max_bytes}")
    stdlib = sysconfig.get_paths()["stdlib"]
    share = max_bytes // len(STDLIB_MODULES)
    keys, texts = [], []
    for module in STDLIB_MODULES:
        path = _module_file(stdlib, module)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                keys.append(module)
                texts.append(f.read(share))
    if sum(map(len, texts)) < MIN_STDLIB_BYTES:
        raise CorpusError(f"found {len(keys)} of the {len(STDLIB_MODULES)} standard-library modules' sources "
                          f"under {stdlib}: this interpreter ships without its .py files")
    return _split("B", f"standard-library source under {stdlib}", keys, texts)


def eval_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """(count, seq_len) windows spread evenly over `tokens`, the same for every run."""
    if tokens.numel() < seq_len + count:
        raise CorpusError(f"a held-out stream of {tokens.numel()} tokens is too short for {count} windows of {seq_len}")
    starts = torch.linspace(0, tokens.numel() - seq_len, count).long()
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
