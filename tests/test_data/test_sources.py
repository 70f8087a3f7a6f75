"""Sources: files (txt, jsonl, json, parquet, folders, globs), embedded, hf, mixtures, the split."""
from __future__ import annotations

import json

import numpy as np
import pytest

from train.data import prepare_data
from train.data.corpus import build_corpus, interleave, is_val
from train.data.embedded import embedded_docs
from train.data.sources import TXT_DOC_CHARS, split_txt, text_source


def docs_of(cfg) -> list[str]:
    return list(text_source(cfg.data).docs())


def test_txt_folder_one_document_per_short_file(write_docs, make_cfg):
    folder = write_docs(12, words=60)
    docs = docs_of(make_cfg({"source": "files", "paths": [str(folder)]}))
    assert len(docs) == 12
    assert docs[0] == (folder / "doc0000.txt").read_text()


def test_txt_long_file_is_cut_at_blank_lines():
    paragraphs = [f"paragraph {i} " + "x" * 300 for i in range(100)]
    text = "\n\n".join(paragraphs) + "\n"
    docs = list(split_txt(text))
    assert 5 <= len(docs) <= 10
    assert all(len(d) >= TXT_DOC_CHARS for d in docs[:-1])
    assert "\n\n".join(d.rstrip("\n") for d in docs) == text.rstrip("\n")  # nothing lost but separators
    assert list(split_txt("one line, no blank lines " * 500)) == ["one line, no blank lines " * 500]


def test_jsonl_json_parquet_globs(tmp_path, make_cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"body": "alpha"}\n\n{"body": "beta"}\n')
    (tmp_path / "d" / "b.json").write_text(json.dumps([{"body": "gamma"}, {"body": "delta"}]))
    pq.write_table(pa.table({"body": ["epsilon", "zeta"], "n": [1, 2]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "skip.csv").write_text("ignored")
    cfg = make_cfg({"source": "files", "paths": [str(tmp_path / "d")], "text_field": "body"})
    assert docs_of(cfg) == ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    cfg = make_cfg({"source": "files", "paths": [str(tmp_path / "d" / "*.json*")], "text_field": "body"})
    assert docs_of(cfg) == ["alpha", "beta", "gamma", "delta"]
    cfg = make_cfg({"source": "files", "paths": [str(tmp_path / "**" / "*.parquet")], "text_field": "body"})
    assert docs_of(cfg) == ["epsilon", "zeta"]


def test_val_split_rule_is_exact_and_spread():
    held = [i for i in range(200) if is_val(i, 0.05)]
    assert held == list(range(9, 200, 20))
    assert sum(is_val(i, 0.1) for i in range(10)) == 1
    assert not any(is_val(i, 0.0) for i in range(100))


def test_files_prepare_splits_documents(write_docs, make_cfg):
    folder = write_docs(40)
    p = prepare_data(make_cfg({"source": "files", "paths": [str(folder)], "val_fraction": 0.1}), progress=False)
    assert p.train.n_docs == 36 and p.val.n_docs == 4
    for split in (p.train, p.val):
        assert split.doc_starts[0] == 0
        assert (np.asarray(split.tokens)[split.doc_starts] == p.eos_id).all()
        assert np.count_nonzero(np.asarray(split.tokens) == p.eos_id) == split.n_docs
    assert p.train.tokens.dtype == np.uint16 and p.vocab_size <= 320


def test_val_paths_are_the_validation_split(write_docs, make_cfg):
    train = write_docs(20, name="train")
    val = write_docs(3, kind="jsonl", name="val", seed=1)
    p = prepare_data(make_cfg({"source": "files", "paths": [str(train)], "val_paths": [str(val)]}), progress=False)
    assert p.train.n_docs == 20 and p.val.n_docs == 3


def test_embedded_is_deterministic_and_capped():
    a = list(embedded_docs(300_000))
    b = list(embedded_docs(300_000))
    assert a == b and len(a) > 10
    assert sum(len(d.encode()) for d in a) <= 300_000
    full = sum(len(d.encode()) for d in embedded_docs(6_000_000))
    assert full > 4_000_000  # the default corpus is several MB


def test_embedded_prepare(make_cfg):
    cfg = make_cfg({"source": "embedded", "embedded": {"max_bytes": 200_000}, "val_fraction": 0.1})
    p = prepare_data(cfg, progress=False)
    assert len(p.train) > 20_000 and len(p.val) > 33
    counts = np.bincount(np.asarray(p.train.tokens), minlength=p.vocab_size) / len(p.train)
    counts = counts[counts > 0]
    assert -(counts * np.log2(counts)).sum() > 6.0  # unigram entropy in bits: far from trivial


def test_hf_source_through_datasets_with_local_json(write_docs, make_cfg):
    path = write_docs(30, kind="jsonl")
    cfg = make_cfg({"source": "hf", "hf": {"name": "json", "max_docs": 25}, "paths": [str(path)], "val_fraction": 0.2})
    assert len(docs_of(cfg)) == 25
    p = prepare_data(cfg, progress=False)
    assert p.train.n_docs == 20 and p.val.n_docs == 5
    streamed = make_cfg({"source": "hf", "hf": {"name": "json", "streaming": True}, "paths": [str(path)]})
    assert docs_of(streamed) == [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_interleave_follows_byte_weights():
    a = [("a" * 100, 100)] * 1000
    b = [("b" * 10, 10)] * 1000
    mixed = interleave([3.0, 1.0], [a, b])
    bytes_a = sum(len(d) for d in mixed if d[0] == "a")
    bytes_b = sum(len(d) for d in mixed if d[0] == "b")
    assert bytes_b == 10_000  # b ran out first: all of it, and a's share is 3:1
    assert bytes_a / (bytes_a + bytes_b) == pytest.approx(0.75, abs=0.01)


def test_mixture_weights_and_seed(write_docs, make_cfg):
    short = write_docs(200, words=40, name="short")
    long = write_docs(60, words=400, name="long", seed=3)
    mix = [{"weight": 1, "source": "files", "paths": [str(short)]},
           {"weight": 2, "source": "files", "paths": [str(long)]}]

    def split_bytes(seed: int):
        corpus = build_corpus(make_cfg({"source": "mixture", "mixture": mix, "seed": seed}).data)
        docs = [(s, d) for s, d in corpus.split_docs()]
        short_texts = {p.read_text() for p in short.iterdir()}
        tr = [d for s, d in docs if s == "train"]
        b_short = sum(len(d) for d in tr if d in short_texts)
        return b_short / sum(len(d) for d in tr), tr, [d for s, d in docs if s == "val"]

    share0, train0, val0 = split_bytes(0)
    share1, train1, val1 = split_bytes(1)
    assert share0 == pytest.approx(1 / 3, abs=0.03) and share1 == pytest.approx(1 / 3, abs=0.03)
    assert train0 != train1 and val0 == val1  # the seed draws the training sample, not validation
    p = prepare_data(make_cfg({"source": "mixture", "mixture": mix}), progress=False)
    assert p.cache_key.startswith("mixture-") and p.val.n_docs > 0
