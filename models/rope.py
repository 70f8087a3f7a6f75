"""Rotary position embeddings (rotate-half convention, as in Llama / GPT-NeoX)."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables for positions [0, max_seq_len); grows on demand for longer decoding."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._build(max_seq_len)

    def _build(self, length: int) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # non-persistent: derived from the config, never checkpointed
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (length, head_dim) for positions start .. start+length-1."""
        if start + length > self.cos.shape[0]:
            device = self.cos.device
            self._build(2 * (start + length))
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.cos[start:start + length], self.sin[start:start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, Dh); cos/sin: (T, Dh). Rotation in fp32, result in x's dtype."""
    xf = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
