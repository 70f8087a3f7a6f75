"""`ablate data bench`: tokenization MB/s and loader tokens/s, as figures (the CLI prints them)."""
from __future__ import annotations

import os
import platform
import time
from typing import Any

import tokenizers

from train.data.corpus import build_corpus
from train.data.loader import Loader
from train.data.prepare import prepare_data
from train.data.tokenize import chunks, encode_chunks

BENCH_BYTES = 8_000_000     # at most this much training text is tokenized for the figure


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "tokenizers": tokenizers.__version__, "platform": platform.platform()}


def benchmark(cfg: Any, seconds: float = 2.0) -> dict[str, Any]:
    """Tokenize up to BENCH_BYTES of the training text and run the loader for about `seconds`.

    The cache is prepared first (and built if missing; that time is not measured).
    """
    prepared = prepare_data(cfg, progress=False)
    out: dict[str, Any] = {"source": cfg.data.source, "vocab_size": prepared.vocab_size,
                           "num_proc": cfg.data.num_proc, **_machine()}
    from train.data.source import source
    if prepared.tokenizer_dir is not None and source(cfg.data.source).text:
        texts, used = [], 0
        for text in build_corpus(cfg.data).train_texts():
            texts.append(text)
            used += len(text.encode("utf-8"))
            if used >= BENCH_BYTES:
                break
        tok = tokenizers.Tokenizer.from_file(str(prepared.tokenizer_dir / "tokenizer.json"))
        start = time.perf_counter()
        n_tokens = 0
        for _, _, encoded in encode_chunks(chunks(("train", t) for t in texts), tok, prepared.eos_id,
                                           cfg.data.num_proc):
            n_tokens += sum(len(e) for e in encoded)
        elapsed = time.perf_counter() - start
        out.update(tokenize_mb=used / 1e6, tokenize_s=elapsed, tokenize_mb_per_s=used / 1e6 / elapsed,
                   tokenize_tokens_per_s=n_tokens / elapsed, bytes_per_token=used / max(1, n_tokens))
    seq_len, batch = cfg.data.seq_len, cfg.train.micro_batch
    loader = Loader(prepared.train_samples(seq_len, cfg.data.seed), batch)
    for _ in range(3):
        loader.next_batch()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loader.next_batch()
        n += 1
    elapsed = time.perf_counter() - start
    out.update(loader_seq_len=seq_len, loader_batch=batch, loader_batches=n,
               loader_tokens_per_s=n * batch * seq_len / elapsed)
    return out
