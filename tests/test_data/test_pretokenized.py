"""Pretokenized token files: .bin and .npy, dtype and vocabulary checks, document boundaries."""
from __future__ import annotations

import numpy as np
import pytest

from train.data import DataError, Loader, Windows, prepare_data
from train.data.corpus import is_val
from train.data.pretokenized import held_out, import_tokens


def tokens(n: int, vocab: int = 1000, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, n).astype(dtype)


def cfg_for(make_cfg, paths, **data):
    vocab = data.pop("vocab_size", 1000)
    return make_cfg({"source": "pretokenized", "paths": [str(p) for p in paths], "pretokenized": {"vocab_size": vocab},
                     **data})


def test_bin_file_one_document_tail_split(make_cfg, tmp_path):
    arr = tokens(5000)
    arr.tofile(tmp_path / "train.bin")
    p = prepare_data(cfg_for(make_cfg, [tmp_path / "train.bin"], dtype="uint16", val_fraction=0.1), progress=False)
    assert len(p.train) == 4500 and len(p.val) == 500
    assert np.array_equal(np.concatenate([p.train.tokens, p.val.tokens]), arr)
    assert p.tokenizer_dir is None and p.eos_id is None and p.vocab_size == 1000
    batch = Loader(Windows(p.train, 32, seed=0), batch_size=4).next_batch()
    assert batch["input_ids"].max() < 1000


def test_npy_files_are_documents(make_cfg, tmp_path):
    for i in range(10):
        np.save(tmp_path / f"part{i}.npy", tokens(300, seed=i, dtype=np.uint32))
    p = prepare_data(cfg_for(make_cfg, [tmp_path], val_fraction=0.1), progress=False)
    assert p.train.n_docs == 9 and p.val.n_docs == 1 and len(p.val) == 300
    assert p.train.tokens.dtype == np.uint16  # the cache uses the smallest dtype that holds the vocabulary
    assert np.array_equal(p.val.tokens, np.load(tmp_path / "part4.npy"))  # documents 4, 14, ... (corpus.py)


def test_eos_of_a_given_tokenizer_separates_documents(make_cfg, tmp_path, write_docs):
    text = prepare_data(make_cfg({"source": "files", "paths": [str(write_docs(20))], "val_fraction": 0.0}),
                        progress=False)
    np.asarray(text.train.tokens).tofile(tmp_path / "ids.bin")
    p = prepare_data(make_cfg({"source": "pretokenized", "paths": [str(tmp_path / "ids.bin")], "dtype": "uint16",
                               "pretokenized": {"vocab_size": text.vocab_size}, "val_fraction": 0.1},
                              {"kind": "pretrained", "path": str(text.tokenizer_dir)}), progress=False)
    assert p.train.n_docs == 18 and p.val.n_docs == 2 and p.eos_id == text.eos_id
    assert p.tokenizer_dir is not None


def test_bin_needs_a_declared_dtype(make_cfg, tmp_path):
    tokens(1000).tofile(tmp_path / "a.bin")
    with pytest.raises(DataError, match="no dtype header") as e:
        prepare_data(cfg_for(make_cfg, [tmp_path / "a.bin"]), progress=False)
    assert e.value.key == "data.dtype"


def test_mismatched_dtype(make_cfg, tmp_path):
    np.save(tmp_path / "a.npy", tokens(1000, dtype=np.uint32))
    with pytest.raises(DataError, match="holds uint32 tokens but data.dtype=uint16") as e:
        prepare_data(cfg_for(make_cfg, [tmp_path / "a.npy"], dtype="uint16"), progress=False)
    assert e.value.key == str(tmp_path / "a.npy")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(DataError, match="not a multiple"):
        prepare_data(cfg_for(make_cfg, [tmp_path / "odd.bin"], dtype="uint16"), progress=False)


def test_tokens_outside_the_vocabulary(make_cfg, tmp_path):
    arr = tokens(1000)
    arr[777] = 1000
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(DataError, match="token id 1000 at index 777"):
        prepare_data(cfg_for(make_cfg, [tmp_path / "a.npy"]), progress=False)


def test_vocab_larger_than_the_declared_dtype(make_cfg, tmp_path):
    tokens(1000).tofile(tmp_path / "a.bin")
    with pytest.raises(DataError, match="does not fit uint16") as e:
        prepare_data(cfg_for(make_cfg, [tmp_path / "a.bin"], dtype="uint16", vocab_size=70_000), progress=False)
    assert e.value.key == "data.dtype"


def test_empty_token_file(make_cfg, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        prepare_data(cfg_for(make_cfg, [tmp_path / "a.bin"], dtype="uint16"), progress=False)


def test_split_rule_matches_text_corpora_and_empty_files_are_skipped(make_cfg, tmp_path):
    assert held_out(np.arange(1000), 0.07).tolist() == [is_val(i, 0.07) for i in range(1000)]
    eos = 0
    docs = [np.concatenate([[eos], tokens(20 + i, seed=i)]).astype(np.uint16) for i in range(30)]
    np.concatenate(docs[:12]).tofile(tmp_path / "a.bin")
    (tmp_path / "b.bin").write_bytes(b"")
    np.concatenate(docs[12:]).tofile(tmp_path / "c.bin")
    cfg = cfg_for(make_cfg, [tmp_path], dtype="uint16", val_fraction=0.1)
    out = tmp_path / "out"
    out.mkdir()
    import_tokens(cfg.data, eos, out)
    val_starts = np.load(out / "val.docs.npy")
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    held = [d for i, d in enumerate(docs) if is_val(i, 0.1)]
    assert np.array_equal(val, np.concatenate(held))
    assert val_starts.tolist() == np.cumsum([0] + [len(d) for d in held[:-1]]).tolist()
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert np.array_equal(train, np.concatenate([d for i, d in enumerate(docs) if not is_val(i, 0.1)]))
