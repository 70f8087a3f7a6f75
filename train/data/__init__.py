"""The data pipeline: sources -> tokenizer -> token cache -> loader.

    prepared = prepare_data(cfg)                      # builds the cache once, then memory-maps it
    loader = Loader(prepared.train, cfg.data.seq_len, cfg.train.micro_batch, cfg.data.seed,
                    rank, world_size, start_index=state["sample_index"])
    batch = loader.next_batch()                       # input_ids, labels, doc_ids, indices

See docs/data.md for the sources, the cache layout and the error cases.
"""
from train.data.bench import benchmark
from train.data.cache import CACHE_VERSION, cache_root
from train.data.errors import DataError
from train.data.loader import IGNORE_INDEX, Loader, val_batches
from train.data.prepare import copy_tokenizer, prepare_data
from train.data.prepared import PreparedData, TokenData
from train.data.tokenizer import EOS, PAD, load_tokenizer

__all__ = ["CACHE_VERSION", "DataError", "EOS", "IGNORE_INDEX", "Loader", "PAD", "PreparedData", "TokenData",
           "benchmark", "cache_root", "copy_tokenizer", "load_tokenizer", "prepare_data", "val_batches"]
