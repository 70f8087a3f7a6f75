"""The decoder: token embedding -> blocks -> final norm -> LM head.

Single-device model code; parallelism is applied from outside (train/parallel).
Decoding API: `forward(input_ids, cache=None, doc_ids=None, sample_index=None) -> (logits, cache)`. Pass
`cache=model.new_cache()` to decode incrementally; the same object comes back updated.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from models.block import Block
from models.config import ModelConfig
from models.mixers.attention import MixerContext
from models.norms import build_norm
from models.parameterization import build_parameterization
from models.registry import ConfigError
from models.rope import RotaryEmbedding
from models.tags import EMBEDDING, OUTPUT_HEAD, param_tags, tag_linear


class DecodeCache:
    """Per-layer mixer caches plus the number of tokens already consumed."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.pos = 0


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size", "must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.param = build_parameterization(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed.param_tags = {"weight": EMBEDDING}
        self.blocks = nn.ModuleList(
            Block(cfg, i, self.param.residual_multiplier) for i in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm.final, cfg.d_model, cfg.norm.eps)
        self.head = None
        if not cfg.tie_embeddings:
            self.head = tag_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), weight=OUTPUT_HEAD)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Blocks whose activations are recomputed in backward (set by the parallel backend).
        self.checkpoint_blocks: set[int] = set()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Init every parameter from its tag through the parameterization's rules.

        Matrices: normal(0, std(tag)). Vectors and scalars: the owning module's own
        `reset_parameters` for our modules (norm gains -> 1, ...), zeros for stock biases.
        """
        tags = param_tags(self)
        for name, module in self.named_modules():
            own = type(module).__module__.startswith("models.") and module is not self
            if own and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full not in tags:          # a tied weight, initialised under its first name
                    continue
                if p.dim() >= 2:
                    std = self.param.init_std(tags[full], getattr(module, "is_residual_out", False))
                    nn.init.normal_(p, mean=0.0, std=std)
                elif not own:
                    nn.init.zeros_(p)

    def new_cache(self) -> DecodeCache:
        return DecodeCache([block.mixer.new_cache() for block in self.blocks])

    def forward(self, input_ids: torch.Tensor, cache: DecodeCache | None = None,
                doc_ids: torch.Tensor | None = None,
                sample_index: torch.Tensor | None = None) -> tuple[torch.Tensor, DecodeCache | None]:
        """sample_index: (B,) global sample index of each row (the loader's `indices`); it keys the
        stochastic-activation masks so they do not depend on ranks or micro-batching. None: every
        row counts as sample 0 (evaluation, generation), so batching never changes a result."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        h = self.embed(input_ids)
        rope_dtype = torch.promote_types(h.dtype, torch.float32)   # converted once, not per layer
        cos, sin = (t.to(rope_dtype) for t in self.rope(start, T, input_ids.device))
        ctx = MixerContext(start=start, cos=cos, sin=sin, doc_ids=doc_ids, sample_index=sample_index)
        for i, block in enumerate(self.blocks):
            if i in self.checkpoint_blocks and cache is None and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, ctx, None, use_reentrant=False)
            else:
                h = block(h, ctx, cache.layers[i] if cache is not None else None)
        h = self.final_norm(h)
        logits = self.head(h) if self.head is not None else h @ self.embed.weight.t()
        if cache is not None:
            cache.pos += T
        return logits, cache
