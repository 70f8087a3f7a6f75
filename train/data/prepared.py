"""What the token sources hand the trainer: memory-mapped token splits plus tokenizer facts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class TokenData:
    """One split, memory-mapped: the tokens and where each document starts.

    `doc_starts` lets the loader give every token a document id (loss masks, intra-document
    attention); `pad_id`, when set, marks label positions the loss ignores.
    """

    tokens: np.ndarray          # 1-D memmap, uint16 or uint32
    doc_starts: np.ndarray      # int64 offsets where each document starts
    vocab_size: int
    pad_id: int | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts.shape[0])


@dataclass
class PreparedData:
    """Both splits plus what the model and the run dir need to know about the tokenizer: the
    `Dataset` (train/data/source.py) of every token source (text, mixture, pretokenized)."""

    train: TokenData
    val: TokenData
    tokenizer_dir: Path | None   # PreTrainedTokenizerFast-compatible folder (None: pretokenized, no tokenizer)
    vocab_size: int              # len(tokenizer), or data.vocab_size for pretokenized data
    eos_id: int | None           # document separator / BOS id (None: pretokenized without tokenizer)
    pad_id: int | None
    cache_key: str               # the token cache's directory name
    cache_dir: Path | None = None  # the token cache directory itself
    tokenizer: Any = None        # its TokenizerInfo (validation sets are tokenized with it)

    val_metric_names = ()        # no metrics from logits beyond the loss (so none are computed)

    def train_samples(self, seq_len: int, seed: int) -> Any:
        from train.data.loader import Windows
        return Windows(self.train, seq_len, seed)

    def val_samples(self, seq_len: int) -> Any:
        from train.data.loader import OrderedWindows
        samples = OrderedWindows(self.val, seq_len)
        return samples if len(samples) else None

    def val_metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        return {}     # language modelling: the loss is the metric

    def summary(self) -> dict[str, Any]:
        return {"train_tokens": len(self.train), "val_tokens": len(self.val),
                "unigram_entropy": unigram_entropy(self.train.tokens), "cache": self.cache_key}


def unigram_entropy(tokens: np.ndarray, max_tokens: int = 1 << 24) -> float | None:
    """Entropy (nats) of the token frequency distribution: what a context-free model reaches.

    Estimated from the first `max_tokens` tokens, so start-up stays cheap on a large corpus
    (exact for the quickstart's 1.6M tokens); None for an empty split."""
    counts = np.bincount(np.asarray(tokens[:max_tokens]))
    if counts.sum() == 0:
        return None
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
