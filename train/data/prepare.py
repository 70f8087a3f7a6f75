"""`prepare_data`: from a config to memory-mapped token splits, building the cache once.

Order of work: describe the inputs (cheap, see fingerprint.py) -> tokenizer (trained or loaded,
cached under its own key) -> token cache keyed by the inputs, the tokenizer's tokenizer.json hash,
the split settings and CACHE_VERSION -> open the splits and check they hold a window each. The
sequence length is not part of the key: the loader cuts windows on the fly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from train.data import pretokenized
from train.data.cache import CACHE_VERSION, build_once, cache_root
from train.data.corpus import build_corpus
from train.data.errors import DataError
from train.data.fingerprint import clear_hash_memo, content_id, hash_obj
from train.data.prepared import PreparedData, TokenData
from train.data.tokenize import SPLITS, dtype_for, tokenize_corpus
from train.data.tokenizer import TokenizerInfo, bpe_tokenizer, copy_tokenizer_dir, pretrained_tokenizer


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


def check_windows(data: PreparedData, seq_len: int, needs_val: bool, what: str) -> None:
    """Each split must hold at least one window of seq_len + 1 tokens (validation only if asked for)."""
    need = seq_len + 1
    if len(data.train) < need:
        raise DataError("data.seq_len", f"{what}: the training split has {len(data.train)} tokens "
                        f"({data.train.n_docs} documents), fewer than one window of seq_len + 1 = {need}; "
                        "use more text or a shorter data.seq_len")
    if needs_val and len(data.val) < need:
        raise DataError("data.val_fraction", f"{what}: the validation split has {len(data.val)} tokens "
                        f"({data.val.n_docs} documents), fewer than one window of seq_len + 1 = {need}; "
                        "raise data.val_fraction, add documents or give data.val_paths")


def _finish(cfg: Any, entry: Path, meta: dict[str, Any], tok: TokenizerInfo | None, needs_val: bool,
            vocab_size: int) -> PreparedData:
    pad_id = tok.pad_id if tok else None
    splits = {s: open_split(entry, s, meta, vocab_size, pad_id) for s in SPLITS}
    prepared = PreparedData(splits["train"], splits["val"], tok.dir if tok else None, vocab_size,
                            tok.eos_id if tok else None, pad_id, entry.name, entry)
    check_windows(prepared, cfg.data.seq_len, needs_val, meta.get("what", entry.name))
    return prepared


def _corpus_files(corpus: Any) -> str:
    """The files behind a corpus, for an error message (its source kind when it has none)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "path" in node and "size" in node:
                found.append(f"{node['path']} ({node['size']} bytes)")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    desc = corpus.describe(False)
    walk(desc)
    return ", ".join(found) if found else f"data.source={desc.get('source', {}).get('kind', '?')}"


def _prepare_text(cfg: Any, root: Path, full_hash: bool, progress: bool) -> PreparedData:
    d = cfg.data
    corpus = build_corpus(d)
    index = root / "index"
    tok: TokenizerInfo
    if cfg.tokenizer.kind == "pretrained":
        tok = pretrained_tokenizer(root, cfg.tokenizer.path, progress)
    else:
        text_id = content_id(index, corpus.tokenizer_describe, full_hash)
        try:
            tok = bpe_tokenizer(root, cfg.tokenizer, text_id, corpus.train_texts, progress)
        except DataError as e:
            if "corpus is empty" not in str(e):
                raise
            raise DataError(corpus.key, f"the corpus is empty: no non-empty training documents in "
                                        f"{_corpus_files(corpus)}") from None
    dtype = dtype_for(tok.vocab_size, d.dtype)
    inputs = content_id(index, corpus.describe, full_hash)
    key_desc = {"version": CACHE_VERSION, "inputs": inputs, "tokenizer": tok.sha256, "dtype": dtype.name}
    entry = root / "tokens" / f"{d.source}-{hash_obj(key_desc)}"

    def build(tmp: Path) -> dict[str, Any]:
        counts = tokenize_corpus(corpus.split_docs(), (tok.dir / "tokenizer.json").read_text(), tok.eos_id,
                                 dtype, tmp, d.num_proc, corpus.total_bytes, progress)
        if counts["train"]["docs"] + counts["val"]["docs"] == 0:
            raise DataError(corpus.key, f"the corpus is empty: no non-empty documents in {_corpus_files(corpus)}")
        return {"splits": counts, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "pad_id": tok.pad_id, "tokenizer": tok.key, "key": key_desc, "what": f"data.source={d.source}"}

    meta, _ = build_once(root, entry, build, progress)
    return _finish(cfg, entry, meta, tok, corpus.needs_val, tok.vocab_size)


def _prepare_pretokenized(cfg: Any, root: Path, full_hash: bool, progress: bool) -> PreparedData:
    d = cfg.data
    tok = pretrained_tokenizer(root, cfg.tokenizer.path, progress) if cfg.tokenizer.path else None
    if tok and tok.vocab_size > d.vocab_size:
        raise DataError("data.vocab_size", f"the tokenizer has {tok.vocab_size} tokens, more than "
                        f"data.vocab_size={d.vocab_size}")
    eos_id = tok.eos_id if tok else None
    dtype_for(d.vocab_size, d.dtype)  # fail before any reading when the dtype cannot hold the vocabulary
    inputs = content_id(root / "index", lambda full: pretokenized.describe(d, eos_id, full), full_hash)
    key_desc = {"version": CACHE_VERSION, "inputs": inputs, "tokenizer": tok.sha256 if tok else None}
    entry = root / "tokens" / f"pretokenized-{hash_obj(key_desc)}"

    def build(tmp: Path) -> dict[str, Any]:
        out = pretokenized.import_tokens(d, eos_id, tmp)
        return {**out, "vocab_size": d.vocab_size, "eos_id": eos_id, "key": key_desc,
                "what": "data.source=pretokenized"}

    meta, _ = build_once(root, entry, build, progress)
    needs_val = bool(d.val_paths) or d.val_fraction > 0
    return _finish(cfg, entry, meta, tok, needs_val, d.vocab_size)


def prepare_data(cfg: Any, full_hash: bool = False, progress: bool = True) -> PreparedData:
    """Tokenize `cfg`'s data into the cache (once) and open it.

    `full_hash=True` (`ablate data prepare`) re-hashes the input files' contents instead of
    trusting their sizes and mtimes. Raises DataError (exit 2) on bad input.
    """
    root = cache_root(cfg.data.cache_dir)
    clear_hash_memo()
    if cfg.data.source == "pretokenized":
        return _prepare_pretokenized(cfg, root, full_hash, progress)
    return _prepare_text(cfg, root, full_hash, progress)


def copy_tokenizer(prepared: PreparedData, dest: Path) -> None:
    """Copy the tokenizer folder into the run dir (RUN_DIR/tokenizer), so it travels with the run."""
    if prepared.tokenizer_dir is not None:
        copy_tokenizer_dir(prepared.tokenizer_dir, Path(dest))
