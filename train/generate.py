"""Sampling through the decoding cache: greedy (temperature 0) or temperature / top-k."""
from __future__ import annotations

from pathlib import Path

import torch

import models
from models.registry import ConfigError
from train.rundir import RunDir
from train.runtime import load_model, load_run_config, resolve_device


@torch.no_grad()
def generate(model: models.Decoder, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompt_ids` (B, T); returns (B, T + n) ids. Prefill once, then one token per step."""
    model.eval()
    cache = model.new_cache()
    logits = model(prompt_ids, cache=cache).logits
    ids = prompt_ids
    for _ in range(max_new_tokens):
        nxt = _sample(logits[:, -1].float(), temperature, top_k, generator)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
        if cache.pos >= model.cfg.max_seq_len:
            break
        logits = model(nxt, cache=cache).logits
    return ids


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate_from_run(run_dir: str | Path, prompt: str, step: int | str | None = "latest",
                      max_new_tokens: int = 100, temperature: float = 0.0, top_k: int | None = None,
                      seed: int = 0, device: str | None = None) -> str:
    """`ablate generate`: a sample from a run's checkpoint on `device` (auto | cpu | cuda; None:
    the run's own `device`, resolved as training resolves it)."""
    from train.data import load_tokenizer
    try:
        dev = resolve_device(device or load_run_config(run_dir).device)
    except ConfigError as e:              # no GPU: name the flag when it asked for one
        raise ConfigError("--device" if device else e.key, e.message) from None
    model, cfg, _ = load_model(run_dir, step, dev)
    tok = load_tokenizer(RunDir(run_dir).tokenizer_dir)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)], dtype=torch.long, device=dev)
    if ids.numel() == 0:
        ids = torch.tensor([[tok.eos_token_id]], dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = generate(model, ids, max_new_tokens, temperature, top_k, eos_id=tok.eos_token_id, generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
