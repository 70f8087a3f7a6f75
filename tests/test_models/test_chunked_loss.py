"""Chunked LM-head loss (models/loss.py) against the plain all-logits computation, and the
peak-memory helper (train/memory.py) that checks what chunking is for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from models.loss import IGNORE_INDEX, head_loss
from train.memory import peak_memory_bytes

CPU = torch.device("cpu")


def _inputs(n: int, v: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0,
            ignore_every: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE_INDEX
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), labels


def _reference(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, z_loss: float) -> torch.Tensor:
    """The plain loss written out: every logit at once, stock cross-entropy."""
    logits = (h @ w.T).to(torch.promote_types(h.dtype, torch.float32))
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    lse = torch.logsumexp(logits[labels != IGNORE_INDEX], dim=-1)
    return ce + z_loss * (lse ** 2).sum()


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """Relative to the reference's largest entry, so near-zero entries need no atol of their own."""
    assert a.dtype == b.dtype and a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rtol * b.abs().max().item() + 1e-300, (err, b.abs().max().item())


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("chunk", [1, 5, 8, 36])      # 5 does not divide N = 37; 36 leaves 1
def test_fp64_matches_plain(chunk: int, z_loss: float):
    h, w, labels = _inputs(37, 50, 16)
    ce, z = head_loss(h, w, labels, z_loss=z_loss, chunk_tokens=chunk)
    assert ce.shape == z.shape == () and ce.dtype == z.dtype == torch.float64
    if z_loss == 0:
        assert z.item() == 0.0
    loss = ce + z
    ref = _reference(h, w, labels, z_loss)
    _assert_close(loss.detach(), ref.detach(), rtol=1e-12)
    for got, want in zip(_grads(loss, h, w), _grads(ref, h, w)):
        _assert_close(got, want, rtol=1e-12)


def test_batched_shape_and_int32_labels():
    h, w, labels = _inputs(24, 30, 8)
    ce, z = head_loss(h.view(2, 12, 8), w, labels.view(2, 12).int(), z_loss=1e-2, chunk_tokens=5)
    _assert_close((ce + z).detach(), _reference(h, w, labels, 1e-2).detach(), rtol=1e-12)
    with pytest.raises(ValueError, match="disagree"):
        head_loss(h.view(2, 12, 8), w, labels, chunk_tokens=5)


def test_gradcheck():
    h, w, labels = _inputs(7, 6, 4, ignore_every=3)
    assert torch.autograd.gradcheck(
        lambda h, w: head_loss(h, w, labels, z_loss=0.1, chunk_tokens=3), (h, w))


@pytest.mark.parametrize("need", ["h", "weight"])
def test_only_one_input_needs_grad(need: str):
    h, w, labels = _inputs(20, 12, 8)
    h, w = (h, w.detach()) if need == "h" else (h.detach(), w)
    x = h if need == "h" else w
    got = _grads(sum(head_loss(h, w, labels, z_loss=1e-3, chunk_tokens=6)), x)[0]
    _assert_close(got, _grads(_reference(h, w, labels, 1e-3), x)[0], rtol=1e-12)


def test_tied_weight_gets_both_grads():
    """An embedding and the head share one matrix: its grad is the sum of both uses."""
    n, v, d = 30, 40, 8
    _, w, labels = _inputs(n, v, d)
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1))
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def loss(chunk: int) -> torch.Tensor:
        h = torch.tanh(F.embedding(ids, w) @ mix)
        return sum(head_loss(h, w, labels, z_loss=1e-3, chunk_tokens=chunk))

    got, want = _grads(loss(7), w)[0], _grads(loss(0), w)[0]
    emb_only = _grads(torch.tanh(F.embedding(ids, w) @ mix).sum(), w)[0]
    assert (emb_only != 0).any() and not torch.allclose(got, emb_only)   # both uses contribute
    _assert_close(got, want, rtol=1e-12)


def test_bf16_inputs_match_plain_bf16():
    h, w, labels = _inputs(48, 64, 32, dtype=torch.bfloat16)
    ce, z = head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=7)
    ce_ref, z_ref = head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=0)     # plain path
    assert ce.dtype == z.dtype == torch.float32
    torch.testing.assert_close(ce, ce_ref, rtol=1e-3, atol=0)
    torch.testing.assert_close(z, z_ref, rtol=1e-3, atol=0)
    got, want = _grads(ce + z, h, w), _grads(ce_ref + z_ref, h, w)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        _assert_close(a.float(), b.float(), rtol=2e-2)


def test_cpu_autocast_matches_plain_autocast():
    """fp32 inputs, bf16 matmuls: backward recomputes in bf16 although custom_bwd only
    replays CUDA autocast; grads come back fp32 like the inputs."""
    h, w, labels = _inputs(40, 64, 32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sum(head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=9))
        ref = sum(head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=0))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    for a, b in zip(_grads(loss, h, w), _grads(ref, h, w)):
        assert a.dtype == torch.float32
        _assert_close(a, b, rtol=2e-2)


@pytest.mark.parametrize("chunk", [4, 0])
def test_all_labels_ignored(chunk: int):
    h, w, _ = _inputs(10, 12, 8)
    labels = torch.full((10,), IGNORE_INDEX)
    ce, z = head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=chunk)
    assert ce.item() == 0.0 and z.item() == 0.0
    for g in _grads(ce + z, h, w):
        assert torch.isfinite(g).all() and (g == 0).all()


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_materialises_all_logits():
    n, v, d, chunk = 64, 96, 8, 16           # N*V = 6144 > chunk*V = 1536 > V*d = 768 > N*d = 512
    h, w, labels = _inputs(n, v, d, dtype=torch.float32)

    def run(chunk_tokens: int) -> tuple[list[tuple[int, ...]], int]:
        saved = []
        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(tuple(t.shape))
            return t
        with _LargestOutput() as mode:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                ce, z = head_loss(h, w, labels, z_loss=1e-4, chunk_tokens=chunk_tokens)
            (ce + z).backward()
        return saved, mode.largest

    saved, largest = run(chunk)
    assert sorted(saved) == sorted([(n, d), (v, d), (n,), (n,)])     # h, weight, labels, logsumexp
    assert largest <= chunk * v
    _, plain_largest = run(0)            # the mode does see the plain path's full logits
    assert plain_largest == n * v


def test_peak_memory_of_one_allocation():
    peak = peak_memory_bytes(lambda: torch.empty(1 << 20), CPU)
    assert peak == 4 << 20
    x = torch.randn(1 << 20)
    assert peak_memory_bytes(lambda: (x.view(1024, 1024), x[::2], x.add_(1)), CPU) == 0   # no new storage


def test_chunked_peak_memory_is_a_fraction_of_plain():
    """Plain: in backward the log-softmax output, the grad of the log-probs and the grad of
    the logits are N x V fp32 each (>= 3 x 128 MiB here). Chunked: one chunk of logits
    (16 MiB) plus grad_h and grad_weight (3 MiB): about 20x less."""
    n, v, d, chunk = 4096, 8192, 64, 512
    h, w, labels = _inputs(n, v, d, dtype=torch.float32, ignore_every=0)
    peaks = {}
    for c in (0, chunk):
        def step() -> None:
            ce, z = head_loss(h, w, labels, chunk_tokens=c)
            (ce + z).backward()
        peaks[c] = peak_memory_bytes(step, CPU)
    logits_bytes = n * v * 4
    assert peaks[0] >= 3 * logits_bytes
    assert peaks[chunk] <= 2 * chunk * v * 4 + (n + v) * d * 4
    assert peaks[chunk] < peaks[0] / 10
