"""The decoder: token embedding -> blocks -> final norm -> LM head (and, with labels, the loss).

Single-device model code; parallelism (activation checkpointing, compile, FSDP2) is applied
from outside (train/parallel). `forward` returns a `ModelOutput` (models/context.py):

- training: `model(ids, labels=labels, z_loss=...)` -> `losses["ce"]` (summed over target
  tokens, computed in sequence chunks so no full fp32 logits tensor is ever alive), `losses["z"]`,
  and every loss term the blocks returned; no logits unless `return_logits=True`.
- evaluation / decoding: `model(ids)` -> `logits`; pass `cache=model.new_cache()` to decode
  incrementally (the same object comes back, updated, as `out.cache`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.block import Block
from models.config import ModelConfig
from models.context import LossTerm, MixerContext, ModelOutput, add_losses, split_output
from models.loss import head_loss
from models.norm_removal import RemovableNorm, position_kinds
from models.norms import build_norm
from models.parallel_plan import ParallelPlan, collect_hints
from models.parameterization import build_parameterization
from models.registry import MEMORIES, ConfigError
from models.rope import RotaryEmbedding
from models.init import init_parameters, plain_name
from models.tags import (EMBEDDING, FINAL_NORM_BIAS, FINAL_NORM_GAIN, NORM_BIAS, NORM_GAIN, OUTPUT_BIAS, OUTPUT_HEAD,
                         retag, tag_linear)


class DecodeCache:
    """Per-layer mixer caches plus the number of tokens already consumed."""

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.pos = 0


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init_seed: int = 0):
        """init_seed: every parameter is drawn from a generator seeded by (init_seed, its name);
        the trainer passes the run's `seed`. Under `torch.device("meta")` nothing is drawn."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size", "must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.param = build_parameterization(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed.param_tags = {"weight": EMBEDDING.name}
        self.blocks = nn.ModuleList(
            Block(cfg, i, self.param.residual_multiplier) for i in range(cfg.n_layers))
        # modules several layers read (a shared memory value table), owned here, not by a block
        self.shared = nn.ModuleDict()
        if cfg.memory.layers:
            build = getattr(MEMORIES.get(cfg.memory.kind), "build_shared", None)
            table = build(cfg) if build is not None else None
            if table is not None:
                self.shared["memory"] = table
        # the final norm has its own tags: parameterizations treat it unlike the block norms
        removal = cfg.norm.removal
        final = (RemovableNorm(cfg.norm.final, cfg.d_model, cfg.norm.eps, removal.aux_loss_weight)
                 if removal is not None else build_norm(cfg.norm.final, cfg.d_model, cfg.norm.eps))
        self.final_norm = retag(final, {NORM_GAIN.name: FINAL_NORM_GAIN, NORM_BIAS.name: FINAL_NORM_BIAS})
        self.head = None
        if not cfg.tie_embeddings:
            self.head = tag_linear(nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias),
                                   weight=OUTPUT_HEAD, bias=OUTPUT_BIAS)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.init_seed = init_seed
        self.init_weights()

    def init_weights(self, device: torch.device | str | None = None) -> None:
        """Initialise every parameter from its TagSpec and (init_seed, its name), and rebuild the
        RoPE tables (on `device`). After `to_empty()` of a meta-device build this reproduces a
        direct build bit for bit; on FSDP2 shards each rank keeps its slice (models/init.py)."""
        self.rope.reset(device=device)
        init_parameters(self, self.param, self.init_seed)
        for module in self.modules():          # state that is not a parameter (spectral norm's iterate)
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def reset_parameters(self) -> None:
        """nn.Module convention: the same as init_weights()."""
        self.init_weights()

    def parallel_plan(self) -> ParallelPlan:
        """Each block is a checkpoint / compile / FSDP2 unit; the last block stays unsharded after
        forward (the root's backward all-gather would reshard it at once); modules' own
        `parallel_hint`s (models/parallel_plan.py) are folded in."""
        blocks = [f"blocks.{i}" for i in range(len(self.blocks))]
        plan = ParallelPlan(units=list(blocks), checkpointable=list(blocks), compiled=list(blocks),
                            reshard_after_forward={blocks[-1]: False})
        return collect_hints(self, plan)

    def init_from_aliases(self) -> dict[str, str]:
        """{parameter name: checkpoint key} for parameters that `init_from` should fill from a
        differently named checkpoint entry, gathered from modules' `checkpoint_aliases` dicts
        (names relative to the module), e.g. a duplicated norm copying the gain it was split from."""
        out = {}
        for name, module in self.named_modules():
            for new, old in getattr(module, "checkpoint_aliases", {}).items():
                prefix = f"{plain_name(name)}." if name else ""
                out[prefix + new] = prefix + old
        return out

    def init_from_fresh(self) -> list[str]:
        """State names `init_from` may leave at their initial values although the checkpoint lacks
        them: modules' `fresh_state` buffers (a removable norm's switch state, models/norm_removal.py)."""
        out = []
        for name, module in self.named_modules():
            for buf in getattr(module, "fresh_state", ()):
                out.append(f"{plain_name(name)}.{buf}" if name else buf)
        return out

    def layer_summary(self) -> list[dict[str, Any]]:
        """Per layer: its mixer kind, the kernel its forward takes, and its FFN (kind/activation, or
        memory/<kind>): the `layers` field of the run's `model` event."""
        cfg, letters = self.cfg, self.cfg.layers.letters(self.cfg.n_layers)
        out = []
        for i, block in enumerate(self.blocks):
            ffn = f"memory/{cfg.memory.kind}" if i in cfg.memory.layers else f"{cfg.ffn.kind}/{cfg.ffn.activation}"
            out.append({"layer": i, "mixer": cfg.layers.mixers[letters[i]].kind,
                        "kernel": getattr(block.mixer, "kernel", "torch"), "ffn": ffn})
        return out

    def new_cache(self) -> DecodeCache:
        return DecodeCache([block.mixer.new_cache() for block in self.blocks])

    @property
    def head_weight(self) -> torch.Tensor:
        """The (V, d) LM head matrix: the untied head's, else the embedding table."""
        return self.head.weight if self.head is not None else self.embed.weight

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                cache: DecodeCache | None = None, doc_ids: torch.Tensor | None = None,
                sample_index: torch.Tensor | None = None, return_logits: bool = False,
                want_stats: bool = False, z_loss: float = 0.0,
                pad_mask: torch.Tensor | None = None) -> ModelOutput:
        """labels: (B, T) next-token targets, -100 where no loss is taken. sample_index: (B,) global
        sample index of each row (the loader's `indices`); it keys the stochastic-activation masks
        so they do not depend on ranks or micro-batching. None: every row counts as sample 0
        (evaluation, generation), so batching never changes a result. z_loss: the coefficient of
        the z-loss term (PaLM, arXiv 2204.02311), summed over target tokens like the CE.
        pad_mask: (B, start + T) bool, True at real tokens, over the cached and the new positions
        (left-padded batches: the Hugging Face export, models/hf.py); each row's RoPE positions
        count its real tokens only, and every mixer must honour it (`takes_pad_mask`)."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        h = self.embed(input_ids)
        if self.param.input_multiplier != 1.0:
            h = h * self.param.input_multiplier
        rope_dtype = torch.promote_types(h.dtype, torch.float32)   # converted once, not per layer
        if pad_mask is None:
            cos, sin = (t.to(rope_dtype) for t in self.rope(start, T, input_ids.device))
        else:                    # per-row tables (B, T, Dh): each row's first real token is position 0
            refused = sorted({type(b.mixer).__name__ for b in self.blocks
                              if not getattr(b.mixer, "takes_pad_mask", False)})
            if refused:
                raise ValueError(f"pad_mask: mixer(s) {', '.join(refused)} cannot take a padding mask")
            pos = (pad_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]
            cos, sin = (t[pos].to(rope_dtype) for t in self.rope(0, start + T, input_ids.device))
        kinds = None
        if self.cfg.norm.removal is not None:
            kinds = position_kinds(input_ids, start, pad_mask, self.cfg.norm.removal.eot_token)
        ctx = MixerContext(start=start, cos=cos, sin=sin, doc_ids=doc_ids, sample_index=sample_index,
                           token_ids=input_ids, want_stats=want_stats, shared=self.shared, pad_mask=pad_mask,
                           norm_kinds=kinds)
        out = ModelOutput(cache=cache)
        for i, block in enumerate(self.blocks):
            h, aux = block(h, ctx, cache.layers[i] if cache is not None else None)
            add_losses(out.losses, aux.losses)
            for name, value in aux.stats.items():
                out.stats.setdefault(name, {})[i] = value.detach()
        # a removable final norm reads the position kinds and may return the ln_aux term
        h, final_aux = split_output(self.final_norm(h, kinds) if kinds is not None else self.final_norm(h))
        if final_aux is not None:
            add_losses(out.losses, final_aux.losses)
        if self.param.output_multiplier != 1.0:
            h = h * self.param.output_multiplier
        if labels is not None:
            weight, hh = self.head_weight, h
            if self.head is not None and self.head.bias is not None:     # logits = [h, 1] @ [W, b]^T
                weight = torch.cat([weight, self.head.bias[:, None].to(weight.dtype)], dim=1)
                hh = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
            ce, z = head_loss(hh, weight, labels, z_loss=z_loss, chunk_tokens=self.cfg.loss_chunk_tokens)
            out.losses = {"ce": LossTerm(ce, "sum"), **({"z": LossTerm(z, "sum")} if z_loss > 0 else {}),
                          **out.losses}
        if labels is None or return_logits:
            out.logits = self.head(h) if self.head is not None else h @ self.embed.weight.t()
        if cache is not None:
            cache.pos += T
        return out
