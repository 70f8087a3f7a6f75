"""What `prepare_data` hands the trainer: memory-mapped token splits plus tokenizer facts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
    """Both splits plus what the model and the run dir need to know about the tokenizer."""

    train: TokenData
    val: TokenData
    tokenizer_dir: Path | None   # PreTrainedTokenizerFast-compatible folder (None: pretokenized, no tokenizer)
    vocab_size: int              # len(tokenizer), or data.vocab_size for pretokenized data
    eos_id: int | None           # document separator / BOS id (None: pretokenized without tokenizer)
    pad_id: int | None
    cache_key: str               # the token cache's directory name
    cache_dir: Path | None = None  # the token cache directory itself
