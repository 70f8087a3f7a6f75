"""`ablate bench`: time the real training step (forward, backward, optimizer) on random tokens.

`--reference` also times a minimal plain-PyTorch decoder of the same shape, written here and
independent of `models/`, in the same process, and prints our throughput as a ratio of it:
the overhead the configurable model costs.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import models
from models.ffn import GLU, MLP
from models.flops import count_params, flops_per_token
from train.config import Config, resolve_config
from train.optim import build_optimizer
from train.trainer import autocast, memory_gb, peak_flops, resolve_device


# ----------------------------------------------------------------------------- reference model
class _RefBlock(nn.Module):
    def __init__(self, d: int, h: int, kv: int, hidden: int, eps: float):
        super().__init__()
        self.h, self.kv, self.dh = h, kv, d // h
        self.n1, self.n2 = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.qkv = nn.Linear(d, (h + 2 * kv) * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.dh, self.kv * self.dh, self.kv * self.dh], -1)
        q, k, v = (t.view(B, T, -1, self.dh).transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv != self.h)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        g, u = self.up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ReferenceDecoder(nn.Module):
    """nanoGPT-style Llama decoder: fused QKV, SDPA, SwiGLU, tied head. No options."""

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        hidden = GLU.hidden_width(m) if m.ffn.kind == "glu" else MLP.hidden_width(m)
        self.emb = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(_RefBlock(m.d_model, m.n_heads, m.kv_heads, hidden, m.norm.eps)
                                    for _ in range(m.n_layers))
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm.eps)
        dh = m.head_dim
        inv = 1.0 / (m.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        f = torch.outer(torch.arange(m.max_seq_len).float(), inv)
        self.register_buffer("cos", torch.cat([f, f], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([f, f], -1).sin(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, self.cos[:T], self.sin[:T])
        return self.norm(x) @ self.emb.weight.t()


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                params: list[torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]],
                steps: int, warmup: int, device: torch.device, grad_clip: float) -> dict[str, float]:
    """Seconds per step and the share of forward / backward / optimizer (timed with syncs)."""
    fwd = bwd = opt = 0.0
    n_tok = sum(int((y != -100).sum()) for _, y in batches)
    for i in range(warmup + steps):
        tf = tb = 0.0
        for x, y in batches:
            a = time.perf_counter()
            with autocast(device):
                loss = loss_sum(x, y) / n_tok
            _sync(device)
            b = time.perf_counter()
            loss.backward()
            _sync(device)
            tf, tb = tf + (b - a), tb + (time.perf_counter() - b)
        c = time.perf_counter()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            fwd, bwd, opt = fwd + tf, bwd + tb, opt + (time.perf_counter() - c)
    total = fwd + bwd + opt
    return {"step_s": total / steps, "forward": fwd / total, "backward": bwd / total, "optimizer": opt / total}


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, reference: bool = False) -> str:
    device = resolve_device(cfg.device)
    resolve_config(cfg)
    torch.manual_seed(cfg.seed)
    accum = cfg.train.global_batch // cfg.train.micro_batch
    T, B = cfg.data.seq_len, cfg.train.micro_batch
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(accum):
        w = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen)
        batches.append((w[:, :-1].to(device), w[:, 1:].to(device)))
    tokens = accum * B * T

    model = models.Decoder(cfg.model).to(device)
    opt = build_optimizer(model, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours = _time_steps(lambda x, y: model(x, labels=y).losses["ce"].value, opt, list(model.parameters()),
                       batches, steps, warmup, device, cfg.optim.grad_clip)
    mem = memory_gb(device)
    fpt = flops_per_token(model, T)
    peak = peak_flops(cfg, device)
    tps = tokens / ours["step_s"]
    n = count_params(model)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    mfu = "n/a (no peak on CPU; set train.peak_tflops)" if peak is None else f"{tps * fpt / peak:.1%}"
    lines = [
        f"device: {device} ({where}), torch {torch.__version__}",
        f"shape: d={cfg.model.d_model} L={cfg.model.n_layers} H={cfg.model.n_heads} vocab={cfg.model.vocab_size} "
        f"params={n.total:,}; step = {accum} x {B} x {T} tokens, {steps} timed steps after {warmup} warm-up",
        f"ablate:    {ours['step_s'] * 1e3:9.1f} ms/step  {tps:12,.0f} tokens/s  "
        f"forward {ours['forward']:.0%} backward {ours['backward']:.0%} optimizer {ours['optimizer']:.0%}",
        f"           MFU {mfu}  peak memory {mem:.2f} GB  FLOPs/token {fpt:,.0f}",
    ]
    if reference:
        del model, opt          # free our model before building the reference
        torch.manual_seed(cfg.seed)
        ref = ReferenceDecoder(cfg).to(device)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                    eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        def ref_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = ref(x).float()
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

        r = _time_steps(ref_loss, ref_opt, list(ref.parameters()), batches, steps, warmup, device, cfg.optim.grad_clip)
        rtps = tokens / r["step_s"]
        lines.append(f"reference: {r['step_s'] * 1e3:9.1f} ms/step  {rtps:12,.0f} tokens/s  "
                     f"forward {r['forward']:.0%} backward {r['backward']:.0%} optimizer {r['optimizer']:.0%}")
        lines.append(f"ratio (ablate / reference tokens/s): {tps / rtps:.3f}")
        if any(m.kind != "attention" for m in cfg.model.layers.mixers.values()):
            lines.append("note: the reference is an attention-only decoder of the same width and depth")
    return "\n".join(lines)


def loss_memory(cfg: Config) -> str:
    """Peak tensor memory of one micro-batch's forward + backward with the LM-head loss in
    chunks (`model.loss_chunk_tokens`) and in one pass, and their ratio (`ablate bench
    --loss-memory`). The saving grows with the vocabulary: try model.vocab_size=50304."""
    from train.memory import peak_memory_bytes

    device = resolve_device(cfg.device)
    resolve_config(cfg)
    T, B, V = cfg.data.seq_len, cfg.train.micro_batch, cfg.model.vocab_size
    w = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = w[:, :-1].to(device), w[:, 1:].to(device)
    chunk = cfg.model.loss_chunk_tokens
    torch.manual_seed(cfg.seed)
    model = models.Decoder(cfg.model).to(device)
    peaks = {}
    for label, tokens in (("chunked", chunk), ("one pass", 0)):
        model.cfg.loss_chunk_tokens = tokens

        def step() -> None:
            with autocast(device):
                loss = model(x, labels=y).losses["ce"].value / y.numel()
            loss.backward()
            model.zero_grad(set_to_none=True)

        peaks[label] = peak_memory_bytes(step, device)
    model.cfg.loss_chunk_tokens = chunk
    logits_gb = B * T * V * 4 / 2**30
    return "\n".join([
        f"loss memory: d={cfg.model.d_model} L={cfg.model.n_layers} vocab={V}, one micro-batch {B} x {T} tokens "
        f"(fp32 logits of it: {logits_gb:.2f} GiB), forward + backward, device {device}",
        f"  chunked ({chunk} tokens): peak {peaks['chunked'] / 2**30:7.2f} GiB",
        f"  one pass:              peak {peaks['one pass'] / 2**30:7.2f} GiB",
        f"  ratio (chunked / one pass): {peaks['chunked'] / peaks['one pass']:.3f}",
    ])
