"""`ablate bench`: time the real training step on random tokens, through the configured backend.

- `ablate bench CONFIG [--reference]`: `Trainer.train_step` itself (forward with the loss,
  backward, clipping, the one host sync, the optimizer), under the configured backend, so
  `parallel.compile` and activation checkpointing change what is measured. `--reference` also
  times a minimal plain-PyTorch decoder of the same shape, written here and independent of
  `models/`, in the same process (compiled per block when `parallel.compile` is on: both or
  neither), and prints our throughput as a ratio of it: the overhead the configurable model costs.
- `--mixers [--seq-lens 512,2048]`: each distinct mixer of the layer pattern alone, forward and
  backward, at each sequence length, in each of its forms (DeltaNet: chunkwise and recurrent).
- `--loss-memory`: peak memory of forward + backward with the LM-head loss chunked and in one pass.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import models
from models.context import MixerContext, split_output
from models.ffn import GLU, MLP
from models.flops import count_params, flops_per_token
from models.registry import MIXERS
from models.rope import RotaryEmbedding
from train.config import Config, resolve_config
from train.parallel import init_distributed, shutdown_distributed
from train.runtime import autocast, resolve_device
from train.trainer import Trainer, memory_gb, peak_flops


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


def _seconds_per_call(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall seconds of fn() over `steps` calls after `warmup` untimed ones (synced)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def random_batches(cfg: Config, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` loader-shaped micro-batches of uniformly random tokens (labels: the inputs shifted by
    one), on the CPU like the loader's (train_step moves them)."""
    T, B, V = cfg.data.seq_len, cfg.train.micro_batch, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = torch.randint(0, V, (B, T + 1), generator=gen)
        out.append({"input_ids": w[:, :-1], "labels": w[:, 1:], "doc_ids": torch.zeros(B, T, dtype=torch.long),
                    "indices": torch.arange(i * B, (i + 1) * B)})
    return out


def _reference_step(cfg: Config, device: torch.device, batches: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    """The reference decoder's training step on the same batches (plain AdamW, clipping)."""
    torch.manual_seed(cfg.seed)
    ref = ReferenceDecoder(cfg).to(device)
    if cfg.parallel.compile:
        for block in ref.blocks:
            block.compile()
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    n_tok = sum(int(b["labels"].numel()) for b in batches)
    data = [(b["input_ids"].to(device), b["labels"].to(device)) for b in batches]

    def step() -> None:
        for x, y in data:
            with autocast(device):
                logits = ref(x).float()
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").div(n_tok).backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_bench(cfg: Config, steps: int = 10, warmup: int = 3, reference: bool = False) -> str:
    """Time `Trainer.train_step` (and optionally the reference decoder's step) on random tokens."""
    device = resolve_device(cfg.device)
    resolve_config(cfg)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(cfg.parallel.backend, device.type, cfg.parallel.timeout_s,
                            cpu_collectives=cfg.parallel.cpu_offload)
    try:
        trainer = Trainer(cfg, None, info=info)
        state = trainer.build()
        batches = random_batches(cfg, trainer.accum)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _seconds_per_call(lambda: trainer.train_step(batches), steps, warmup, device)
        mem = memory_gb(trainer.device)
        model = state.model
        T, B = cfg.data.seq_len, cfg.train.micro_batch
        tokens = trainer.accum * B * T * info.world_size
        fpt = flops_per_token(model, T)
        peak = peak_flops(cfg, device)
        tps = tokens / seconds
        n = count_params(model)
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"CPU, {torch.get_num_threads()} threads")
        mfu = "n/a (no peak on CPU; set train.peak_tflops)" if peak is None else f"{tps * fpt / (peak * info.world_size):.1%}"
        p = cfg.parallel
        lines = [
            f"device: {device} ({where}), torch {torch.__version__}",
            f"shape: d={cfg.model.d_model} L={cfg.model.n_layers} H={cfg.model.n_heads} vocab={cfg.model.vocab_size} "
            f"params={n.total:,}; step = {trainer.accum} x {B} x {T} tokens x {info.world_size} rank(s), "
            f"median of {steps} steps after {warmup} warm-up",
            f"backend: {p.backend}, compile: {'on' if p.compile else 'off'}"
            f"{' (reference too)' if reference and p.compile else ''}, "
            f"activation checkpointing: {p.activation_checkpointing}",
            f"ablate:    {seconds * 1e3:9.1f} ms/step  {tps:12,.0f} tokens/s  MFU {mfu}  peak memory {mem:.2f} GB  "
            f"FLOPs/token {fpt:,.0f}",
        ]
        if reference:
            del trainer, state, model          # free our model before building the reference
            ref_seconds = _seconds_per_call(_reference_step(cfg, device, batches), steps, warmup, device)
            rtps = tokens / ref_seconds
            lines.append(f"reference: {ref_seconds * 1e3:9.1f} ms/step  {rtps:12,.0f} tokens/s")
            lines.append(f"ratio (ablate / reference tokens/s): {tps / rtps:.3f}")
            if any(m.kind != "attention" for m in cfg.model.layers.mixers.values()):
                lines.append("note: the reference is an attention-only decoder of the same width and depth")
        return "\n".join(lines)
    finally:
        if info.distributed and not had_group:
            shutdown_distributed()


def bench_mixers(cfg: Config, seq_lens: list[int], steps: int = 10, warmup: int = 3) -> str:
    """Each distinct mixer of the layer pattern alone: forward + backward of one (B, T, d) input,
    once per form it lists in `bench_forms` (DeltaNet: chunkwise and recurrent), each row named
    by the kernel it ran."""
    device = resolve_device(cfg.device)
    resolve_config(cfg)
    m = cfg.model
    letters = m.layers.letters(m.n_layers)
    B = cfg.train.micro_batch
    lines = [f"mixers alone, forward + backward, batch {B}, d={m.d_model}, device {device}, "
             f"median of {steps} after {warmup} warm-up"]
    for letter in dict.fromkeys(letters):        # distinct, in pattern order
        mixer_cfg = m.layers.mixers[letter]
        torch.manual_seed(cfg.seed)
        mixer = MIXERS.get(mixer_cfg.kind)(m, mixer_cfg, letters.index(letter)).to(device)
        forms = getattr(mixer, "bench_forms", (None,))
        timed: dict[tuple[str, int], float] = {}     # (kernel, T) -> seconds, the whole layer
        cores: dict[tuple[str, int], float] = {}     # the same for its core alone (bench_core)
        for form, T in itertools.product(forms, seq_lens):
            if form is not None:             # a mixer with several forms (DeltaNet: chunk, recurrent)
                mixer.form = form
            cos, sin = RotaryEmbedding(m.head_dim, T, m.rope_theta)(0, T, device)
            ctx = MixerContext(start=0, cos=cos.float(), sin=sin.float())
            x = torch.randn(B, T, m.d_model, device=device, requires_grad=True)
            grad = torch.randn(B, T, m.d_model, device=device)

            def fwd_bwd() -> None:
                with autocast(device):
                    y, _ = split_output(mixer(x, ctx))
                y.float().backward(grad)
                x.grad = None
                mixer.zero_grad(set_to_none=True)

            s = _seconds_per_call(fwd_bwd, steps, warmup, device)
            kernel = getattr(mixer, "kernel", "")
            timed[kernel, T] = s
            lines.append(f"  {letter}: {mixer_cfg.kind:<12} T={T:<6} {s * 1e3:9.2f} ms  {B * T / s:12,.0f} tokens/s"
                         f"  {kernel}")
            if hasattr(mixer, "bench_core"):       # the form's core alone, without the shared layers
                s = _seconds_per_call(mixer.bench_core(B, T, device), steps, warmup, device)
                cores[kernel, T] = s
                lines.append(f"  {letter}: {mixer_cfg.kind:<12} T={T:<6} {s * 1e3:9.2f} ms  "
                             f"{B * T / s:12,.0f} tokens/s  {kernel} core alone")
        if len(forms) > 1:         # the first form (training's) against each other, measured in this run
            first, *others = dict.fromkeys(k for k, _ in timed)
            for label, t in ((" ", timed), (" core alone: ", cores)):
                for other, T in itertools.product(others, seq_lens) if t else ():
                    lines.append(f"  {letter}: {mixer_cfg.kind:<12} T={T:<6}{label}{first} is "
                                 f"{t[other, T] / t[first, T]:.1f}x faster than {other}")
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
