"""Layer linearity: how well a linear map explains each block's output from its input.

Razzhigaev et al., "Your Transformer is Secretly Linear" (ACL 2024, arXiv 2405.12250): for the
token hidden states X (N x d) entering a block and Y leaving it, centre both, divide each by its
Frobenius norm, and fit Y ~ X A by least squares; the linearity score is

    1 - min_A || X~ A - Y~ ||_F^2         (X~, Y~: centred, Frobenius-normalised)

(the authors' code, AIRI-Institute/LLM-Microscope, computes the same). Since ||Y~||_F = 1 this
is the fraction of Y's centred variance a linear map of X explains: tr(Cyx Cxx^+ Cxy) / tr(Cyy)
with C the centred (cross-)covariances, and the normalisation of X cancels. The paper finds
about 0.99 between consecutive layers of pretrained decoders, much lower once the residual is
removed, i.e. on the block's update Y - X against X (`linearity_no_residual` here, as the
paper's `procrustes_similarity_centered`).

Only the sufficient statistics are kept per block (sums and d x d products in float64), so the
memory does not grow with the number of tokens. With N <= d tokens any map fits exactly, so
the score is None there; the fit's optimism is about d / N, so probe with N >> d_model.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import nn

from eval.probes.forward import probe_device, probe_forwards
from train.runtime import unwrap

SERIES = ("linearity", "linearity_no_residual")


class _Moments:
    """Running sums of one block's input x and output y over tokens: enough for the centred
    least-squares fit of y (or y - x) on x."""

    def __init__(self, d: int, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.sx, self.sy = torch.zeros(d, **f64), torch.zeros(d, **f64)
        self.sxx, self.sxy = torch.zeros(d, d, **f64), torch.zeros(d, d, **f64)
        self.syy = torch.zeros((), **f64)            # sum of ||y||^2 (only the trace of Cyy is needed)
        self.sr, self.srr = torch.zeros(d, **f64), torch.zeros((), **f64)   # the update r = y - x, summed
                                                     # itself: tr(Crr) without cancellation when r << x

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += (y * y).sum()
        r = y - x
        self.sr += r.sum(0)
        self.srr += (r * r).sum()

    def scores(self) -> tuple[float | None, float | None]:
        """(linearity of y on x, linearity of y - x on x); None where undefined."""
        n, d = self.n, self.sx.numel()
        if n <= d + 1:
            return None, None
        mx, my = self.sx / n, self.sy / n
        cxx = (self.sxx - n * torch.outer(mx, mx)).cpu()
        cxy = (self.sxy - n * torch.outer(mx, my)).cpu()
        mr = self.sr / n
        tyy, trr = float(self.syy - n * my.dot(my)), float(self.srr - n * mr.dot(mr))
        txx = float(cxx.trace())
        cxx_pinv = torch.linalg.pinv(cxx, hermitian=True)

        def explained(c: torch.Tensor, total: float) -> float | None:
            # min_A ||Xc A - Zc||^2 = tr(Czz) - tr(Czx Cxx^+ Cxz); score = explained / total
            if total <= 1e-12 * txx or total <= 0:         # no variance to explain (an identity block)
                return None
            fit = float((c * (cxx_pinv @ c)).sum())
            return min(max(fit / total, 0.0), 1.0)

        # the update r = y - x: Cxr = Cxy - Cxx
        return explained(cxy, tyy), explained(cxy - cxx, trr)


@torch.no_grad()
def layer_linearity(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                    device: torch.device | str | None = None,
                    autocast: Callable[[], ContextManager] | None = None) -> dict[str, list[float | None]]:
    """Per block: `linearity` (its output on its input) and `linearity_no_residual` (its update,
    output - input, on its input), over the tokens of `batches` in eval mode. The model's
    train/eval mode is restored afterwards."""
    decoder = unwrap(model)
    device = probe_device(model, device)
    moments = [_Moments(decoder.cfg.d_model, device) for _ in decoder.blocks]

    def hook(i: int):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            moments[i].add(args[0], out)
        return fn

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(decoder.blocks)]
    try:
        for _ in probe_forwards(model, batches, device, autocast):
            pass                    # the forward hooks collect
    finally:
        for h in handles:
            h.remove()
    scores = [m.scores() for m in moments]
    return {SERIES[0]: [s[0] for s in scores], SERIES[1]: [s[1] for s in scores]}
