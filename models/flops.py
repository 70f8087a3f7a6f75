"""Parameter counts and FLOPs per token (CONTRACT.md, "MFU").

FLOPs/token = 6 x (parameters in matmuls: non-embedding, LM head included even when tied)
            + each mixer's own term (attention: 6 x seq_len x d_model per causal layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import MIXERS
from models.tags import EMBEDDING, HIDDEN_MATRIX, OUTPUT_HEAD, param_tags

MATMUL_TAGS = {HIDDEN_MATRIX, OUTPUT_HEAD}


@dataclass
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    matmul: int            # parameters used in matmuls (the head counted even when tied)
    memory_values: int
    by_tag: dict[str, int]


def count_params(model: nn.Module) -> ParamCounts:
    tags = param_tags(model)
    params = dict(model.named_parameters())
    by_tag: dict[str, int] = {}
    for name, tag in tags.items():
        by_tag[tag] = by_tag.get(tag, 0) + params[name].numel()
    total = sum(by_tag.values())
    embedding = by_tag.get(EMBEDDING, 0)
    matmul = sum(n for t, n in by_tag.items() if t in MATMUL_TAGS)
    cfg = model.cfg
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model     # the tied head still does a V x d matmul
    memory_values = by_tag.get("memory_value", 0)
    return ParamCounts(total, embedding, total - embedding, matmul, memory_values, by_tag)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    cfg = model.cfg
    flops = 6.0 * count_params(model).matmul
    for letter in cfg.layers.letters(cfg.n_layers):
        mixer_cfg = cfg.layers.mixers[letter]
        flops += MIXERS.get(mixer_cfg.kind).flops_per_token(cfg, mixer_cfg, seq_len)
    return flops
