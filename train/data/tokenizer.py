"""Tokenizers: train a byte-level BPE or load a pretrained one, kept in the cache as a folder
that `transformers.AutoTokenizer` (and so lm-eval) loads.

Every document is preceded by EOS = `<|endoftext|>` (it doubles as BOS); PAD = `<|pad|>`. A
trained BPE sees at most `tokenizer.train_bytes` of the training split (never validation text),
and its cache key covers that text's fingerprint, the vocabulary size, the training settings and
the `tokenizers` version. A pretrained tokenizer (`tokenizer.kind: pretrained`, `tokenizer.path`
a local folder or, online, a hub name) is copied into the cache the same way; it must have an
EOS token, which becomes the document separator.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import tokenizers

from train.data.cache import build_once
from train.data.errors import DataError
from train.data.fingerprint import hash_obj, sha256_file

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_VERSION = 1
MODEL_MAX_LENGTH = 1_000_000_000
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass
class TokenizerInfo:
    """A tokenizer folder in the cache and the facts the token cache and the model need."""

    dir: Path
    key: str
    sha256: str        # of tokenizer.json: the token cache's key uses it
    vocab_size: int    # len(tokenizer): added tokens included
    eos_id: int
    pad_id: int | None

    def backend(self) -> tokenizers.Tokenizer:
        """The fast `tokenizers` object, for batched encoding without importing transformers."""
        return tokenizers.Tokenizer.from_file(str(self.dir / "tokenizer.json"))


def _capped(texts: Iterator[str], max_bytes: int, seen: list[int]) -> Iterator[str]:
    used = 0
    for text in texts:
        seen[0] += 1
        n = len(text.encode("utf-8"))
        if used + n >= max_bytes:
            yield text[: max(1, max_bytes - used)]
            return
        used += n
        yield text


def train_bpe(texts: Iterator[str], vocab_size: int, max_bytes: int, progress: bool) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization) with EOS and PAD as its first two ids."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    seen = [0]
    tok.train_from_iterator(_capped(texts, max_bytes, seen), trainer)
    if seen[0] == 0:
        raise DataError("data", "the corpus is empty: no training documents to train the tokenizer on")
    return tok


def _save(hf_tok: Any, dest: Path) -> dict[str, Any]:
    """save_pretrained, with the class name that transformers 4 and 5 both load."""
    hf_tok.save_pretrained(str(dest))
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"vocab_size": len(hf_tok), "eos_id": hf_tok.eos_token_id, "pad_id": hf_tok.pad_token_id,
            "eos_token": hf_tok.eos_token, "pad_token": hf_tok.pad_token,
            "sha256": sha256_file(dest / "tokenizer.json")}


def _info(entry: Path, meta: dict[str, Any]) -> TokenizerInfo:
    """The cache entry's tokenizer, checked against the hash recorded when it was built (a
    damaged tokenizer.json would otherwise be copied into run dirs unnoticed)."""
    path = entry / "tokenizer.json"
    if not path.is_file() or sha256_file(path) != meta["sha256"]:
        raise DataError("tokenizer", f"the cached tokenizer {path} is missing or damaged (it does not match the "
                                     f"hash recorded when it was built): delete {entry} to rebuild it")
    return TokenizerInfo(entry, entry.name, meta["sha256"], meta["vocab_size"], meta["eos_id"], meta["pad_id"])


def bpe_tokenizer(root: Path, tcfg: Any, text_id: dict[str, Any], texts: Any, progress: bool) -> TokenizerInfo:
    """The cached BPE trained on `texts()` (an iterator factory) identified by `text_id`."""
    desc = {"kind": "bpe", "version": TOKENIZER_VERSION, "vocab_size": tcfg.vocab_size,
            "train_bytes": tcfg.train_bytes, "specials": [EOS, PAD],
            "tokenizers": tokenizers.__version__, "text": text_id}
    entry = root / "tokenizers" / f"bpe{tcfg.vocab_size}-{hash_obj(desc)}"

    def build(tmp: Path) -> dict[str, Any]:
        tok = train_bpe(texts(), tcfg.vocab_size, tcfg.train_bytes, progress)
        from transformers import PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                         pad_token=PAD, model_max_length=MODEL_MAX_LENGTH)
        return {**_save(hf_tok, tmp), "describe": desc}

    meta, _ = build_once(root, entry, build, progress)
    return _info(entry, meta)


def load_tokenizer(path: str | Path) -> Any:
    """A folder (or, online, a hub name) as a transformers fast tokenizer.

    Returns a `PreTrainedTokenizerFast` (in transformers 5, its `TokenizersBackend` base).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError("tokenizer.path", f"cannot load a tokenizer from '{path}': {e}") from None
    if not getattr(tok, "is_fast", False):
        raise DataError("tokenizer.path", f"'{path}' has no fast tokenizer (tokenizer.json); "
                        "ablate needs one")
    return tok


def pretrained_tokenizer(root: Path, path: str, progress: bool) -> TokenizerInfo:
    """The tokenizer at `path` (local folder or hub name), copied into the cache."""
    local = Path(os.path.expanduser(path))
    if local.exists():
        if not local.is_dir():
            raise DataError("tokenizer.path", f"'{path}' is a file; expected a tokenizer folder")
        desc: dict[str, Any] = {"kind": "pretrained", "files": {
            f.name: sha256_file(f) for f in sorted(local.iterdir()) if f.is_file()}}
    elif _HUB_NAME.match(path) and not path.startswith((".", "~")):
        desc = {"kind": "pretrained", "hub": path}
    else:
        raise DataError("tokenizer.path", f"tokenizer folder not found: '{path}'")
    entry = root / "tokenizers" / f"pretrained-{hash_obj(desc)}"

    def build(tmp: Path) -> dict[str, Any]:
        tok = load_tokenizer(str(local) if local.exists() else path)
        if tok.eos_token_id is None:
            raise DataError("tokenizer.path", f"tokenizer '{path}' has no EOS token; ablate needs one "
                            "as the document separator")
        info = _save(tok, tmp)
        return {**info, "describe": desc, "source": path}

    meta, _ = build_once(root, entry, build, progress)
    return _info(entry, meta)


def copy_tokenizer_dir(src: Path, dest: Path) -> None:
    """Copy a tokenizer folder (without the cache's meta.json) into a run dir."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "meta.json":
            shutil.copy2(f, dest / f.name)
