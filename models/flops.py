"""Parameter counts and FLOPs per token (the FLOP count behind MFU; 6N per token as in Kaplan et al., arXiv 2001.08361).

FLOPs/token = 6 x (parameters in matmuls: non-embedding, LM head included even when tied)
            + each mixer's own term (attention: 6 x seq_len x d_model per causal layer)
            + each memory layer's own term (sub-key scores and the value read; values are
              parameters, not FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import MEMORIES, MIXERS
from models.tags import EMBEDDING, MEMORY_VALUE, param_specs


@dataclass
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    matmul: int            # parameters whose spec says matmul (the head counted even when tied)
    memory_values: int
    by_tag: dict[str, int]


def count_params(model: nn.Module) -> ParamCounts:
    specs = param_specs(model)
    params = dict(model.named_parameters())
    by_tag: dict[str, int] = {}
    matmul = 0
    for name, spec in specs.items():
        n = params[name].numel()
        by_tag[spec.name] = by_tag.get(spec.name, 0) + n
        matmul += n if spec.matmul else 0
    total = sum(by_tag.values())
    embedding = by_tag.get(EMBEDDING.name, 0)
    cfg = model.cfg
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.d_model     # the tied head still does a V x d matmul
    memory_values = by_tag.get(MEMORY_VALUE.name, 0)
    return ParamCounts(total, embedding, total - embedding, matmul, memory_values, by_tag)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    cfg = model.cfg
    flops = 6.0 * count_params(model).matmul
    for letter in cfg.layers.letters(cfg.n_layers):
        mixer_cfg = cfg.layers.mixers[letter]
        flops += MIXERS.get(mixer_cfg.kind).flops_per_token(cfg, mixer_cfg, seq_len)
    if cfg.memory.layers:           # a memory layer's own term (scores, bag read): its values add no FLOPs
        term = getattr(MEMORIES.get(cfg.memory.kind), "flops_per_token", None)
        if term is not None:
            flops += len(cfg.memory.layers) * term(cfg, seq_len)
    return flops
