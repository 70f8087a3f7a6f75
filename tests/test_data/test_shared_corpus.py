"""Real text from ../shared (skipped when that folder is absent), and the benchmark's figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.data import Loader, Windows, benchmark, prepare_data, val_batches

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SHAKESPEARE = SHARED / "data" / "corpus" / "tinyshakespeare" / "input.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (../shared not mounted)")
def test_tinyshakespeare_end_to_end(make_cfg):
    cfg = make_cfg({"source": "files", "paths": [str(SHAKESPEARE)], "seq_len": 128}, {"vocab_size": 512})
    p = prepare_data(cfg, progress=False)
    assert 200 <= p.train.n_docs + p.val.n_docs <= 400  # ~4 KB documents cut at blank lines
    assert p.val.n_docs == round(0.05 * (p.train.n_docs + p.val.n_docs))
    assert 400_000 < len(p.train) < 700_000  # about 2 bytes per token at this vocabulary size
    batch = Loader(Windows(p.train, 128, seed=0), batch_size=8).next_batch()
    assert batch["input_ids"].shape == (8, 128)
    assert len(val_batches(p.val, 128, 8, 4)) == 4
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(p.tokenizer_dir)
    start = SHAKESPEARE.read_text()[:200]
    assert tok.decode(np.asarray(p.train.tokens[1:80]).tolist()) == tok.decode(tok(start)["input_ids"][:79])


def test_benchmark_figures(make_cfg, write_docs):
    cfg = make_cfg({"source": "files", "paths": [str(write_docs(20))]})
    figures = benchmark(cfg, seconds=0.2)
    assert figures["tokenize_mb_per_s"] > 0 and figures["loader_tokens_per_s"] > 0
    assert figures["cpus"] >= 1 and figures["bytes_per_token"] > 1
