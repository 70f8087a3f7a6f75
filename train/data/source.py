"""Data sources: one registry (`SOURCES`), one batch interface, any number of validation sets.

A source is registered under the name `data.source` selects, with an optional config dataclass
that appears at `data.<name>` (e.g. `data.hf`, `data.pretokenized`):

    @SOURCES.register("name", config=NameConfig)
    class NameSource(DataSource):
        def prepare(self, ctx, dcfg, key) -> Dataset: ...

`prepare` returns a `Dataset`: its vocabulary (which resolves `model.vocab_size`), its tokenizer
(optional: synthetic sources have their own vocabulary), and two kinds of `Samples`: training
samples addressed by a global sample index (so the loader's state stays one integer and resume
stays exact) and validation samples in a fixed order. A batch of either is a dict of int64
tensors: `input_ids` (B, T), `labels` (B, T; -100 wherever no loss is taken: padding, prompts,
non-answer positions), `doc_ids` (B, T) and `indices` (B,). A dataset may add validation
metrics computed from the logits (e.g. answer accuracy); they appear in `val` rows.

Sources are imported (and so registered) by `registered_sources()`; a new source is one file
added to BUILTIN_MODULES.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from models.registry import Registry


@runtime_checkable
class Samples(Protocol):
    """Batches by sample index. Training: any global index >= 0 (the source decides the order,
    epochs included); validation: indices 0 .. len - 1, always the same samples."""

    def __len__(self) -> int: ...
    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]: ...


class Dataset(Protocol):
    """A prepared source: what the trainer, the eval hook and the run dir need from it."""

    vocab_size: int               # the token ids' range (model.vocab_size is resolved from it)
    tokenizer_dir: Path | None    # a transformers-loadable folder, or None (no tokenizer)
    eos_id: int | None
    pad_id: int | None
    cache_key: str                # names the prepared data (token cache entry, generator settings)
    val_metric_names: tuple[str, ...]   # what val_metrics returns; empty: no logits are needed

    def train_samples(self, seq_len: int, seed: int) -> Samples: ...
    def val_samples(self, seq_len: int) -> Samples | None: ...       # None: no validation split
    def val_metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        """{name: (sum, count)} over one batch; the val row gets sum / count over all batches."""
    def summary(self) -> dict[str, Any]: ...                          # fields of the `data` event


@dataclass
class PrepareContext:
    """What every source's `prepare` may use."""

    cfg: Any                      # the run config (tokenizer section, data.seq_len, ...)
    root: Path                    # the cache root
    full_hash: bool               # re-hash input files instead of trusting size and mtime
    progress: bool
    tokenizer: Any = None         # the run's TokenizerInfo, when preparing a validation set
    role: str = "train"           # "train": the run's source; "val": a data.val_sets entry


class DataSource:
    """Base class of a registered source. Subclasses implement `prepare`; the rest has defaults."""

    text = False                  # documents tokenized with the run's tokenizer (mixable, val sets)

    def check(self, dcfg: Any, path: str) -> None:
        """Config checks of the `data` keys this source needs (called by DataConfig.validate)."""

    def vocab_size(self, dcfg: Any) -> int | None:
        """The vocabulary when the config alone knows it (None: the tokenizer's)."""
        return None

    def has_tokenizer(self, cfg: Any) -> bool:
        """Whether a run on this source has a tokenizer (lm-eval and text generation need one)."""
        return self.text

    def prepare(self, ctx: PrepareContext, dcfg: Any, key: str) -> Any:
        raise NotImplementedError


class SourceProtocol(Protocol):
    text: bool
    def check(self, dcfg: Any, path: str) -> None: ...
    def vocab_size(self, dcfg: Any) -> int | None: ...
    def has_tokenizer(self, cfg: Any) -> bool: ...
    def prepare(self, ctx: PrepareContext, dcfg: Any, key: str) -> Any: ...


SOURCES = Registry("data source", SourceProtocol)

# The modules that register the built-in sources (one source family per file).
BUILTIN_MODULES = ("train.data.text", "train.data.pretokenized", "train.data.mqar")
_loaded = False


def registered_sources() -> Registry:
    """SOURCES with every built-in source registered (imported on first use)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(name)
    return SOURCES


def source(name: str, key: str = "data.source") -> DataSource:
    """The registered source `name`; an unknown one is a ConfigError naming `key`."""
    return registered_sources().get(name, key)()


def no_tokenizer_reason(cfg: Any) -> str | None:
    """Why a run of `cfg` has no tokenizer (None when it has one): the eval hook and `ablate eval`
    skip with this reason instead of failing."""
    if source(cfg.data.source).has_tokenizer(cfg):
        return None
    return f"the run has no tokenizer (data.source={cfg.data.source} has its own vocabulary)"


def source_configs() -> dict[str, type]:
    """{name: config dataclass} of every source that has one: the `data.<name>` sections."""
    reg = registered_sources()
    return {n: c for n in reg.names() if (c := reg.config_class(n)) is not None}
