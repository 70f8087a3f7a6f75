"""The `pretokenized` source: token files made elsewhere (nanoGPT `.bin`, numpy `.npy`).

A `.bin` file is raw tokens with no header, so `data.dtype` must say uint16 or uint32. A
`.npy` file carries its dtype, which must match `data.dtype` unless that is `auto`. Every
token must be below the declared `data.pretokenized.vocab_size`. Document boundaries: when a tokenizer is
given (`tokenizer.path`), each EOS token starts a document (the nanoGPT convention puts EOS
before each document); otherwise each file is one document. The split follows corpus.py
(document i is held out by the same rule, or `data.val_paths` are the validation files); when
there is a single document, the last `val_fraction` of its tokens is the validation split.
The tokens are copied into the cache like text corpora, so the loader sees one layout. As a
validation set (`data.val_sets`) every token is validation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from train.data.cache import CACHE_VERSION, build_once
from train.data.corpus import SPLIT_RULE_VERSION
from train.data.errors import DataError
from train.data.fingerprint import TOKEN_SUFFIXES, content_id, file_entry, hash_obj, resolve_paths
from train.data.prepared import PreparedData
from train.data.source import SOURCES, DataSource, PrepareContext
from train.data.tokenize import SPLITS, SplitWriter, dtype_for
from train.data.tokenizer import pretrained_tokenizer

SCAN = 1 << 24  # tokens checked per step, so a huge file never becomes one in-memory array


@dataclass
class PretokenizedConfig:
    """`data.pretokenized`: what the token files cannot say about themselves."""

    vocab_size: int | None = None  # the vocabulary the tokens come from (required): every id is below it


def open_tokens(path: Path, declared: str) -> np.ndarray:
    """A read-only memmap of one token file, its dtype checked against `data.dtype`."""
    if path.suffix.lower() == ".bin":
        if declared == "auto":
            raise DataError("data.dtype", f"{path} is a raw .bin file with no dtype header: set "
                            "data.dtype to uint16 or uint32")
        dt = np.dtype(declared)
        size = path.stat().st_size
        if size % dt.itemsize:
            raise DataError(str(path), f"size {size} bytes is not a multiple of {dt.itemsize} "
                            f"(data.dtype={declared}): wrong dtype?")
        if size == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(path, dtype=dt, mode="r")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(str(path), f"not a readable .npy file: {e}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise DataError(str(path), f"expected a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if declared != "auto" and arr.dtype != np.dtype(declared):
        raise DataError(str(path), f"holds {arr.dtype} tokens but data.dtype={declared}; set "
                        f"data.dtype to {arr.dtype} if that is right, or to auto")
    return arr


def check_range(arr: np.ndarray, vocab_size: int, path: Path, key: str = "data") -> None:
    for lo in range(0, len(arr), SCAN):
        part = np.asarray(arr[lo:lo + SCAN])
        if len(part) == 0:
            continue
        bad = np.flatnonzero((part >= vocab_size) | (part < 0))
        if len(bad):
            i = int(bad[0])
            raise DataError(str(path), f"token id {int(part[i])} at index {lo + i} is outside "
                            f"{key}.pretokenized.vocab_size={vocab_size}")


def doc_starts(arr: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Offsets of the documents in one file: each EOS, and 0 (int64)."""
    if len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    if eos_id is None:
        return np.zeros(1, dtype=np.int64)
    found = [np.flatnonzero(np.asarray(arr[lo:lo + SCAN]) == eos_id) + lo for lo in range(0, len(arr), SCAN)]
    starts = np.concatenate(found).astype(np.int64)
    return starts if len(starts) and starts[0] == 0 else np.concatenate([[0], starts]).astype(np.int64)


def held_out(index: np.ndarray, fraction: float) -> np.ndarray:
    """corpus.is_val for an array of document indices."""
    if fraction <= 0:
        return np.zeros(len(index), dtype=bool)
    return np.floor((index + 1) * fraction + 0.5) > np.floor(index * fraction + 0.5)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) runs of equal values, so consecutive documents of one split are copied at once."""
    edges = [0, *(np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist(), len(mask)]
    return list(zip(edges[:-1], edges[1:]))


def describe(dcfg: Any, eos_id: int | None, full: bool, key: str = "data", all_val: bool = False) -> dict[str, Any]:
    files = resolve_paths(dcfg.paths, TOKEN_SUFFIXES, f"{key}.paths")
    val = resolve_paths(dcfg.val_paths, TOKEN_SUFFIXES, f"{key}.val_paths") if dcfg.val_paths and not all_val else []
    return {"kind": "pretokenized", "dtype": dcfg.dtype, "vocab_size": dcfg.pretokenized.vocab_size,
            "eos_id": eos_id, "val_fraction": 0.0 if val or all_val else dcfg.val_fraction, "all_val": all_val,
            "rule": SPLIT_RULE_VERSION, "files": [file_entry(f, full) for f in files],
            "val_paths": [file_entry(f, full) for f in val]}


def import_tokens(dcfg: Any, eos_id: int | None, out: Path, key: str = "data", all_val: bool = False) -> dict[str, Any]:
    """Check the token files and copy them, split (all to validation with `all_val`), into `out`;
    returns meta fields."""
    vocab = dcfg.pretokenized.vocab_size
    dtype_for(vocab, dcfg.dtype, f"{key}.dtype")   # the declared dtype must hold the vocabulary
    dtype = dtype_for(vocab, "auto")               # the cache uses the smallest that does
    files = resolve_paths(dcfg.paths, TOKEN_SUFFIXES, f"{key}.paths")
    val_files = resolve_paths(dcfg.val_paths, TOKEN_SUFFIXES, f"{key}.val_paths") \
        if dcfg.val_paths and not all_val else []
    fraction = 0.0 if val_files or all_val else dcfg.val_fraction
    writers = {s: SplitWriter(out, s, dtype) for s in SPLITS}
    main_split = "val" if all_val else "train"

    def load(f: Path) -> np.ndarray:
        arr = open_tokens(f, dcfg.dtype)
        check_range(arr, vocab, f, key)
        return arr

    arrays = [load(f) for f in files]
    starts = [doc_starts(a, eos_id) for a in arrays]
    n_docs = sum(len(st) for st in starts)
    try:
        if n_docs == 0:
            raise DataError(f"{key}.paths", "the pretokenized corpus is empty (no tokens)")
        if n_docs == 1 and fraction > 0:  # one long document: hold out its tail
            arr = next(a for a in arrays if len(a))
            cut = len(arr) - int(round(len(arr) * fraction))
            writers[main_split].add_span(arr, 0, cut, np.zeros(1, dtype=np.int64))
            if cut < len(arr):
                writers["val"].add_span(arr, cut, len(arr), np.array([cut], dtype=np.int64))
        else:
            first = 0
            for arr, st in zip(arrays, starts):
                if not len(st):  # an empty file
                    continue
                ends = np.append(st[1:], len(arr))
                val = held_out(np.arange(first, first + len(st)), fraction)
                for lo, hi in runs(val):
                    w = writers["val" if val[lo] else main_split]
                    w.add_span(arr, int(st[lo]), int(ends[hi - 1]), st[lo:hi])
                first += len(st)
        for f in val_files:
            arr = load(f)
            writers["val"].add_span(arr, 0, len(arr), doc_starts(arr, eos_id))
    finally:
        counts = {s: w.close() for s, w in writers.items()}
    return {"splits": counts, "dtype": dtype.name}


@SOURCES.register("pretokenized", config=PretokenizedConfig)
class Pretokenized(DataSource):
    """Token files; a tokenizer (`tokenizer.path`) is optional and only marks documents."""

    def check(self, dcfg: Any, path: str) -> None:
        if not dcfg.paths:
            raise DataError(f"{path}.paths", "data.source=pretokenized needs at least one path")
        if dcfg.pretokenized.vocab_size is None:
            raise DataError(f"{path}.pretokenized.vocab_size", "data.source=pretokenized needs the vocabulary "
                            "size of the tokens")
        if dcfg.pretokenized.vocab_size < 1:
            raise DataError(f"{path}.pretokenized.vocab_size", f"must be >= 1, got {dcfg.pretokenized.vocab_size}")

    def vocab_size(self, dcfg: Any) -> int | None:
        return dcfg.pretokenized.vocab_size

    def has_tokenizer(self, cfg: Any) -> bool:
        return cfg.tokenizer.path is not None

    def prepare(self, ctx: PrepareContext, dcfg: Any, key: str) -> PreparedData:
        from train.data.prepare import finish

        vocab = dcfg.pretokenized.vocab_size
        all_val = ctx.role == "val"
        if all_val:
            tok = ctx.tokenizer
        else:
            path = ctx.cfg.tokenizer.path
            tok = pretrained_tokenizer(ctx.root, path, ctx.progress) if path else None
        if tok and tok.vocab_size > vocab:
            raise DataError(f"{key}.pretokenized.vocab_size", f"the tokenizer has {tok.vocab_size} tokens, more "
                            f"than {key}.pretokenized.vocab_size={vocab}")
        eos_id = tok.eos_id if tok else None
        dtype_for(vocab, dcfg.dtype, f"{key}.dtype")   # fail before any reading when the dtype cannot hold it
        inputs = content_id(ctx.root / "index", lambda full: describe(dcfg, eos_id, full, key, all_val),
                            ctx.full_hash)
        key_desc = {"version": CACHE_VERSION, "inputs": inputs, "tokenizer": tok.sha256 if tok else None}
        entry = ctx.root / "tokens" / f"pretokenized-{hash_obj(key_desc)}"

        def build(tmp: Path) -> dict[str, Any]:
            out = import_tokens(dcfg, eos_id, tmp, key, all_val)
            return {**out, "vocab_size": vocab, "eos_id": eos_id, "key": key_desc,
                    "what": f"{key}.source=pretokenized"}

        meta, _ = build_once(ctx.root, entry, build, ctx.progress)
        needs_val = all_val or bool(dcfg.val_paths) or dcfg.val_fraction > 0
        return finish(ctx, entry, meta, tok, needs_val, vocab, key)
