"""TTT layers: TTT-Linear and TTT-MLP, RNNs whose hidden state is a model trained at test time.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States", arXiv
2407.04620; the layer follows the paper's released PyTorch code (test-time-training/ttt-lm-pytorch,
`ttt.py`). Per layer, with H heads of dim d (H d = d_model):

    q, k, v  = x W_q, x W_k, x W_v                  (share_qk: one projection, two causal depthwise convs)
    q, k     = RoPE with positions mod b              positions restart in every mini-batch (the code's
                                                      choice; built here, the decoder's tables are absolute)
    lr_s     = base_lr * sigmoid(x_s theta_h + c_h) / d       per head and token
    eta[t,s] = clamp_min(1/t + offset_t, 0) * lr_s            t = 1..b inside the mini-batch
    z-bar    = the inner model after mini-batch gradient steps on 1/2 ||LN(g(k)) - (v - k)||^2
               (models/mixers/ttt_inner.py; g linear or a 4x GELU MLP, per-head LN)
    o        = q + LN(z-bar);  o = LayerNorm(o)  (post norm, eps 1e-6);  o = GELU_tanh(x W_g) * o (use_gate)
    y        = o W_o

Full mini-batches take the dual form (or the primal one, `form`), the remainder and decoding
the primal form. Mini-batches are aligned to absolute position 0: a prompt of n b + r tokens leaves
a partial mini-batch of r tokens, which decoding continues (the cache keeps its state at the
mini-batch start, the partial mini-batch's q, k, v, lr and the position) and commits once b tokens
are in. The inner state, the LN statistics and the scan run in fp32 (autocast off) under bf16.

Differences from the released code, all outside the function class: the JAX-parity
`permute_qk` around RoPE is left out (a fixed permutation of learned projections); `pre_conv`
runs inside the mixer as x + conv(x) on the block-normed input (the code adds a conv sub-block
with its own RMSNorm before the TTT one); the convs have no bias. `model.doc_mask` is refused:
the inner state does not reset at document starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.context import MixerContext
from models.mixers.deltanet import SHORT_CONV, short_conv
from models.mixers.ttt_inner import State, ln_fwd, mini_batch_eta, primal, scan
from models.norms import LayerNorm
from models.registry import MIXERS, ConfigError
from models.rope import apply_rope
from models.schema import require
from models.tags import TagSpec, register_tag, tag_linear

# The inner model's initial weights W_0 (per head, learned by the outer loop and tiled over the
# batch): fan-in the head dim, not d_model; their own init N(0, 0.02) as in the paper's code, and
# no 6N FLOPs (the inner loop's products are in flops_per_token).
TTT_INNER_WEIGHT = register_tag(TagSpec("ttt_inner_weight", matrix=True, in_block=True, matmul=False, muon_ok=False,
                                        init="module", role="fixed_weight"))
TTT_INNER_BIAS = register_tag(TagSpec("ttt_inner_bias", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                      init="zeros", role="hidden_bias"))
# The inner learning rate's projection x -> H (one row per head): N(0, 0.02), not the model's std.
TTT_LR_WEIGHT = register_tag(TagSpec("ttt_lr_weight", matrix=True, in_block=True, matmul=True, muon_ok=False,
                                     init="module", role="hidden_weight"))
TTT_LR_BIAS = register_tag(TagSpec("ttt_lr_bias", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                   init="zeros", role="hidden_bias"))
# The learnable offsets of the per-position step 1/t (zero at init).
TTT_TOKEN_OFFSET = register_tag(TagSpec("ttt_token_offset", matrix=False, in_block=True, matmul=False,
                                        muon_ok=False, init="zeros", role="hidden_bias"))
# The inner model's per-head LayerNorm (gain one, bias zero).
TTT_NORM_GAIN = register_tag(TagSpec("ttt_norm_gain", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                     init="ones", role="hidden_norm"))
TTT_NORM_BIAS = register_tag(TagSpec("ttt_norm_bias", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                     init="zeros", role="hidden_norm"))
INNER_STD = 0.02


class _TTTChecks:
    """Validation shared by both TTT configs (their fields are listed in full, each with its doc)."""

    def validate(self, path: str) -> None:
        require(self.n_heads is None or self.n_heads >= 1, f"{path}.n_heads", f"must be >= 1 or null, got {self.n_heads}")
        require(self.mini_batch_size >= 1, f"{path}.mini_batch_size", f"must be >= 1, got {self.mini_batch_size}")
        require(self.base_lr >= 0, f"{path}.base_lr", f"must be >= 0, got {self.base_lr}")
        require(self.base_lr_warmup_steps >= 0, f"{path}.base_lr_warmup_steps",
                f"must be >= 0, got {self.base_lr_warmup_steps}")
        require(self.base_lr_warmup_start >= 0, f"{path}.base_lr_warmup_start",
                f"must be >= 0, got {self.base_lr_warmup_start}")
        require(self.scan_checkpoint_group >= 0, f"{path}.scan_checkpoint_group",
                f"must be >= 0 (0: off), got {self.scan_checkpoint_group}")
        if self.pre_conv or self.share_qk:
            require(2 <= self.conv_size <= 8, f"{path}.conv_size", f"pre_conv / share_qk take a kernel of 2..8 "
                    f"(the paper's code uses 4), got {self.conv_size}")


@dataclass
class TTTLinearConfig(_TTTChecks):
    kind: str = "ttt_linear"        # the mixer kind (a registered MIXERS name)
    n_heads: int | None = None      # TTT heads (head dim d_model / n_heads, even); null: model.n_heads
    mini_batch_size: int = 16       # b: tokens per inner gradient step (the paper's 16)
    base_lr: float = 1.0            # the inner LR's scale: lr = base_lr * sigmoid(x theta + c) / head_dim
    base_lr_warmup_steps: int = 0   # base_lr ramps linearly from base_lr_warmup_start over these trainer steps
    base_lr_warmup_start: float = 0.01   # base_lr at step 0 of the warm-up (with base_lr_warmup_steps > 0)
    use_gate: bool = False          # output GELU_tanh(x W_g) * LayerNorm(o)
    pre_conv: bool = False          # x + causal depthwise conv(x) (kernel conv_size) before the projections
    share_qk: bool = False          # one q/k projection with separate causal depthwise convs (kernel conv_size)
    conv_size: int = 4              # kernel of pre_conv's and share_qk's convs (2..8; the paper's code: 4)
    scan_checkpoint_group: int = 0  # mini-batches per checkpointed group of the scan (0: no checkpointing)


@dataclass
class TTTMLPConfig(_TTTChecks):
    kind: str = "ttt_mlp"           # the mixer kind (a registered MIXERS name)
    n_heads: int | None = None      # TTT heads (head dim d_model / n_heads, even); null: model.n_heads
    mini_batch_size: int = 16       # b: tokens per inner gradient step (the paper's 16)
    base_lr: float = 0.1            # the inner LR's scale (the paper's scripts: 0.1 for TTT-MLP)
    base_lr_warmup_steps: int = 480   # base_lr ramps linearly from base_lr_warmup_start over these trainer steps
    base_lr_warmup_start: float = 0.01   # base_lr at step 0 of the warm-up (with base_lr_warmup_steps > 0)
    use_gate: bool = False          # output GELU_tanh(x W_g) * LayerNorm(o)
    pre_conv: bool = False          # x + causal depthwise conv(x) (kernel conv_size) before the projections
    share_qk: bool = False          # one q/k projection with separate causal depthwise convs (kernel conv_size)
    conv_size: int = 4              # kernel of pre_conv's and share_qk's convs (2..8; the paper's code: 4)
    scan_checkpoint_group: int = 0  # mini-batches per checkpointed group of the scan (0: no checkpointing)


TTTConfig = TTTLinearConfig | TTTMLPConfig


class TTTCache:
    """Decoding state: the inner state at the current mini-batch's start (per row, fp32), the
    partial mini-batch's (q, k, v, lr), the absolute position, and the convs' last inputs."""

    def __init__(self) -> None:
        self.state: State | None = None
        self.partial: tuple[torch.Tensor, ...] | None = None
        self.pos = 0
        self.convs: dict[str, torch.Tensor] = {}


class TTTInner(nn.Module):
    """The per-head parameters of the inner loop, with their own init (`reset_parameters`)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, hidden: int | None, b: int):
        super().__init__()
        H, d = n_heads, head_dim
        self.W1 = nn.Parameter(torch.empty(H, d, hidden or d))
        self.b1 = nn.Parameter(torch.zeros(H, 1, hidden or d))
        self.param_tags = {"W1": TTT_INNER_WEIGHT.name, "b1": TTT_INNER_BIAS.name}
        if hidden:
            self.W2 = nn.Parameter(torch.empty(H, hidden, d))
            self.b2 = nn.Parameter(torch.zeros(H, 1, d))
            self.param_tags.update(W2=TTT_INNER_WEIGHT.name, b2=TTT_INNER_BIAS.name)
        self.ln_weight = nn.Parameter(torch.ones(H, d))
        self.ln_bias = nn.Parameter(torch.zeros(H, d))
        self.lr_weight = nn.Parameter(torch.empty(H, d_model))
        self.lr_bias = nn.Parameter(torch.zeros(H))
        self.token_offset = nn.Parameter(torch.zeros(b))
        self.param_tags.update(ln_weight=TTT_NORM_GAIN.name, ln_bias=TTT_NORM_BIAS.name, lr_weight=TTT_LR_WEIGHT.name,
                               lr_bias=TTT_LR_BIAS.name, token_offset=TTT_TOKEN_OFFSET.name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for W_0 and the LR projection (the paper's code); the rest by their tags."""
        for p in (self.W1, getattr(self, "W2", None), self.lr_weight):
            if p is not None:
                nn.init.normal_(p, 0.0, INNER_STD)

    def state(self, B: int, dt: torch.dtype) -> State:
        """W_0 (and b_0) tiled over the batch, in the inner loop's dtype."""
        names = ("W1", "b1", "W2", "b2") if hasattr(self, "W2") else ("W1", "b1")
        return tuple(getattr(self, n).to(dt).unsqueeze(0).expand(B, *getattr(self, n).shape) for n in names)


class TTT(nn.Module):
    """TTT-Linear / TTT-MLP (the module docstring); `hidden` 0 for TTT-Linear, 4 d for TTT-MLP."""

    param_tags: dict[str, str] = {}
    bench_forms = ("dual", "primal")      # `ablate bench --mixers` times both forms
    # what reads the input norm (models/norm_fold.py): the projections and the inner-LR gate; the
    # pre-conv is depthwise and bias-free, so a per-channel scale passes through it
    norm_inputs = {"all": ("wq", "wk", "wv", "wg", ("inner.lr_weight", "inner.lr_bias"))}
    hidden_mult = 0

    def __init__(self, cfg: ModelConfig, mixer_cfg: TTTConfig, layer_idx: int):
        super().__init__()
        self.key = key = f"model.layers.mixers.{cfg.layers.letters(cfg.n_layers)[layer_idx]}"
        if cfg.doc_mask:
            raise ConfigError("model.doc_mask", f"{key} is a {mixer_cfg.kind} mixer, whose inner state does not "
                              "reset at document starts; set model.doc_mask: false (or use attention / deltanet)")
        self.n_heads, self.head_dim = resolve_ttt_heads(cfg, mixer_cfg, key)
        b = self.mini_batch_size = mixer_cfg.mini_batch_size
        if b > cfg.max_seq_len:
            raise ConfigError(f"{key}.mini_batch_size", f"mini_batch_size={b} exceeds model.max_seq_len="
                              f"{cfg.max_seq_len}: no full mini-batch would fit")
        self.base_lr, self.step = mixer_cfg.base_lr, 0          # step: the trainer's, set by set_train_step
        self.warmup_steps, self.warmup_start = mixer_cfg.base_lr_warmup_steps, mixer_cfg.base_lr_warmup_start
        self.group = mixer_cfg.scan_checkpoint_group
        self.rope_theta = cfg.rope_theta
        self.form: Literal["dual", "primal"] = "dual"     # the form of full mini-batches
        d, H, dh = cfg.d_model, self.n_heads, self.head_dim
        self.share_qk = mixer_cfg.share_qk
        self.wq = tag_linear(nn.Linear(d, d, bias=False))
        self.wk = None if self.share_qk else tag_linear(nn.Linear(d, d, bias=False))
        self.wv = tag_linear(nn.Linear(d, d, bias=False))
        K = mixer_cfg.conv_size
        self.conv_pre = self._conv(d, K) if mixer_cfg.pre_conv else None
        self.conv_q = self._conv(d, K) if self.share_qk else None
        self.conv_k = self._conv(d, K) if self.share_qk else None
        self.inner = TTTInner(d, H, dh, self.hidden_mult * dh, b)
        self.post_norm = LayerNorm(d, eps=1e-6)
        self.wg = tag_linear(nn.Linear(d, d, bias=False)) if mixer_cfg.use_gate else None
        self.wo = tag_linear(nn.Linear(d, d, bias=False))
        self.wo.is_residual_out = True

    @staticmethod
    def _conv(channels: int, K: int) -> nn.Conv1d:
        conv = nn.Conv1d(channels, channels, K, groups=channels, bias=False)
        conv.param_tags = {"weight": SHORT_CONV.name}
        return conv

    def new_cache(self) -> TTTCache:
        return TTTCache()

    @property
    def kernel(self) -> str:
        return f"torch_{self.form}"

    def set_train_step(self, step: int) -> None:
        """The 0-based trainer step, which the base LR's warm-up follows (train/callbacks/ttt_schedule.py;
        the export records and restores it, models/hf.py)."""
        self.step = step

    @property
    def base_lr_now(self) -> float:
        """base_lr, ramped linearly from base_lr_warmup_start over the first base_lr_warmup_steps steps."""
        if self.warmup_steps <= 0:
            return self.base_lr
        frac = min(self.step / self.warmup_steps, 1.0)
        return self.warmup_start + (self.base_lr - self.warmup_start) * frac

    def _conv_apply(self, name: str, x: torch.Tensor, cache: TTTCache | None) -> torch.Tensor:
        y, last = short_conv(x, getattr(self, name).weight, cache.convs.get(name) if cache is not None else None)
        if cache is not None:
            cache.convs[name] = last
        return y

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache: TTTCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, dh, b = self.n_heads, self.head_dim, self.mini_batch_size
        h = x
        if self.conv_pre is not None:
            h = h + self._conv_apply("conv_pre", h, cache)
        if self.share_qk:
            qk = self.wq(h)
            q, k = self._conv_apply("conv_q", qk, cache), self._conv_apply("conv_k", qk, cache)
        else:
            q, k = self.wq(h), self.wk(h)
        v = self.wv(h)
        pos0 = cache.pos if cache is not None else 0
        cos, sin = rope_mod_b(pos0, T, b, dh, self.rope_theta, x.device)
        q, k = apply_rope(q.view(B, T, H, dh), cos, sin), apply_rope(k.view(B, T, H, dh), cos, sin)
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            lr = torch.sigmoid(F.linear(h.to(dt), self.inner.lr_weight.to(dt), self.inner.lr_bias.to(dt)))
            lr = (self.base_lr_now / dh) * lr.transpose(1, 2)                          # (B, H, T)
            q, k, v = (t.to(dt).transpose(1, 2) for t in (q, k, v.view(B, T, H, dh)))  # (B, H, T, d)
            o = q + self._inner_loop(q, k, v, lr, pos0, cache)
        o = self.post_norm(o.transpose(1, 2).reshape(B, T, H * dh).to(x.dtype))
        if self.wg is not None:
            o = F.gelu(self.wg(h), approximate="tanh") * o
        return self.wo(o)

    def _inner_loop(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor, pos0: int,
                    cache: TTTCache | None) -> torch.Tensor:
        """LN(z-bar) per token (B, H, T, d): the cached partial mini-batch first (primal), then the
        full mini-batches (self.form, scanned), then the remainder (primal), kept in the cache."""
        B, H, T, d = q.shape
        b = self.mini_batch_size
        inner = self.inner
        gamma, beta = inner.ln_weight.to(q.dtype)[:, None], inner.ln_bias.to(q.dtype)[:, None]
        token_eta = (1.0 / torch.arange(1, b + 1, dtype=q.dtype, device=q.device)
                     + inner.token_offset.to(q.dtype)).clamp_min(0)
        state = cache.state if cache is not None and cache.state is not None else inner.state(B, q.dtype)
        outs: list[torch.Tensor] = []
        i = 0
        partial = cache.partial if cache is not None else None
        if partial is not None:                        # continue the cached partial mini-batch
            p = partial[0].shape[2]
            i = min(b - p, T)
            qq, kk, vv, ll = (torch.cat([old, new[:, :, :i]], 2) for old, new in zip(partial, (q, k, v, lr)))
            z, new_state = primal(state, qq, kk, vv, mini_batch_eta(ll, token_eta[:p + i]), gamma, beta)
            outs.append(z[:, :, p:])
            if p + i == b:
                state, partial = new_state, None
            else:
                partial = (qq, kk, vv, ll)
        n = (T - i) // b
        if n:
            j = i + n * b
            cut = [t[:, :, i:j].unflatten(2, (n, b)) for t in (q, k, v, lr)]
            z, state = scan(state, *cut, token_eta, gamma, beta, self.form, self.group)
            outs.append(z.flatten(2, 3))
            i = j
        if i < T:                                       # the remainder: a partial mini-batch, primal
            rest = tuple(t[:, :, i:] for t in (q, k, v, lr))
            z, _ = primal(state, *rest[:3], mini_batch_eta(rest[3], token_eta[:T - i]), gamma, beta)
            outs.append(z)
            partial = rest
        if cache is not None:
            cache.state, cache.partial, cache.pos = state, partial, pos0 + T
        return ln_fwd(torch.cat(outs, 2), gamma, beta)

    @staticmethod
    def flops_per_token(cfg: ModelConfig, mixer_cfg: TTTConfig, seq_len: int) -> float:
        """The dual form's FLOPs beyond the outer projections (fwd + bwd = 3 x fwd), 2 FLOPs a
        multiply-add, triangular b x b products at half. Per head, token and inner layer
        (d_in -> d_out), forward:

            6 d_in d_out    X W_0 (the gradient's forward), X_q W_0, the end-of-mini-batch W update
            b d_in          tril(X_q X^T)
            2 b d_out       (eta * Attn) dZ and tril(eta) dZ

        TTT-Linear: one layer d -> d, so 6 d^2 + 3 b d. TTT-MLP: d -> 4d and 4d -> d, plus the
        gradient's backprop through W_2 (8 d^2): 56 d^2 + 15 b d. Plus 2 conv_size FLOPs per
        channel and conv (pre_conv: d_model channels; share_qk: two convs of d_model). Linear in
        seq_len's absence: the cost per token does not grow with the context.
        """
        h, d = resolve_ttt_heads(cfg, mixer_cfg, "model.layers.mixers")
        b = mixer_cfg.mini_batch_size
        layers = [(d, 4 * d), (4 * d, d)] if mixer_cfg.kind == "ttt_mlp" else [(d, d)]
        per_head = sum(6 * i * o + b * i + 2 * b * o for i, o in layers)
        if len(layers) == 2:
            per_head += 8 * d * d
        convs = int(mixer_cfg.pre_conv) + 2 * int(mixer_cfg.share_qk)
        return 3.0 * (h * per_head + 2 * mixer_cfg.conv_size * convs * cfg.d_model)


def resolve_ttt_heads(cfg: ModelConfig, mixer_cfg: TTTConfig, key: str) -> tuple[int, int]:
    """(heads, head dim = d_model / heads), which must divide and be even (RoPE)."""
    h = mixer_cfg.n_heads or cfg.n_heads
    if cfg.d_model % h or (cfg.d_model // h) % 2:
        raise ConfigError(f"{key}.n_heads", f"n_heads={h} must divide d_model={cfg.d_model} into an even head "
                          "dim (RoPE rotates pairs)")
    return h, cfg.d_model // h


def rope_mod_b(start: int, T: int, b: int, dim: int, theta: float, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 RoPE tables (T, dim) for positions (start + t) mod b: restarting in every mini-batch."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    pos = (torch.arange(start, start + T, dtype=torch.float64) % b)
    emb = torch.outer(pos, inv_freq).repeat(1, 2)
    return emb.cos().to(device), emb.sin().to(device)


@MIXERS.register("ttt_linear", config=TTTLinearConfig)
class TTTLinear(TTT):
    """TTT-Linear: the inner model g(z) = z W + b per head."""

    hidden_mult = 0


@MIXERS.register("ttt_mlp", config=TTTMLPConfig)
class TTTMLP(TTT):
    """TTT-MLP: the inner model g(z) = GELU_tanh(z W_1 + b_1) W_2 + b_2, hidden 4 d per head."""

    hidden_mult = 4

