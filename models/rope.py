"""Rotary position embeddings (rotate-half convention, as in Llama / GPT-NeoX)."""
from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), grown on demand for longer decoding.

    The tables are non-persistent float64 buffers: never checkpointed (they follow from the
    config), moved with the module, and rebuilt in float64 whenever the module is moved or cast
    (`model.to(bf16)`, `to_empty` after a meta-device build), so casting never rounds them.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(max_seq_len)

    def reset(self, length: int | None = None, device: torch.device | str | None = None) -> None:
        """(Re)build the tables for `length` positions (default: as many as now) on `device`
        (default: where they are; the meta device gets shapes only)."""
        length = self.cos.shape[0] if length is None else length
        device = torch.device(device) if device is not None else self.cos.device
        if device.type == "meta":
            self.cos = torch.empty(length, self.head_dim, dtype=torch.float64, device=device)
            self.sin = torch.empty_like(self.cos)
            return
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64, device="cpu")
                                         / self.head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float64, device="cpu"), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.reset()             # exact float64 again, on wherever fn put the buffers
        return self

    def forward(self, start: int, length: int, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 cos, sin of shape (length, head_dim) for positions start .. start+length-1."""
        if start + length > self.cos.shape[0]:
            self.reset(2 * (start + length))
        cos, sin = self.cos[start:start + length], self.sin[start:start + length]
        if device is not None and torch.device(device) != cos.device:
            cos, sin = cos.to(device), sin.to(device)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, Dh); cos/sin: (T, Dh). Rotation in fp32 (fp64 for fp64 x), result in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dt)
    cos, sin = cos.to(dt)[None, :, None, :], sin.to(dt)[None, :, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
