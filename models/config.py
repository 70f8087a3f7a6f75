"""ModelConfig: the `model:` section of a run config.

Each architecture slot is an independent key (mixer per layer letter, FFN, activation, norm,
memory placement, parameterization); the registries in `models.registry` say which names exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from models.registry import FFNS, MEMORIES, MIXERS, NORMS, PARAMETERIZATIONS, ConfigError
from models.schema import build, require, validate_tree


@dataclass
class LayersConfig:
    """Which mixer each layer uses: pattern letters index `mixers`."""

    pattern: str | list[str] = "A"     # mixer letters repeated to n_layers, or a list of one letter per layer
    mixers: dict[str, Any] = field(default_factory=lambda: {"A": {"kind": "attention"}})   # letter -> {kind:
                                       # a registered mixer, plus that kind's keys}

    def letters(self, n_layers: int) -> list[str]:
        """The mixer letter of each of the n_layers layers (a string pattern repeats)."""
        if isinstance(self.pattern, list):
            return list(self.pattern)
        reps = -(-n_layers // len(self.pattern))
        return list((self.pattern * reps)[:n_layers])

    def resolve_mixers(self, path: str) -> None:
        """Turn each raw mixer dict into its kind's registered config dataclass."""
        resolved = {}
        for letter, raw in self.mixers.items():
            key = f"{path}.mixers.{letter}"
            if len(letter) != 1:
                raise ConfigError(key, "mixer names must be single letters")
            if not isinstance(raw, dict) and not hasattr(raw, "kind"):
                raise ConfigError(key, f"expected a mapping with a 'kind', got {raw!r}")
            if isinstance(raw, dict):
                kind = raw.get("kind")
                require(isinstance(kind, str), f"{key}.kind", "required: the mixer kind "
                        f"(one of {', '.join(MIXERS.names())})")
                cls = MIXERS.config_class(kind, f"{key}.kind")
                raw = build(cls, raw, key)
            validate_tree(raw, key)
            resolved[letter] = raw
        self.mixers = resolved


@dataclass
class StochasticConfig:
    """`model.ffn.stochastic`: StochA, y = m relu(u) + (1-m) silu(u), m ~ Bernoulli(1-p)
    ("Stochastic activations", arXiv 2509.22358)."""

    p: float = 0.7                 # probability that a draw picks SiLU (p=0: ReLU, p=1: SiLU)
    granularity: Literal["element", "token", "call"] = "element"   # call: one draw per (layer, step)
    eval_mode: Literal["relu", "silu", "stochastic"] = "relu"      # what model.eval() computes
    seed: int | None = None        # mask key; null: the run's top-level `seed` (0 outside a run)

    def validate(self, path: str) -> None:
        require(0.0 <= self.p <= 1.0, f"{path}.p", f"must be in [0, 1], got {self.p}")


@dataclass
class FFNConfig:
    kind: str = "glu"              # mlp | glu | fused_linear (registered in models/ffn.py)
    activation: str = "swiglu"     # for glu: the GLU variant; for mlp: the activation
    hidden: int | Literal["auto"] = "auto"   # auto: parameter-matched width (models/widths.py)
    multiple_of: int = 64          # hidden: auto widths are rounded up to a multiple of this
    bias: bool = False             # biases in the FFN's linear layers
    stochastic: StochasticConfig = field(default_factory=StochasticConfig)
    relu_finetune_frac: float = 0.0   # Swi+FT / StochA+FT: ReLU from 0-based step floor((1 - alpha) * train.steps)
                                      # on (alpha = this; 0: off)
    output_scale: bool = False     # a learnable scalar (init 1) on the FFN output (Scaled-FFN, an LN-free stabilizer)
    weight_norm: Literal["none", "weight", "spectral"] = "none"   # normalise the FFN matrices (models/weight_norm.py)

    def validate(self, path: str) -> None:
        FFNS.check(self.kind, f"{path}.kind")
        cls = FFNS.get(self.kind)
        cls.check_activation(self.activation, f"{path}.activation")
        require(self.multiple_of >= 1, f"{path}.multiple_of", f"must be >= 1, got {self.multiple_of}")
        if self.hidden != "auto":
            require(self.hidden >= 1, f"{path}.hidden", f"must be >= 1 or 'auto', got {self.hidden}")
        if hasattr(cls, "check_config"):
            cls.check_config(self, path)
        key = f"{path}.relu_finetune_frac"
        require(0.0 <= self.relu_finetune_frac <= 1.0, key, f"must be in [0, 1], got {self.relu_finetune_frac}")
        if self.relu_finetune_frac > 0:
            allowed = sorted(getattr(cls, "relu_finetune_activations", ()))
            require(self.activation in allowed, key,
                    f"the ReLU fine-tune switches {', '.join(allowed) or 'nothing'} under "
                    f"{path}.kind={self.kind}, not {path}.activation={self.activation}")


@dataclass
class RemovalConfig:
    """`model.norm.removal`: LayerNorm removal by fine-tuning (Heimersheim, "You can remove GPT2's
    LayerNorm by fine-tuning", arXiv 2409.13710; models/norm_removal.py). Each norm turns, on a step
    schedule, into a fixed linear map that divides by the std it measured on the last batch; at the
    end `ablate checkpoint fold-norms` folds the maps into the adjacent weights. Steps are 0-based:
    a norm switched at step s is fake from step s on, from the stds of step s - 1."""

    start_step: int = 20           # layer 0's FFN-input norm switches at this step, the other layers after it
    gap_ffn: int = 2               # steps between consecutive layers' FFN-input norms
    gap_qk: int = 2                # then the attention-input norms of the q/k path, this many steps apart
    gap_v: int = 3                 # then the v path's copies (attention only), this many steps apart
    final_after: int = 2           # the final norm switches this many steps after the last v-path norm
    eot_after: int = 2             # EOT positions give up their own std this many steps after the final norm
    bos_after: int = 10            # position 0 gives up its own std this many steps after EOT: every norm is
                                   # then one fixed scale, ready to fold
    aux_loss_weight: float = 0.0   # weight of the `ln_aux` term: MSE of each position's residual std before the
                                   # final norm against its mean over ordinary positions (0: off)
    eot_token: int | None = None   # the end-of-text id; null: the tokenizer's EOS (no tokenizer: no EOT case)

    def validate(self, path: str) -> None:
        require(self.start_step >= 1, f"{path}.start_step", f"must be >= 1 (a norm switches with the stds of "
                                                           f"the step before), got {self.start_step}")
        for key in ("gap_ffn", "gap_qk", "gap_v", "final_after", "eot_after", "bos_after"):
            require(getattr(self, key) >= 0, f"{path}.{key}", f"must be >= 0, got {getattr(self, key)}")
        require(self.aux_loss_weight >= 0, f"{path}.aux_loss_weight", f"must be >= 0, got {self.aux_loss_weight}")
        if self.eot_token is not None:
            require(self.eot_token >= 0, f"{path}.eot_token", f"must be >= 0 or null, got {self.eot_token}")


@dataclass
class NormConfig:
    block: str = "rmsnorm"         # the pre-norm before each mixer and FFN: rmsnorm | layernorm | dyt | none
    final: str = "rmsnorm"         # the norm before the LM head
    eps: float = 1.0e-6            # epsilon of every norm (QK-norm included)
    removal: RemovalConfig | None = None   # LayerNorm removal by fine-tuning (null: off; {}: the defaults)

    def validate(self, path: str) -> None:
        NORMS.check(self.block, f"{path}.block")
        NORMS.check(self.final, f"{path}.final")
        require(self.eps > 0, f"{path}.eps", f"must be > 0, got {self.eps}")
        if self.removal is not None:
            removable = ("rmsnorm", "layernorm")
            for key in ("block", "final"):
                require(getattr(self, key) in removable, f"{path}.removal",
                        f"removes rmsnorm or layernorm norms; {path}.{key} is {getattr(self, key)}")


@dataclass
class MemoryConfig:
    """`model.memory`: layers whose FFN is replaced by a memory layer, and its sizes
    (product keys: "Memory Layers at Scale", arXiv 2412.09764; models/memory.py)."""

    layers: list[int] = field(default_factory=list)   # 0-based layer indices
    kind: str = "product_key"         # the memory layer (registered in models/memory.py)
    heads: int = 4                    # memory heads, each with its own sub-key tables; their reads are summed
    k_dim: int = 512                  # query / key dimension (even: two halves of k_dim / 2)
    n_keys: int = 1024                # sub-keys per half: n_keys^2 value slots
    knn: int = 32                     # slots read per head and token
    v_dim: int | None = None          # value dimension; null: d_model
    qk_norm: Literal["none", "rms", "l2"] = "none"    # normalise queries and sub-keys before scoring
    gated: bool = False               # sigmoid(w_g x) gate on the output
    share_values: bool = False        # one value table for every memory layer, owned by the decoder
    value_lr: float = 1.0e-3          # the value table's base learning rate (the schedule still scales it)

    def validate(self, path: str) -> None:
        for key in ("heads", "k_dim", "n_keys", "knn"):
            require(getattr(self, key) >= 1, f"{path}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.k_dim % 2 == 0, f"{path}.k_dim", f"must be even (two halves of sub-keys), got {self.k_dim}")
        require(self.knn <= self.n_keys, f"{path}.knn",
                f"knn={self.knn} exceeds n_keys={self.n_keys} (each half's top-k is taken over n_keys)")
        require(self.n_keys ** 2 < 2 ** 63, f"{path}.n_keys",
                f"n_keys^2 = {self.n_keys ** 2} slots overflow the int64 slot index")
        if self.v_dim is not None:
            require(self.v_dim >= 1, f"{path}.v_dim", f"must be >= 1 or null, got {self.v_dim}")
        require(self.value_lr > 0, f"{path}.value_lr", f"must be > 0, got {self.value_lr}")


@dataclass
class ParamConfig:
    """`model.param`: the parameterization (models/parameterization.py, models/mup.py)."""

    kind: str = "sp"                  # sp | mup | completep
    base_width: int = 256             # the d_model the hyperparameters were tuned at (mup, completep)
    base_depth: int = 2               # the n_layers they were tuned at (completep)
    alpha: float | None = None        # completep depth exponent; null: 1 (0.5: depth-muP)
    input_mult: float = 1.0           # embedding multiplier (mup, completep)
    output_mult: float = 1.0          # logit multiplier, divided by the width multiplier (mup, completep)
    attn_scale: Literal["sqrt", "linear"] | None = None   # null: the kind's own (sp: sqrt, mup/completep: linear)
    eps_scope: Literal["global", "hidden"] = "global"     # completep: which groups get AdamW eps scaling

    def validate(self, path: str) -> None:
        PARAMETERIZATIONS.check(self.kind, f"{path}.kind")
        require(self.base_width >= 1, f"{path}.base_width", f"must be >= 1, got {self.base_width}")
        require(self.base_depth >= 1, f"{path}.base_depth", f"must be >= 1, got {self.base_depth}")
        if self.alpha is not None:
            require(self.kind == "completep", f"{path}.alpha",
                    f"the depth exponent applies to kind completep only (kind is {self.kind}); leave it null")
            require(self.alpha >= 0, f"{path}.alpha", f"must be >= 0, got {self.alpha}")
        for key in ("input_mult", "output_mult"):
            value = getattr(self, key)
            require(value > 0, f"{path}.{key}", f"must be > 0, got {value}")
            require(self.kind != "sp" or value == 1.0, f"{path}.{key}",
                    "applies to kind mup or completep (sp has no multipliers)")
        require(self.eps_scope == "global" or self.kind == "completep", f"{path}.eps_scope",
                "applies to kind completep only (the others do not scale AdamW's epsilon)")


@dataclass
class EntropyRegConfig:
    """`model.entropy_reg`: keep each attention head's row entropy near a learnable fraction of its
    maximum ("Entropy-Guided Attention for Private LLMs", Jha & Reagen, arXiv 2501.03489;
    models/entropy.py)."""

    weight: float = 0.0            # lambda of the `entropy_reg` loss term (0: off); ours = paper's x micro-batch x T
    margin: float = 0.2            # tolerance: no penalty while |E - theta E_max| <= margin E_max
    learn_threshold: bool = True   # theta per layer and head learnable (sigmoid, init 0.5); false: fixed 0.5

    def validate(self, path: str) -> None:
        require(self.weight >= 0, f"{path}.weight", f"must be >= 0, got {self.weight}")
        require(0.0 <= self.margin < 1.0, f"{path}.margin", f"must be in [0, 1), got {self.margin}")


@dataclass
class ModelConfig:
    d_model: int = 256                     # residual stream width
    n_layers: int = 4                      # blocks (layer indices are 0-based everywhere)
    n_heads: int = 4                       # attention heads (head dim d_model / n_heads must be even: RoPE)
    n_kv_heads: int | None = None          # null: same as n_heads (MHA)
    vocab_size: int | None = None          # null: the tokenizer's size, rounded up to a multiple of 64
    max_seq_len: int = 1024                # longest sequence: data.seq_len must fit; generation stops here
    tie_embeddings: bool = True            # the LM head reuses the token embedding matrix
    head_bias: bool = False                # a bias on the (untied) LM head; fold-norms puts a LayerNorm final bias there
    init_std: float = 0.02                 # std of normal-initialised weights (the parameterization may rescale it)
    residual_init_scaling: bool = False    # output projections get std / sqrt(2 * n_layers)
    qk_norm: bool = False                  # RMSNorm on each attention head's queries and keys
    rope_theta: float = 10000.0            # RoPE base
    doc_mask: bool = False                 # packed documents stay apart: attention masks across them, DeltaNet resets
    loss_chunk_tokens: int = 2048          # LM-head cross-entropy in chunks of this many tokens (0: one pass)
    layers: LayersConfig = field(default_factory=LayersConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    entropy_reg: EntropyRegConfig = field(default_factory=EntropyRegConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self, path: str) -> None:
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            require(getattr(self, key) >= 1, f"{path}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.d_model % self.n_heads == 0, f"{path}.n_heads",
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if self.n_kv_heads is not None:
            require(self.n_kv_heads >= 1, f"{path}.n_kv_heads", f"must be >= 1, got {self.n_kv_heads}")
            require(self.n_heads % self.n_kv_heads == 0, f"{path}.n_kv_heads",
                    f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0, f"{path}.n_heads",
                f"head dim d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.vocab_size is not None:
            require(self.vocab_size >= 2, f"{path}.vocab_size", f"must be >= 2, got {self.vocab_size}")
        require(self.init_std > 0, f"{path}.init_std", f"must be > 0, got {self.init_std}")
        require(self.rope_theta > 0, f"{path}.rope_theta", f"must be > 0, got {self.rope_theta}")
        require(not (self.residual_init_scaling and self.param.kind != "sp"), f"{path}.residual_init_scaling",
                f"applies to param.kind sp only ({self.param.kind} scales the residual branches itself)")
        require(not (self.head_bias and self.tie_embeddings), f"{path}.head_bias",
                "needs an untied head (tie_embeddings: false)")
        removal = self.norm.removal
        if removal is not None and removal.eot_token is not None and self.vocab_size is not None:
            require(removal.eot_token < self.vocab_size, f"{path}.norm.removal.eot_token",
                    f"{removal.eot_token} is outside the vocabulary (vocab_size={self.vocab_size})")
        require(self.loss_chunk_tokens >= 0, f"{path}.loss_chunk_tokens",
                f"must be >= 0 (0: no chunking), got {self.loss_chunk_tokens}")

        layers = f"{path}.layers"
        self.layers.resolve_mixers(layers)
        pattern = self.layers.pattern
        require(len(pattern) > 0, f"{layers}.pattern", "must not be empty")
        if isinstance(pattern, list):
            require(len(pattern) == self.n_layers, f"{layers}.pattern",
                    f"a list pattern needs one letter per layer: {len(pattern)} given, n_layers={self.n_layers}")
        for i, letter in enumerate(self.layers.letters(self.n_layers)):
            require(letter in self.layers.mixers, f"{layers}.pattern",
                    f"letter '{letter}' (layer {i}) has no mixer in {layers}.mixers "
                    f"(defined: {', '.join(sorted(self.layers.mixers)) or 'none'})")

        mem = f"{path}.memory.layers"
        for i, idx in enumerate(self.memory.layers):
            require(0 <= idx < self.n_layers, f"{mem}[{i}]",
                    f"layer index {idx} out of range for n_layers={self.n_layers} (0-based)")
        require(len(set(self.memory.layers)) == len(self.memory.layers), mem, "duplicate layer index")
        if self.memory.layers:
            MEMORIES.check(self.memory.kind, f"{path}.memory.kind")
        if self.entropy_reg.weight > 0:
            kinds = {self.layers.mixers[letter].kind for letter in self.layers.letters(self.n_layers)}
            require("attention" in kinds, f"{path}.entropy_reg.weight",
                    "regularises attention entropy, and no layer of the pattern is attention")


def model_config(data: dict[str, Any], path: str = "model") -> ModelConfig:
    """Build and validate a ModelConfig from a plain dict (tests and notebooks)."""
    cfg = build(ModelConfig, data, path)
    validate_tree(cfg, path)
    return cfg
