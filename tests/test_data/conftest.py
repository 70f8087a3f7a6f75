"""Fixtures for the data tests: a private cache, small synthetic corpora, small configs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the of and to in is that it for was on are as with his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see "
         "him two has look more day could go come did number sound no most people my over know water than "
         "call first who may down side been now find").split()


def make_text(rng: random.Random, n_words: int) -> str:
    """Sentences of common words, with paragraph breaks: compressible like text, cheap to make."""
    out, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            out.append(" ".join(line).capitalize() + ".")
            line = []
            if rng.random() < 0.2:
                out.append("\n\n")
    out.append(" ".join(line) + ".")
    return " ".join(out).replace(" \n\n ", "\n\n")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache and datasets cache, offline."""
    monkeypatch.setenv("ABLATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def write_docs(tmp_path):
    """write_docs(n, kind='txt'|'jsonl', words=200, seed=0, name=...) -> path of the corpus."""

    def write(n: int = 40, kind: str = "txt", words: int = 200, seed: int = 0, name: str = "corpus") -> Path:
        rng = random.Random(seed)
        docs = [make_text(rng, words) for _ in range(n)]
        if kind == "txt":
            folder = tmp_path / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, d in enumerate(docs):
                (folder / f"doc{i:04d}.txt").write_text(d)
            return folder
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
        return path

    return write


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(data={...}, tokenizer={...}, **top) -> a validated Config with a small vocabulary."""
    from train.config import config_from_dict

    def make(data: dict | None = None, tokenizer: dict | None = None, **top) -> object:
        d = {"seq_len": 32, "cache_dir": str(tmp_path / "cache"), **(data or {})}
        t = {"vocab_size": 320, **(tokenizer or {})}
        return config_from_dict({"model": {"max_seq_len": 256}, "data": d, "tokenizer": t, **top})

    return make


@pytest.fixture
def builds(tmp_path):
    """builds() -> list of entries built so far in the test's cache (from builds.log)."""

    def read() -> list[str]:
        log = tmp_path / "cache" / "builds.log"
        if not log.exists():
            return []
        return [json.loads(line)["entry"] for line in log.read_text().splitlines()]

    return read
