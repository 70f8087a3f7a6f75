"""Bad input fails early with a DataError (a ConfigError: the CLI exits 2) that names the culprit."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.registry import ConfigError
from train.data import DataError, prepare_data


def test_data_error_is_a_config_error():
    assert issubclass(DataError, ConfigError)


def test_missing_paths(write_docs, make_cfg, tmp_path):
    with pytest.raises(DataError, match="path not found: '.*nowhere'") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(tmp_path / "nowhere")]}), progress=False)
    assert e.value.key == "data.paths"
    with pytest.raises(DataError, match="no .* match") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(tmp_path / "*.jsonl")]}), progress=False)
    with pytest.raises(DataError) as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(write_docs(5))],
                               "val_paths": [str(tmp_path / "val.jsonl")]}), progress=False)
    assert e.value.key == "data.val_paths"
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="holds no"):
        prepare_data(make_cfg({"source": "files", "paths": [str(tmp_path / "empty_folder")]}), progress=False)


def test_empty_corpus(make_cfg, tmp_path, builds):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("")
    (tmp_path / "c" / "b.txt").write_text("\n\n   \n")
    (tmp_path / "c" / "c.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match="empty") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(tmp_path / "c")]}), progress=False)
    assert e.value.key == "data.paths" and "a.txt (0 bytes)" in str(e.value) and "c.jsonl" in str(e.value)
    assert builds() == [] and not list((tmp_path / "cache" / "tokenizers").glob("bpe*"))


def test_non_utf8_names_file_and_byte_offset(make_cfg, tmp_path):
    (tmp_path / "c").mkdir()
    bad = tmp_path / "c" / "bad.txt"
    bad.write_bytes(b"good text " * 10 + b"\xff\xfe bad" + b" more" * 10)
    with pytest.raises(DataError, match="byte offset 100") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(tmp_path / "c")]}), progress=False)
    assert e.value.key == str(bad) and "encoding_errors=replace" in str(e.value)
    lines = tmp_path / "bad.jsonl"
    raw = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    lines.write_bytes(raw)
    with pytest.raises(DataError, match=f"byte offset {raw.index(0xE9)} ") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(lines)]}), progress=False)
    assert e.value.key == str(lines)


def test_non_utf8_replace_policy(make_cfg, tmp_path):
    from train.data.sources import text_source

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"caf\xe9 au lait " * 100)
    cfg = make_cfg({"source": "files", "paths": [str(tmp_path / "c")], "encoding_errors": "replace",
                    "val_fraction": 0.0})
    assert list(text_source(cfg.data).docs()) == ["caf\ufffd au lait " * 100]
    assert len(prepare_data(cfg, progress=False).train) > 32


def test_bad_json_lines(make_cfg, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="no 'text' field") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(path)]}), progress=False)
    assert e.value.key == f"{path}:2"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="invalid JSON"):
        prepare_data(make_cfg({"source": "files", "paths": [str(path)]}), progress=False)


def test_corpus_smaller_than_one_window(write_docs, make_cfg):
    folder = write_docs(10, words=30)
    with pytest.raises(DataError, match="training split has .* fewer than one window") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(folder)], "seq_len": 2000},
                              model={"max_seq_len": 2048}), progress=False)
    assert e.value.key == "data.seq_len"


def test_validation_split_empty(write_docs, make_cfg):
    folder = write_docs(5, words=100)  # 5 documents x 0.05 rounds to none
    with pytest.raises(DataError, match="validation split has 0 tokens") as e:
        prepare_data(make_cfg({"source": "files", "paths": [str(folder)]}), progress=False)
    assert e.value.key == "data.val_fraction"
    p = prepare_data(make_cfg({"source": "files", "paths": [str(folder)], "val_fraction": 0.0}), progress=False)
    assert len(p.val) == 0  # no validation asked for: fine


def _wordlevel_tokenizer(folder, n_words: int, eos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **({"<|endoftext|>": 1} if eos else {})}
    vocab.update({f"w{i}": len(vocab) + i for i in range(n_words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "<|endoftext|>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs).save_pretrained(str(folder))
    return folder


def test_vocab_larger_than_the_dtype(make_cfg, tmp_path):
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"text": " ".join(f"w{(i * 7919 + j) % 70000}" for j in range(80))}) + "\n"
                             for i in range(40)))
    tok = _wordlevel_tokenizer(tmp_path / "tok", 70_000, eos=True)
    data = {"source": "files", "paths": [str(words)], "val_fraction": 0.1}
    with pytest.raises(DataError, match="does not fit uint16") as e:
        prepare_data(make_cfg({**data, "dtype": "uint16"}, {"kind": "pretrained", "path": str(tok)}), progress=False)
    assert e.value.key == "data.dtype"
    p = prepare_data(make_cfg(data, {"kind": "pretrained", "path": str(tok)}), progress=False)
    assert p.train.tokens.dtype == np.uint32 and p.vocab_size == 70_002 and int(np.max(p.train.tokens)) > 65536


def test_tokenizer_without_eos_or_missing(write_docs, make_cfg, tmp_path):
    tok = _wordlevel_tokenizer(tmp_path / "tok", 100, eos=False)
    data = {"source": "files", "paths": [str(write_docs(20))]}
    with pytest.raises(DataError, match="no EOS token") as e:
        prepare_data(make_cfg(data, {"kind": "pretrained", "path": str(tok)}), progress=False)
    assert e.value.key == "tokenizer.path"
    with pytest.raises(DataError, match="not found"):
        prepare_data(make_cfg(data, {"kind": "pretrained", "path": str(tmp_path / "none")}), progress=False)


def test_hf_missing_column(write_docs, make_cfg):
    path = write_docs(10, kind="jsonl")
    with pytest.raises(DataError, match="no column 'body'"):
        prepare_data(make_cfg({"source": "hf", "hf": {"name": "json"}, "paths": [str(path)], "text_field": "body"}),
                     progress=False)


def test_damaged_cached_tokenizer_is_refused(make_cfg, tmp_path):
    cfg = make_cfg({"source": "files", "paths": [str(tmp_path / "docs")], "val_fraction": 0.0})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world, " * 200)
    prepare_data(cfg, progress=False)
    [tok_json] = list((tmp_path / "cache" / "tokenizers").glob("bpe*/tokenizer.json"))
    tok_json.write_text("{}")
    with pytest.raises(DataError, match="damaged") as e:
        prepare_data(cfg, progress=False)
    assert e.value.key == "tokenizer" and str(tok_json) in str(e.value)
