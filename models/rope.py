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
        # Plain float64 attributes, not buffers: model.to(bf16) must not round the tables, and
        # they are derived from the config, so never checkpointed. Moved per device on use.
        self._tables = {torch.device("cpu"): (emb.cos(), emb.sin())}

    def forward(self, start: int, length: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """float64 cos, sin of shape (length, head_dim) for positions start .. start+length-1."""
        device = torch.device(device)
        cpu_cos, _ = self._tables[torch.device("cpu")]
        if start + length > cpu_cos.shape[0]:
            self._build(2 * (start + length))
        if device not in self._tables:
            cos, sin = self._tables[torch.device("cpu")]
            self._tables[device] = (cos.to(device), sin.to(device))
        cos, sin = self._tables[device]
        return cos[start:start + length], sin[start:start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, Dh); cos/sin: (T, Dh). Rotation in fp32 (fp64 for fp64 x), result in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    cos, sin = cos.to(dt)[None, :, None, :], sin.to(dt)[None, :, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
