"""A corpus: text sources split into train and validation documents.

The split is by document and does not depend on `seed` or `data.seed` (runs that differ only
in their data order are validated on the same text):
- `data.val_paths` given: those files (read like `files` sources) are the validation split and
  every document of the main source is training text;
- otherwise document i (0-based, in source order) is held out when
  floor((i+1)*f + 1/2) > floor(i*f + 1/2), f = `data.val_fraction`: evenly spread documents,
  round(n*f) of n in total (every 20th for f = 0.05, starting with the 10th). This needs no
  count up front, so sources stream.

Mixtures (`data.source: mixture`) split each entry the same way with the parent's
`val_fraction` (an entry's own `val_fraction`/`val_paths` are not used), then interleave the
entries' documents so that each entry's share of the UTF-8 bytes follows its weight: the next
document always comes from the entry furthest below its share, and the mixture ends when that
entry has no document left (no document is repeated, so a small entry with a large weight
limits the mixture's size). The training documents of each entry are first shuffled with
`data.seed`; the validation mixture and the tokenizer's training text use the entries'
documents in source order, so neither depends on the seed. Mixtures are held in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from train.data.errors import DataError
from train.data.sources import TextSource, files_source, text_source

SPLIT_RULE_VERSION = 1


def is_val(i: int, fraction: float) -> bool:
    """Whether document i goes to validation (see the module docstring)."""
    return fraction > 0 and math.floor((i + 1) * fraction + 0.5) > math.floor(i * fraction + 0.5)


@dataclass
class Corpus:
    """Documents tagged with their split, with what the cache keys need to know about them."""

    key: str                                    # the config key that names this corpus in errors
    describe: Callable[[bool], dict[str, Any]]  # everything that decides the split documents
    tokenizer_describe: Callable[[bool], dict[str, Any]]  # everything that decides tokenizer text
    split_docs: Callable[[], Iterator[tuple[str, str]]]   # ("train" | "val", text), in order
    train_texts: Callable[[], Iterator[str]]    # the tokenizer's training text
    total_bytes: int | None
    needs_val: bool                             # a validation split was asked for


def _split(docs: Iterable[str], fraction: float) -> Iterator[tuple[str, str]]:
    for i, doc in enumerate(docs):
        yield ("val" if is_val(i, fraction) else "train"), doc


def single_corpus(dcfg: Any, key: str) -> Corpus:
    """The Corpus of one source of documents (its held-out split, or `val_paths`)."""
    source = text_source(dcfg, key)
    val = files_source(dcfg.val_paths, dcfg.text_field, dcfg.encoding_errors, f"{key}.val_paths") \
        if dcfg.val_paths else None
    fraction = 0.0 if val else dcfg.val_fraction

    def tokenizer_describe(full: bool) -> dict[str, Any]:
        return {"source": source.describe(full), "val_fraction": fraction, "rule": SPLIT_RULE_VERSION}

    def describe(full: bool) -> dict[str, Any]:
        return {**tokenizer_describe(full), "val_paths": val.describe(full) if val else None}

    def split_docs() -> Iterator[tuple[str, str]]:
        yield from _split(source.docs(), fraction)
        if val:
            for doc in val.docs():
                yield "val", doc

    def train_texts() -> Iterator[str]:
        return (doc for split, doc in _split(source.docs(), fraction) if split == "train")

    total = None
    if source.total_bytes is not None:
        total = source.total_bytes + ((val.total_bytes or 0) if val else 0)
    return Corpus(source.key, describe, tokenizer_describe, split_docs, train_texts, total,
                  needs_val=bool(val) or fraction > 0)


def interleave(weights: list[float], lists: list[list[tuple[str, int]]]) -> list[str]:
    """Documents from each list in turn so that byte shares follow the weights (see above)."""
    total_w = sum(weights)
    shares = [w / total_w for w in weights]
    taken = [0] * len(lists)
    used = [0] * len(lists)
    out: list[str] = []
    while True:
        i = min(range(len(lists)), key=lambda k: (used[k] / shares[k], k))
        if taken[i] == len(lists[i]):
            return out
        text, nbytes = lists[i][taken[i]]
        out.append(text)
        taken[i] += 1
        used[i] += nbytes


def mixture_corpus(dcfg: Any, key: str) -> Corpus:
    """The Corpus of `data.mixture`: its entries interleaved by weight (module docstring)."""
    entries = dcfg.mixture_sources(key)
    sources: list[TextSource] = []
    for i, (_, child) in enumerate(entries):
        sources.append(text_source(child, f"{key}.mixture[{i}]"))
    weights = [w for w, _ in entries]
    val = files_source(dcfg.val_paths, dcfg.text_field, dcfg.encoding_errors, f"{key}.val_paths") \
        if dcfg.val_paths else None
    fraction = 0.0 if val else dcfg.val_fraction
    cached: dict[str, Any] = {}

    def tokenizer_describe(full: bool) -> dict[str, Any]:
        return {"mixture": [[w, s.describe(full)] for w, s in zip(weights, sources)],
                "val_fraction": fraction, "rule": SPLIT_RULE_VERSION}

    def describe(full: bool) -> dict[str, Any]:
        return {**tokenizer_describe(full), "seed": dcfg.seed,
                "val_paths": val.describe(full) if val else None}

    def parts() -> tuple[list[list[tuple[str, int]]], list[list[tuple[str, int]]]]:
        """Each entry's (train, val) documents with their byte sizes, read once."""
        if not cached:
            trains, vals = [], []
            for i, s in enumerate(sources):
                tr, va = [], []
                for split, doc in _split(s.docs(), fraction):
                    (va if split == "val" else tr).append((doc, len(doc.encode("utf-8"))))
                if not tr:
                    raise DataError(f"{key}.mixture[{i}]", f"source '{s.name}' has no training documents")
                trains.append(tr)
                vals.append(va)
            cached["parts"] = (trains, vals)
        return cached["parts"]

    def split_docs() -> Iterator[tuple[str, str]]:
        trains, vals = parts()
        shuffled = []
        for i, tr in enumerate(trains):
            order = np.random.default_rng([abs(dcfg.seed), i]).permutation(len(tr))
            shuffled.append([tr[j] for j in order])
        for doc in interleave(weights, shuffled):
            yield "train", doc
        if val:
            for doc in val.docs():
                yield "val", doc
        else:
            for doc in interleave(weights, vals):
                yield "val", doc

    def train_texts() -> Iterator[str]:
        return iter(interleave(weights, parts()[0]))

    return Corpus(f"{key}.mixture", describe, tokenizer_describe, split_docs, train_texts, None,
                  needs_val=bool(val) or fraction > 0)


def build_corpus(dcfg: Any, key: str = "data") -> Corpus:
    """The Corpus of a text data section, as its registered source builds it."""
    from train.data.source import source
    kind = source(dcfg.source, f"{key}.source")
    if not kind.text:
        raise DataError(f"{key}.source", f"'{dcfg.source}' is not a text source")
    return kind.corpus(dcfg, key)
