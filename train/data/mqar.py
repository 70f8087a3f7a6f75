"""The `mqar` source: multi-query associative recall, a synthetic recall benchmark.

Follows the construction of Zoology's MQAR (Arora et al., "Zoology: Measuring and Improving
Recall in Efficient Language Models", arXiv 2312.04927; zoology/data/multiquery_ar.py in its
repository): an example is `n_pairs` key-value pairs (k1 v1 k2 v2 ...), keys drawn without
replacement from ids 1 .. key_vocab-1 and values from key_vocab .. vocab_size-1, then the rest
of the sequence, where each query key sits at an even offset whose gap from the context is drawn
from the power law p(g) ~ a g^(a-1) (`power_a`, small a: mostly short gaps), every other position
a uniformly random token (`random_non_queries`, Zoology's default; false: 0, an id no key or
value takes, as in the paper's figure 2). Loss and accuracy are taken only at the query
positions, whose target is the queried key's value (the label mask: -100 everywhere else).

Differences from Zoology (also in docs/data.md): sample i is a pure function of (data.seed, i)
(Zoology draws a whole fixed set from one global seed), so training is an endless stream and
resume stays exact; `n_queries` may be fewer than the pairs (Zoology queries every key); an
example shorter than data.seq_len (`mqar.seq_len`) is padded at the end with unlabelled zeros;
and `shuffle_keys` is a control with no Zoology counterpart (each query asks the key of another
pair, so only the in-context value distribution can be learnt).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.loss import IGNORE_INDEX
from train.data.errors import DataError
from train.data.source import SOURCES, DataSource, PrepareContext

TRAIN_STREAM, VAL_STREAM = 0, 1      # the second word of the generator seed: disjoint streams


@dataclass
class MQARConfig:
    """`data.mqar`: the generator's shape (an example is sampled, never stored)."""

    vocab_size: int = 8192          # token ids 0 .. vocab_size-1 (model.vocab_size resolves from it)
    key_vocab: int | None = None    # keys are ids 1 .. key_vocab-1, values key_vocab .. vocab_size-1; null: vocab_size // 2 (Zoology's split)
    n_pairs: int = 16               # key-value pairs at the start of each example
    n_queries: int | None = None    # queried keys (distinct, <= n_pairs); null: every key (Zoology)
    seq_len: int | None = None      # tokens per example (<= data.seq_len; the rest is unlabelled padding); null: data.seq_len
    power_a: float = 0.01           # query gaps g ~ a g^(a-1) (Zoology's power_a): small a favours short gaps
    random_non_queries: bool = True # the query region's other tokens uniformly random (Zoology's default); false: 0
    shuffle_keys: bool = False      # control: each query asks another pair's key, so only the value distribution is learnable
    val_examples: int = 256         # validation examples (a fixed set, drawn from its own stream)

    def split(self) -> int:
        """The first value id."""
        return self.key_vocab if self.key_vocab is not None else self.vocab_size // 2

    def queries(self) -> int:
        return self.n_queries if self.n_queries is not None else self.n_pairs


def mqar_example(m: MQARConfig, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One example: (input_ids, labels), each (seq_len,) int64; labels are -100 but at queries."""
    n, nq, split = m.n_pairs, m.queries(), m.split()
    length = m.seq_len if m.seq_len is not None else seq_len
    keys = rng.choice(np.arange(1, split), size=n, replace=False)
    values = rng.choice(np.arange(split, m.vocab_size), size=n, replace=False)
    filler = rng.integers(0, m.vocab_size, size=seq_len)         # drawn either way: the same pairs and queries
    ids = filler if m.random_non_queries else np.zeros(seq_len, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    ids[0:2 * n:2], ids[1:2 * n:2] = keys, values
    space = (length - 2 * n) // 2                                 # even slots after the context
    g = np.arange(1, space + 1, dtype=np.float64)
    p = m.power_a * g ** (m.power_a - 1)
    gaps = rng.choice(space, size=nq, replace=False, p=p / p.sum())
    asked = rng.choice(n, size=nq, replace=False)                 # which pairs are queried
    shown = (asked + rng.integers(1, n, size=nq)) % n if m.shuffle_keys else asked
    pos = 2 * n + 2 * gaps
    ids[pos] = keys[shown]
    labels[pos] = values[asked]
    if length < seq_len:
        ids[length:] = 0
    return ids.astype(np.int64), labels


class MQARSamples:
    """Examples by index: example i is drawn from np.random.default_rng([seed, stream, i]) (`words`)."""

    def __init__(self, m: MQARConfig, seq_len: int, seed: int, stream: int, n: int | None = None):
        self.m, self.seq_len, self.seed, self.stream, self.n = m, seq_len, seed, stream, n

    def __len__(self) -> int:
        return self.n if self.n is not None else 1 << 62

    def words(self, i: int) -> list[int]:
        """The generator seed of example i; SeedSequence takes no negative word, so a negative
        seed is its absolute value with a fourth word."""
        return [self.seed, self.stream, i] if self.seed >= 0 else [-self.seed, self.stream, i, 1]

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [mqar_example(self.m, self.seq_len, np.random.default_rng(self.words(i))) for i in indices.tolist()]
        ids = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels = torch.from_numpy(np.stack([r[1] for r in rows]))
        return {"input_ids": ids, "labels": labels, "doc_ids": torch.zeros_like(ids),
                "indices": torch.from_numpy(np.asarray(indices, dtype=np.int64))}


class MQARData:
    """The prepared source (the Dataset protocol of train/data/source.py)."""

    tokenizer_dir, eos_id, pad_id, tokenizer = None, None, None, None
    val_metric_names = ("acc",)

    def __init__(self, m: MQARConfig, seed: int):
        self.m, self.seed, self.vocab_size = m, seed, m.vocab_size
        self.cache_key = (f"mqar-v{m.vocab_size}-k{m.split()}-p{m.n_pairs}-q{m.queries()}-T{m.seq_len}"
                          f"-a{m.power_a}-r{int(m.random_non_queries)}-s{int(m.shuffle_keys)}-seed{seed}")

    def train_samples(self, seq_len: int, seed: int) -> MQARSamples:
        return MQARSamples(self.m, seq_len, seed, TRAIN_STREAM)

    def val_samples(self, seq_len: int) -> MQARSamples:
        return MQARSamples(self.m, seq_len, self.seed, VAL_STREAM, n=self.m.val_examples)

    def val_metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        """Answer-token accuracy: argmax equals the value at the query positions."""
        mask = batch["labels"] != IGNORE_INDEX
        hits = (logits.argmax(-1).cpu() == batch["labels"]) & mask
        return {"acc": (float(hits.sum()), int(mask.sum()))}

    def summary(self) -> dict[str, Any]:
        return {"cache": self.cache_key, "n_pairs": self.m.n_pairs, "n_queries": self.m.queries(),
                "vocab_size": self.m.vocab_size}


@SOURCES.register("mqar", config=MQARConfig)
class MQAR(DataSource):
    """Multi-query associative recall; its own vocabulary, no tokenizer."""

    def check(self, dcfg: Any, path: str) -> None:
        m: MQARConfig = dcfg.mqar
        key = f"{path}.mqar"
        if m.n_pairs < 1:
            raise DataError(f"{key}.n_pairs", f"must be >= 1, got {m.n_pairs}")
        if m.n_queries is not None and not 1 <= m.n_queries <= m.n_pairs:
            raise DataError(f"{key}.n_queries", f"must be in 1 .. n_pairs={m.n_pairs} (each query asks a "
                            f"distinct key), got {m.n_queries}")
        split = m.split()
        if m.key_vocab is None and m.vocab_size < 4:
            raise DataError(f"{key}.vocab_size", f"must be >= 4 (key ids from 1, then values, split at half the "
                            f"vocabulary), got {m.vocab_size}")
        if not 2 <= split < m.vocab_size:
            raise DataError(f"{key}.key_vocab", f"must be in 2 .. vocab_size-1={m.vocab_size - 1}, got {split}")
        if split - 1 < m.n_pairs:
            raise DataError(f"{key}.n_pairs", f"{m.n_pairs} distinct keys do not fit in the {split - 1} key ids "
                            f"(1 .. {split - 1}): raise {key}.key_vocab or {key}.vocab_size")
        if m.vocab_size - split < m.n_pairs:
            raise DataError(f"{key}.n_pairs", f"{m.n_pairs} distinct values do not fit in the "
                            f"{m.vocab_size - split} value ids ({split} .. {m.vocab_size - 1})")
        if m.shuffle_keys and m.n_pairs < 2:
            raise DataError(f"{key}.shuffle_keys", "needs n_pairs >= 2 (a query asks another pair's key)")
        if m.power_a <= 0:
            raise DataError(f"{key}.power_a", f"must be > 0, got {m.power_a}")
        if m.val_examples < 1:
            raise DataError(f"{key}.val_examples", f"must be >= 1, got {m.val_examples}")
        length = m.seq_len if m.seq_len is not None else dcfg.seq_len
        if m.seq_len is not None and not 2 <= m.seq_len <= dcfg.seq_len:
            raise DataError(f"{key}.seq_len", f"must be in 2 .. data.seq_len={dcfg.seq_len}, got {m.seq_len}")
        need = 2 * m.n_pairs + 2 * m.queries()
        if need > length:
            raise DataError(f"{key}.n_pairs", f"{m.n_pairs} pairs and {m.queries()} queries need {need} tokens "
                            f"(2 per pair, 2 per query slot), more than the sequence length {length}")

    def vocab_size(self, dcfg: Any) -> int:
        return dcfg.mqar.vocab_size

    def prepare(self, ctx: PrepareContext, dcfg: Any, key: str) -> MQARData:
        return MQARData(dcfg.mqar, dcfg.seed)
