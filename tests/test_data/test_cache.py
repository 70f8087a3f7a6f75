"""The token cache: reuse, invalidation, one build under concurrency, versions, atomicity, tokenizer folder."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

import train.data.text as prepare_mod
from train.data import CACHE_VERSION, DataError, copy_tokenizer, load_tokenizer, prepare_data


def test_second_prepare_reuses_the_cache(write_docs, make_cfg, builds):
    cfg = make_cfg({"source": "files", "paths": [str(write_docs(20))]})
    a = prepare_data(cfg, progress=False)
    assert len(builds()) == 2  # the tokenizer and the tokens
    mtime = (a.cache_dir / "train.bin").stat().st_mtime_ns
    b = prepare_data(cfg, progress=False)
    c = prepare_data(cfg, full_hash=True, progress=False)
    assert len(builds()) == 2 and a.cache_key == b.cache_key == c.cache_key
    assert (b.cache_dir / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(a.train.tokens, b.train.tokens)


def test_changing_any_input_makes_a_new_key(write_docs, make_cfg, builds):
    folder = write_docs(20)
    base = {"source": "files", "paths": [str(folder)]}
    key = prepare_data(make_cfg(base), progress=False).cache_key
    keys = {key}
    keys.add(prepare_data(make_cfg(base, {"vocab_size": 300}), progress=False).cache_key)
    keys.add(prepare_data(make_cfg({**base, "val_fraction": 0.2}), progress=False).cache_key)
    (folder / "doc0003.txt").write_text("changed content " * 50)
    keys.add(prepare_data(make_cfg(base), progress=False).cache_key)
    assert len(keys) == 4
    # the seq_len and the data order seed are not part of the key: windows are cut at load time
    assert prepare_data(make_cfg({**base, "seq_len": 16, "seed": 5}), progress=False).cache_key in keys


def test_moved_corpus_finds_its_cache(write_docs, make_cfg, builds, tmp_path):
    folder = write_docs(20)
    key = prepare_data(make_cfg({"source": "files", "paths": [str(folder)]}), progress=False).cache_key
    n = len(builds())
    moved = folder.rename(tmp_path / "moved")
    assert prepare_data(make_cfg({"source": "files", "paths": [str(moved)]}), progress=False).cache_key == key
    assert len(builds()) == n  # a content hash, not a retokenization


def test_full_hash_sees_a_same_size_same_mtime_edit(write_docs, make_cfg):
    folder = write_docs(20)
    cfg = make_cfg({"source": "files", "paths": [str(folder)]})
    key = prepare_data(cfg, progress=False).cache_key
    f = folder / "doc0000.txt"
    st = f.stat()
    f.write_text(f.read_text().swapcase())
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepare_data(cfg, progress=False).cache_key == key  # the cheap fingerprint cannot tell
    assert prepare_data(cfg, full_hash=True, progress=False).cache_key != key


def test_concurrent_processes_build_once(write_docs, make_cfg, builds, tmp_path):
    cfg = make_cfg({"source": "files", "paths": [str(write_docs(60, words=400))]})
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=prepare_data, args=(cfg,), kwargs={"progress": False}) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    built = builds()
    assert len(built) == 2 and len(set(built)) == 2, built  # one tokenizer, one token cache
    leftovers = [p.name for p in (tmp_path / "cache" / "tokens").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_cache_from_another_version_is_refused(write_docs, make_cfg):
    cfg = make_cfg({"source": "files", "paths": [str(write_docs(20))]})
    p = prepare_data(cfg, progress=False)
    meta_path = p.cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = CACHE_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError) as e:
        prepare_data(cfg, progress=False)
    assert str(p.cache_dir) in str(e.value) and "version" in str(e.value)
    assert json.loads(meta_path.read_text())["version"] == CACHE_VERSION + 1  # left alone


def test_failed_build_leaves_no_entry_and_never_touches_a_good_one(write_docs, make_cfg, monkeypatch, builds):
    folder = write_docs(20)
    good_cfg = make_cfg({"source": "files", "paths": [str(folder)]})
    good = prepare_data(good_cfg, progress=False)
    before = {f.name: f.read_bytes() for f in good.cache_dir.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare_mod, "tokenize_corpus", broken)
    other = make_cfg({"source": "files", "paths": [str(folder)], "val_fraction": 0.2})
    with pytest.raises(RuntimeError):
        prepare_data(other, progress=False)
    tokens = good.cache_dir.parent
    assert sorted(p.name for p in tokens.iterdir() if not p.name.startswith(".")) == [good.cache_key]
    assert not [p for p in tokens.iterdir() if ".tmp-" in p.name]
    assert {f.name: f.read_bytes() for f in good.cache_dir.iterdir()} == before
    monkeypatch.undo()
    assert prepare_data(other, progress=False).cache_key != good.cache_key  # a later good build works


def test_damaged_entry_is_an_error_not_a_rebuild(write_docs, make_cfg):
    cfg = make_cfg({"source": "files", "paths": [str(write_docs(20))]})
    p = prepare_data(cfg, progress=False)
    with open(p.cache_dir / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="damaged"):
        prepare_data(cfg, progress=False)


def test_tokenizer_folder_loads_with_transformers(write_docs, make_cfg, tmp_path):
    from transformers import AutoTokenizer

    p = prepare_data(make_cfg({"source": "files", "paths": [str(write_docs(20))]}), progress=False)
    copy_tokenizer(p, tmp_path / "run" / "tokenizer")
    assert not (tmp_path / "run" / "tokenizer" / "meta.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    text = "The water of the first people, said twice.\n  Indented:\tdone ü€"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == p.eos_id
    assert tok.pad_token_id == p.pad_id and len(tok) == p.vocab_size
    assert load_tokenizer(p.tokenizer_dir).eos_token_id == p.eos_id
    # the cache holds the same ids the tokenizer gives
    first = np.asarray(p.train.tokens[1:p.train.doc_starts[1]]).tolist()
    doc0 = sorted((tmp_path / "corpus").iterdir())[0].read_text()
    assert first == tok(doc0)["input_ids"]


def test_pretrained_tokenizer_from_a_folder(write_docs, make_cfg, builds):
    folder = write_docs(20)
    p = prepare_data(make_cfg({"source": "files", "paths": [str(folder)]}), progress=False)
    q = prepare_data(make_cfg({"source": "files", "paths": [str(folder)]},
                              {"kind": "pretrained", "path": str(p.tokenizer_dir)}), progress=False)
    assert q.vocab_size == p.vocab_size and q.eos_id == p.eos_id
    assert np.array_equal(q.train.tokens, p.train.tokens)


def test_tokenization_in_threads_matches(write_docs, make_cfg):
    folder = write_docs(30)
    one = prepare_data(make_cfg({"source": "files", "paths": [str(folder)]}), progress=False)
    shutil.rmtree(one.cache_dir)
    two = prepare_data(make_cfg({"source": "files", "paths": [str(folder)], "num_proc": 2}), progress=False)
    assert two.cache_key == one.cache_key
    assert np.array_equal(np.asarray(two.train.tokens), np.asarray(one.train.tokens))
    assert np.array_equal(two.val.doc_starts, one.val.doc_starts)
