"""The loader: windows, resume from the state, rank sharding, document ids, validation batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.data import IGNORE_INDEX, DataError, Loader, TokenData, Windows, val_batches

EOS = 0


def synthetic(n_docs: int = 50, seed: int = 0, pad_id: int | None = None) -> TokenData:
    """Documents of random length: EOS then ids 2..99."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[EOS], rng.integers(2, 100, rng.integers(1, 60))]) for _ in range(n_docs)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype(np.int64)
    return TokenData(np.concatenate(docs).astype(np.uint16), starts, 100, pad_id)


def test_windows_inputs_and_labels():
    data = synthetic()
    loader = Loader(Windows(data, 16, seed=0), batch_size=4)
    b = loader.next_batch()
    assert b["input_ids"].shape == b["labels"].shape == b["doc_ids"].shape == (4, 16)
    assert all(t.dtype == torch.int64 for t in b.values())
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    tokens = torch.from_numpy(np.asarray(data.tokens).astype(np.int64))
    for row, g in zip(range(4), b["indices"].tolist()):
        w = loader.samples.windows(np.array([g]))[0]
        assert torch.equal(b["input_ids"][row], tokens[w * 16:w * 16 + 16])
        assert torch.equal(b["labels"][row], tokens[w * 16 + 1:w * 16 + 17])


def test_every_window_once_per_epoch_and_a_new_order_each_epoch():
    data = synthetic()
    loader = Loader(Windows(data, 16, seed=3), batch_size=1)
    n = len(loader.samples)
    first = np.concatenate([loader.samples.windows(np.arange(0, n))])
    second = loader.samples.windows(np.arange(n, 2 * n))
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, Loader(Windows(data, 16, seed=4), batch_size=1).samples.windows(np.arange(n)))


def test_resume_from_state_gives_identical_batches():
    data = synthetic()
    loader = Loader(Windows(data, 16, seed=7), batch_size=3)
    for _ in range(37):  # past the end of an epoch
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(5)]
    resumed = Loader(Windows(data, 16, seed=7), batch_size=3)
    resumed.load_state_dict(state)
    also = Loader(Windows(data, 16, seed=7), batch_size=3, start_index=state["sample_index"])
    for want in expected:
        for got in (resumed.next_batch(), also.next_batch()):
            assert all(torch.equal(want[k], got[k]) for k in want)


def test_ranks_together_give_the_single_rank_batches():
    data = synthetic()
    single = Loader(Windows(data, 16, seed=1), batch_size=4)
    ranks = [Loader(Windows(data, 16, seed=1), batch_size=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for k in whole:
            assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))
    assert ranks[0].state_dict() == single.state_dict() == {"sample_index": 40}


def test_doc_ids_count_document_starts_inside_the_window():
    data = synthetic()
    b = Loader(Windows(data, 32, seed=0), batch_size=8).next_batch()
    x, d = b["input_ids"], b["doc_ids"]
    assert (d[:, 0] == 0).all()
    step = d[:, 1:] - d[:, :-1]
    assert ((step == 0) | (step == 1)).all()
    assert torch.equal(step == 1, x[:, 1:] == EOS)  # a new document exactly at each EOS
    assert torch.equal(d, torch.cumsum((x == EOS).long(), 1) - (x[:, :1] == EOS).long())


def test_pad_labels_are_ignored():
    data = synthetic(pad_id=5)
    loader = Loader(Windows(data, 32, seed=0), batch_size=16)
    b = loader.next_batch()
    tokens = np.asarray(data.tokens).astype(np.int64)
    raw = np.stack([tokens[w * 32 + 1:w * 32 + 33] for w in loader.samples.windows(b["indices"].numpy())])
    assert (raw == 5).any()
    assert torch.equal(b["labels"], torch.from_numpy(np.where(raw == 5, IGNORE_INDEX, raw)))


def test_val_batches_are_the_first_windows_in_order():
    data = synthetic(30)
    batches = val_batches(data, seq_len=16, batch_size=4, n_batches=3)
    assert len(batches) == 3
    assert torch.equal(torch.cat([b["indices"] for b in batches]), torch.arange(12))
    assert torch.equal(batches[0]["input_ids"][1], torch.from_numpy(np.asarray(data.tokens[16:32]).astype(np.int64)))
    assert val_batches(data, 16, 4, 3)[2]["input_ids"].equal(batches[2]["input_ids"])  # deterministic
    small = val_batches(data, seq_len=16, batch_size=4, n_batches=10_000)
    assert sum(len(b["indices"]) for b in small) == (len(data) - 1) // 16
    assert val_batches(TokenData(np.zeros(0, np.uint16), np.zeros(0, np.int64), 100), 16, 4, 2) == []


def test_too_few_tokens_for_a_window():
    data = synthetic(1)
    with pytest.raises(DataError, match="fewer than one window"):
        Loader(Windows(data, len(data), seed=0), batch_size=1)
