"""`prepare_data`: from a config to the training source's Dataset; `prepare_val_sets`: every
validation set. Each source prepares itself (train/data/source.py); the token sources end here,
opening their cache entry's splits and checking they hold a window each. The sequence length is
not part of any cache key: the loader cuts windows on the fly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from train.data.cache import cache_root
from train.data.errors import DataError
from train.data.fingerprint import clear_hash_memo
from train.data.prepared import PreparedData, TokenData
from train.data.source import PrepareContext, source
from train.data.tokenize import SPLITS
from train.data.tokenizer import TokenizerInfo, copy_tokenizer_dir

HELDOUT = "heldout"     # the validation set that is the training source's held-out split


def open_split(entry: Path, split: str, meta: dict[str, Any], vocab_size: int, pad_id: int | None) -> TokenData:
    """A split of a cache entry as a memmap, its size checked against meta.json."""
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"])
    path = entry / f"{split}.bin"
    try:
        size = path.stat().st_size
        doc_starts = np.load(entry / f"{split}.docs.npy")
    except (OSError, ValueError) as e:
        raise DataError(str(entry), f"damaged cache entry ({e}); delete the folder to rebuild it") from None
    if size != info["tokens"] * dtype.itemsize or len(doc_starts) != info["docs"]:
        raise DataError(str(path), f"damaged cache entry: {size} bytes, meta.json says "
                        f"{info['tokens']} {dtype.name} tokens; delete the folder to rebuild it")
    tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
    return TokenData(tokens, doc_starts.astype(np.int64, copy=False), vocab_size, pad_id)


def check_windows(data: PreparedData, seq_len: int, needs_val: bool, what: str, train: bool = True,
                  key: str = "data") -> None:
    """Each split must hold at least one window of seq_len + 1 tokens (training unless this is a
    validation set; validation only if asked for)."""
    need = seq_len + 1
    if train and len(data.train) < need:
        raise DataError("data.seq_len", f"{what}: the training split has {len(data.train)} tokens "
                        f"({data.train.n_docs} documents), fewer than one window of seq_len + 1 = {need}; "
                        "use more text or a shorter data.seq_len")
    if needs_val and len(data.val) < need:
        raise DataError(f"{key}.val_fraction" if train else f"{key}.source", f"{what}: the validation split has {len(data.val)} tokens "
                        f"({data.val.n_docs} documents), fewer than one window of seq_len + 1 = {need}; "
                        "raise data.val_fraction, add documents or give data.val_paths")


def finish(ctx: PrepareContext, entry: Path, meta: dict[str, Any], tok: TokenizerInfo | None, needs_val: bool,
           vocab_size: int, key: str = "data") -> PreparedData:
    """Open a built cache entry as PreparedData, checking each split holds a window."""
    pad_id = tok.pad_id if tok else None
    splits = {s: open_split(entry, s, meta, vocab_size, pad_id) for s in SPLITS}
    prepared = PreparedData(splits["train"], splits["val"], tok.dir if tok else None, vocab_size,
                            tok.eos_id if tok else None, pad_id, entry.name, entry, tok)
    check_windows(prepared, ctx.cfg.data.seq_len, needs_val, meta.get("what", entry.name),
                  train=ctx.role == "train", key=key)
    return prepared


def prepare_data(cfg: Any, full_hash: bool = False, progress: bool = True) -> Any:
    """Prepare `cfg`'s training source (`data.source`, through SOURCES) and return its Dataset.

    Token sources build their cache once and memory-map it; `full_hash=True` (`ablate data
    prepare`) re-hashes the input files' contents instead of trusting sizes and mtimes. Raises
    DataError (exit 2) on bad input."""
    clear_hash_memo()
    ctx = PrepareContext(cfg, cache_root(cfg.data.cache_dir), full_hash, progress)
    return source(cfg.data.source).prepare(ctx, cfg.data, "data")


def prepare_val_sets(cfg: Any, data: Any, full_hash: bool = False, progress: bool = True) -> dict[str, Any]:
    """{set name: Dataset} of every validation set: `heldout` (the training source's held-out split,
    when it has one) then each `data.val_sets` entry in order, prepared with the run's tokenizer."""
    out: dict[str, Any] = {}
    if data.val_samples(cfg.data.seq_len) is not None:
        out[HELDOUT] = data
    tok = getattr(data, "tokenizer", None)
    for name, dcfg in cfg.data.val_set_configs().items():
        key = f"data.val_sets.{name}"
        ctx = PrepareContext(cfg, cache_root(cfg.data.cache_dir), full_hash, progress, tokenizer=tok, role="val")
        val = source(dcfg.source, f"{key}.source").prepare(ctx, dcfg, key)
        if val.vocab_size > data.vocab_size:
            raise DataError(f"{key}.source", f"the set's vocabulary ({val.vocab_size}) is larger than the training "
                            f"source's ({data.vocab_size}): its tokens would be outside the model's embedding")
        out[name] = val
    return out


def copy_tokenizer(prepared: PreparedData, dest: Path) -> None:
    """Copy the tokenizer folder into the run dir (RUN_DIR/tokenizer), so it travels with the run."""
    if prepared.tokenizer_dir is not None:
        copy_tokenizer_dir(prepared.tokenizer_dir, Path(dest))
