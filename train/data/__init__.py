"""The data pipeline: a registered source (train/data/source.py) -> Dataset -> loader.

    data = prepare_data(cfg)                          # token sources: build the cache once, memory-map it
    samples = data.train_samples(cfg.data.seq_len, cfg.data.seed)
    loader = Loader(samples, cfg.train.micro_batch, rank, world_size, start_index=state["sample_index"])
    batch = loader.next_batch()                       # input_ids, labels, doc_ids, indices
    val_sets = prepare_val_sets(cfg, data)            # {"heldout": data, <data.val_sets names>: ...}

See docs/data.md for the sources, the cache layout and the error cases.
"""
from train.data.bench import benchmark
from train.data.cache import CACHE_VERSION, cache_root
from train.data.errors import DataError
from train.data.loader import IGNORE_INDEX, Loader, OrderedWindows, Windows, fixed_batches, val_batches
from train.data.prefetch import Prefetcher
from train.data.prepare import HELDOUT, copy_tokenizer, prepare_data, prepare_val_sets
from train.data.prepared import PreparedData, TokenData
from train.data.source import SOURCES, DataSource, PrepareContext, registered_sources
from train.data.tokenizer import EOS, PAD, load_tokenizer

__all__ = ["CACHE_VERSION", "DataError", "DataSource", "EOS", "HELDOUT", "IGNORE_INDEX", "Loader", "OrderedWindows",
           "PAD", "Prefetcher", "PrepareContext", "PreparedData", "SOURCES", "TokenData", "Windows", "benchmark", "cache_root",
           "copy_tokenizer", "fixed_batches", "load_tokenizer", "prepare_data", "prepare_val_sets",
           "registered_sources", "val_batches"]
