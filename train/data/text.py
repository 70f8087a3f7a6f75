"""The text sources (`embedded`, `files`, `hf`, `mixture`) and their tokenized pipeline.

Each yields documents (train/data/sources.py reads them, train/data/corpus.py splits and
mixes them); the shared pipeline here trains or loads the tokenizer and tokenizes the corpus
into the token cache once: describe the inputs (cheap, see fingerprint.py) -> tokenizer
(cached under its own key) -> token cache keyed by the inputs, the tokenizer's tokenizer.json
hash, the split settings and CACHE_VERSION. As a validation set (`data.val_sets`) a text source
is tokenized whole, in source order, with the run's tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from train.data.cache import CACHE_VERSION, build_once
from train.data.corpus import Corpus, mixture_corpus, single_corpus
from train.data.errors import DataError
from train.data.fingerprint import content_id, hash_obj
from train.data.prepared import PreparedData
from train.data.source import SOURCES, DataSource, PrepareContext
from train.data.sources import TextSource, embedded_source, files_source, hf_source
from train.data.tokenize import dtype_for, tokenize_corpus
from train.data.tokenizer import TokenizerInfo, bpe_tokenizer, pretrained_tokenizer


@dataclass
class EmbeddedConfig:
    """`data.embedded`: the corpus every Python installation ships (train/data/embedded.py)."""

    max_bytes: int = 6_000_000     # cap on the corpus size (documents are added while they fit)


@dataclass
class HFSourceConfig:
    """`data.hf`: a Hugging Face dataset (`datasets.load_dataset`)."""

    name: str | None = None        # dataset name or builder (json, parquet, ... with data.paths as data_files)
    config: str | None = None      # the dataset's configuration name
    split: str = "train"           # the split read as documents
    streaming: bool = False        # stream instead of downloading the whole split first
    max_docs: int | None = None    # stop after this many rows


class TextKind(DataSource):
    """A source of documents, tokenized by the shared pipeline below."""

    text = True

    def documents(self, dcfg: Any, key: str) -> TextSource:
        raise NotImplementedError

    def corpus(self, dcfg: Any, key: str) -> Corpus:
        """The documents split into train and validation (train/data/corpus.py)."""
        return single_corpus(dcfg, key)

    def prepare(self, ctx: PrepareContext, dcfg: Any, key: str) -> PreparedData:
        return prepare_text(ctx, self.corpus(dcfg, key), dcfg, key)


@SOURCES.register("embedded", config=EmbeddedConfig)
class Embedded(TextKind):
    def check(self, dcfg: Any, path: str) -> None:
        if dcfg.embedded.max_bytes < 1:
            raise DataError(f"{path}.embedded.max_bytes", f"must be >= 1, got {dcfg.embedded.max_bytes}")

    def documents(self, dcfg: Any, key: str) -> TextSource:
        return embedded_source(dcfg.embedded.max_bytes, f"{key}.source")


@SOURCES.register("files")
class Files(TextKind):
    def check(self, dcfg: Any, path: str) -> None:
        if not dcfg.paths:
            raise DataError(f"{path}.paths", "data.source=files needs at least one path")

    def documents(self, dcfg: Any, key: str) -> TextSource:
        return files_source(dcfg.paths, dcfg.text_field, dcfg.encoding_errors, f"{key}.paths")


@SOURCES.register("hf", config=HFSourceConfig)
class HF(TextKind):
    def check(self, dcfg: Any, path: str) -> None:
        if dcfg.hf.name is None:
            raise DataError(f"{path}.hf.name", "data.source=hf needs a dataset name")

    def documents(self, dcfg: Any, key: str) -> TextSource:
        return hf_source(dcfg, key)


@SOURCES.register("mixture")
class Mixture(TextKind):
    """Weighted text sources (train/data/corpus.py says how they interleave)."""

    def check(self, dcfg: Any, path: str) -> None:
        if not dcfg.mixture:
            raise DataError(f"{path}.mixture", "data.source=mixture needs at least one entry")

    def corpus(self, dcfg: Any, key: str) -> Corpus:
        return mixture_corpus(dcfg, key)


# ----------------------------------------------------------------------------- the pipeline
def _corpus_files(corpus: Corpus) -> str:
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


def _as_validation(corpus: Corpus) -> Corpus:
    """Every document of `corpus` (built with val_fraction 0, so in source order) as validation."""
    def split_docs() -> Iterator[tuple[str, str]]:
        return (("val", doc) for doc in corpus.train_texts())

    return Corpus(corpus.key, lambda full: {"validation_set": corpus.describe(full)}, corpus.tokenizer_describe,
                  split_docs, corpus.train_texts, corpus.total_bytes, needs_val=True)


def _tokenizer(ctx: PrepareContext, corpus: Corpus, key: str) -> TokenizerInfo:
    if ctx.role == "val":
        if ctx.tokenizer is None:
            raise DataError(f"{key}.source", "a text validation set needs the run's tokenizer, and this run's "
                            "data.source has none; use a source with its own vocabulary")
        return ctx.tokenizer
    tcfg = ctx.cfg.tokenizer
    if tcfg.kind == "pretrained":
        return pretrained_tokenizer(ctx.root, tcfg.path, ctx.progress)
    text_id = content_id(ctx.root / "index", corpus.tokenizer_describe, ctx.full_hash)
    try:
        return bpe_tokenizer(ctx.root, tcfg, text_id, corpus.train_texts, ctx.progress)
    except DataError as e:
        if "corpus is empty" not in str(e):
            raise
        raise DataError(corpus.key, f"the corpus is empty: no non-empty training documents in "
                                    f"{_corpus_files(corpus)}") from None


def prepare_text(ctx: PrepareContext, corpus: Corpus, dcfg: Any, key: str) -> PreparedData:
    """Tokenizer, then the token cache entry of `corpus` (built once), opened."""
    from train.data.prepare import finish

    if ctx.role == "val":
        corpus = _as_validation(corpus)
    tok = _tokenizer(ctx, corpus, key)
    dtype = dtype_for(tok.vocab_size, dcfg.dtype, f"{key}.dtype")
    inputs = content_id(ctx.root / "index", corpus.describe, ctx.full_hash)
    key_desc = {"version": CACHE_VERSION, "inputs": inputs, "tokenizer": tok.sha256, "dtype": dtype.name}
    entry = ctx.root / "tokens" / f"{dcfg.source}-{hash_obj(key_desc)}"

    def build(tmp: Path) -> dict[str, Any]:
        counts = tokenize_corpus(corpus.split_docs(), (tok.dir / "tokenizer.json").read_text(), tok.eos_id,
                                 dtype, tmp, dcfg.num_proc, corpus.total_bytes, ctx.progress)
        if counts["train"]["docs"] + counts["val"]["docs"] == 0:
            raise DataError(corpus.key, f"the corpus is empty: no non-empty documents in {_corpus_files(corpus)}")
        return {"splits": counts, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                "pad_id": tok.pad_id, "tokenizer": tok.key, "key": key_desc, "what": f"{key}.source={dcfg.source}"}

    meta, _ = build_once(ctx.root, entry, build, ctx.progress)
    return finish(ctx, entry, meta, tok, corpus.needs_val, tok.vocab_size, key)
