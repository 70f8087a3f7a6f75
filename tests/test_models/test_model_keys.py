"""Every `model:` config key must do something.

A key that parses, validates and then changes nothing is worse than no key: an ablation that
sets it measures noise and reports an effect of zero. This file walks the whole ModelConfig
tree by introspection (`dataclasses.fields`, recursively: `layers`, `ffn`, `ffn.stochastic`,
`norm`, `memory`, `param`, and each registered mixer kind's own config dataclass), sets each
key to another valid value, one key at a time, on a tiny base model, and checks that the
parameter set (state_dict names / shapes) or the float64 logits on a fixed batch change.

Later issues inherit it: a new key fails `test_every_key_is_tested_or_allow_listed` until it
gets either
- a value to try: derived automatically for bools, Literals and registry-backed names (see
  `REGISTRY_CHOICES`), else an entry in `VALUES` (a value, a dict of overrides, a `Case`, a
  list of those, or a function returning a list of Cases); or
- a reason in `ALLOW_LIST` (speed / memory only, or read outside the model), or in
  `UNTIL_TESTABLE` (nothing registered can exercise it yet: the key is tested as soon as a
  value can be derived, e.g. once a second parameterization or a memory layer is registered).

Mixer keys are named by kind, not by letter (the letter is the user's choice):
`layers.mixers[attention].window` is tested as `layers.mixers.A.window` with letter A of that kind.

Each model is run as the trainer runs it at the last step of a 10-step run
(`train.callbacks.activation_schedule.apply_activation_schedule`, so `ffn.relu_finetune_frac` is exercised),
in train mode and in eval mode (so `ffn.stochastic.eval_mode` is), with two documents per row
(so `doc_mask` is).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Literal, Union

import pytest
import torch

import models
from models.config import ModelConfig, ParamConfig, model_config
from models.ffn import GLU_GATES
from models.registry import ACTIVATIONS, FFNS, MEMORIES, MIXERS, NORMS, PARAMETERIZATIONS, ConfigError
from models.schema import optional_section
from train.callbacks.activation_schedule import apply_activation_schedule

# ----------------------------------------------------------------------------- the base model
BASE: dict[str, Any] = {
    "d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32,
    # explicit, so that overrides such as `layers.mixers.B` add a letter instead of replacing the default
    "layers": {"pattern": "A", "mixers": {"A": {"kind": "attention"}}},
}
B, T = 2, 12
TRAIN_STEPS = 10          # models are run at the last step of a run this long (the activation schedule)
MIXER_LETTER = "A"        # mixer keys are tested on this letter
MIXERS_PATH = "layers.mixers"
MIXER_KIND_KEY = "layers.mixers.*.kind"


@dataclass(frozen=True)
class Case:
    """One way to exercise a key. `set`: overrides applied to the variant only (the key itself,
    plus co-requisites that are invalid without it, e.g. `ffn.activation: identity` for
    `ffn.kind: fused_linear`). `context`: overrides applied to both the reference and the
    variant (what makes the key act at all, e.g. `ffn.activation: stochastic` for `ffn.stochastic.p`)."""

    set: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)


def _with_each_other_param_kind(key: str, value: Any, context: dict[str, Any] | None = None
                                ) -> Callable[[], list[Case]]:
    """`param.*` knobs that `sp` ignores by design: try them under every other registered
    parameterization (none yet: then `UNTIL_TESTABLE` applies), with `context` on both sides."""
    extra = context or {}

    def cases() -> list[Case]:
        default = ParamConfig().kind
        return [Case({key: value}, context={"param.kind": kind, **extra}) for kind in PARAMETERIZATIONS.names()
                if kind != default]
    return cases


def _memory_layers_cases() -> list[Case]:
    return [Case({"memory.layers": [1]}, context={"memory.kind": kind}) for kind in MEMORIES.names()]


# Values to try where none can be derived from the type (ints, floats, free strings, containers,
# or combinations that need co-requisites). Keys are dotted keys as enumerated; the paths inside
# a dict / Case are config paths.
VALUES: dict[str, Any] = {
    "d_model": 64,
    "n_layers": 3,
    "n_heads": 2,                       # same shapes under MHA (H * Dh = d): the logits must change
    "n_kv_heads": 2,
    "vocab_size": 128,
    "init_std": 0.05,
    "rope_theta": 100.0,
    "layers.pattern": [
        Case({"layers.pattern": "AB"}, context={"layers.mixers.B": {"kind": "attention", "window": 4}}),
        Case({"layers.pattern": ["A", "B"]}, context={"layers.mixers.B": {"kind": "attention", "window": 4}}),
    ],
    "layers.mixers[attention].window": 4,
    "doc_mask": [Case({"doc_mask": True}),                                   # attention's mask, DeltaNet's resets
                 Case({"doc_mask": True}, context={"layers.mixers.A": {"kind": "deltanet"}})],
    "layers.mixers[deltanet].n_heads": 2,        # head dim 16: q/k/v keep their shapes, beta's does not
    "layers.mixers[deltanet].head_dim": 4,
    "layers.mixers[deltanet].conv_size": 2,
    **{f"layers.mixers[{kind}].{key}": value for kind in ("ttt_linear", "ttt_mlp") for key, value in (
        ("n_heads", 2), ("mini_batch_size", 4), ("base_lr", 0.5),      # T = 12: b = 4 makes 3 mini-batches
        ("base_lr_warmup_start", Case({"layers.mixers.A.base_lr_warmup_start": 0.5},    # step 9 of a 100-step ramp
                                      context={"layers.mixers.A.base_lr_warmup_steps": 100})),
        ("conv_size", Case({"layers.mixers.A.conv_size": 2}, context={"layers.mixers.A.pre_conv": True})))},
    "layers.mixers[ttt_linear].base_lr_warmup_steps": 100,     # at step 9: base_lr 0.1 instead of 1
    "layers.mixers[ttt_mlp].base_lr_warmup_steps": 0,          # no ramp: base_lr 0.1 instead of 0.0117 at step 9
    "ffn.kind": [
        {"ffn.kind": "mlp", "ffn.activation": "gelu"},
        {"ffn.kind": "fused_linear", "ffn.activation": "identity"},
    ],
    "ffn.hidden": 96,
    "ffn.multiple_of": 32,              # auto GLU width at d=32: 128 with 64, 96 with 32
    "ffn.stochastic.p": 0.3,
    "ffn.stochastic.seed": 1,
    "ffn.relu_finetune_frac": 0.5,      # ReLU from step 5 of 10: the models run at step 9
    "norm.eps": 1.0e-2,
    "memory.layers": _memory_layers_cases,
    "memory.heads": 4,
    "memory.k_dim": 8,
    "memory.n_keys": 16,
    "memory.knn": 2,
    "memory.v_dim": 24,
    "param.base_width": _with_each_other_param_kind("param.base_width", 64),
    # depth is scaled by completep only (muP ignores base_depth by design)
    "param.base_depth": Case({"param.base_depth": 4}, context={"param.kind": "completep"}),
    # CompleteP scales by (base_depth / n_layers)^alpha: with base_depth = n_layers = 2 alpha cannot show
    "param.alpha": Case({"param.alpha": 0.5}, context={"param.kind": "completep", "param.base_depth": 4}),
    "param.input_mult": _with_each_other_param_kind("param.input_mult", 2.0),
    # null is the kind's own: sqrt under sp, linear under mup / completep; try the other one under each
    "param.attn_scale": [Case({"param.attn_scale": "linear"}),
                         Case({"param.attn_scale": "sqrt"}, context={"param.kind": "mup"})],
    "param.output_mult": _with_each_other_param_kind("param.output_mult", 2.0),
    "entropy_reg.weight": 1.0e-3,        # adds the learnable thresholds
    "entropy_reg.learn_threshold": Case({"entropy_reg.learn_threshold": False}, context={"entropy_reg.weight": 1.0e-3}),
    "norm.removal": Case({"norm.removal": {}}),       # removable norms: their switch buffers, the v-path copy
    "head_bias": Case({"head_bias": True}, context={"tie_embeddings": False}),     # a bias needs an untied head
}

# Overrides applied to both sides for every key with this prefix (what makes the key act at all).
SMALL_MEMORY = {"memory.heads": 2, "memory.k_dim": 16, "memory.n_keys": 8, "memory.knn": 4}   # 64 slots, not 1M
MEMORY_IN_LAYER_1 = {"memory.layers": [1], **SMALL_MEMORY}   # memory knobs only matter where a layer uses memory
CONTEXT_BY_PREFIX: dict[str, dict[str, Any]] = {
    "ffn.stochastic.": {"ffn.activation": "stochastic"},   # StochA's knobs act only when it is the activation
    "memory.layers": SMALL_MEMORY,
    **{f"memory.{k}": MEMORY_IN_LAYER_1 for k in ("kind", "heads", "k_dim", "n_keys", "knn", "v_dim", "qk_norm",
                                                  "gated", "share_values")},
}

# Registry-backed string keys: every other registered name that is valid (in the key's context)
# is tried. ffn.activation: the names `ffn.kind` accepts (GLU variants under glu).
REGISTRY_CHOICES: dict[str, Callable[[], list[str]]] = {
    "ffn.kind": FFNS.names,
    "ffn.activation": lambda: sorted(set(ACTIVATIONS.names()) | set(GLU_GATES)),
    "norm.block": NORMS.names,
    "norm.final": NORMS.names,
    "param.kind": PARAMETERIZATIONS.names,
    "memory.kind": MEMORIES.names,
    MIXER_KIND_KEY: MIXERS.names,
}

# Keys that are not meant to change a fresh model's parameters or logits.
ALLOW_LIST: dict[str, str] = {
    "loss_chunk_tokens": "chunking changes memory, not values: checked in test_chunked_loss",
    "entropy_reg.margin": "the regulariser's tolerance changes the training loss only: checked in test_entropy",
    "memory.value_lr": "the value table's base learning rate: the optimizer, not the model (checked in "
                       "test_memory)",
    "param.eps_scope": "which optimizer groups get CompleteP's epsilon scaling: the optimizer, not the model "
                       "(checked in test_parameterizations)",
    "layers.mixers[deltanet].chunk_size": "the chunk length of the chunkwise form: the same function (equal to "
                                          "the recurrence in float64 at 1e-10, test_deltanet), a speed knob",
    **{f"layers.mixers[{kind}].scan_checkpoint_group": "checkpointing the scan changes memory, not values "
       "(same loss and gradients, test_ttt)" for kind in ("ttt_linear", "ttt_mlp")},
    "layers.mixers[deltanet].backend": "which kernel computes the same function (fla's, compared with the "
                                       "PyTorch path at bf16 tolerances in test_deltanet on CUDA)",
    **{f"norm.removal.{key}": "a step of the removal schedule: it changes when norms switch during training, "
       "not a fresh model (checked in test_norm_removal)"
       for key in ("start_step", "gap_ffn", "gap_qk", "gap_v", "final_after", "eot_after", "bos_after")},
    "norm.removal.aux_loss_weight": "weights the `ln_aux` training loss term, not the logits (checked in "
                                    "test_norm_removal)",
    "norm.removal.eot_token": "which token takes the EOT std once a norm is fake; a fresh model's norms are all "
                              "real (checked in test_norm_removal)",
    "max_seq_len": "a length limit, not part of the function: RoPE tables are built to it and grow on demand "
                   "with identical per-position values (models/rope.py); it bounds data.seq_len "
                   "(train/config.py), decoding (train/generate.py) and eval contexts (eval/adapter.py)",
}

# Keys nothing registered can exercise yet. Used only while no value can be derived for the key:
# once one can (a second parameterization, a memory layer, a second mixer kind), the key is tested.
UNTIL_TESTABLE: dict[str, str] = {
    "memory.kind": "needs two registered memory layers to compare (one registered: product_key)",
}


# ----------------------------------------------------------------------------- enumeration
@dataclass(frozen=True)
class Leaf:
    key: str                  # the name reported (mixer keys by kind: layers.mixers[attention].window)
    path: str                 # the config path it is set at (layers.mixers.A.window)
    annotation: Any
    context: tuple = ()       # (path, value) pairs that put the key in place (the mixer kind)


def _leaves(cls: type, key_prefix: str = "", path_prefix: str = "", context: tuple = (),
            skip: tuple[str, ...] = ()) -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        key, path, tp = key_prefix + f.name, path_prefix + f.name, hints[f.name]
        if path == MIXERS_PATH:
            out.append(Leaf(MIXER_KIND_KEY, f"{MIXERS_PATH}.{MIXER_LETTER}.kind", str))
            for kind in MIXERS.names():
                mixer_cls = MIXERS.config_class(kind)
                if mixer_cls is not None:
                    ctx = ((f"{MIXERS_PATH}.{MIXER_LETTER}", {"kind": kind}),)
                    out += _leaves(mixer_cls, f"{MIXERS_PATH}[{kind}].", f"{MIXERS_PATH}.{MIXER_LETTER}.",
                                   ctx, skip=("kind",))
        elif dataclasses.is_dataclass(tp):
            out += _leaves(tp, key + ".", path + ".", context)
        elif (section := optional_section(tp)) is not None:
            # an optional section (`norm.removal`): the section itself is a key (null vs on), and its
            # keys are enumerated with it switched on ({}: its defaults) on both sides
            out.append(Leaf(key, path, tp, context))
            out += _leaves(section, key + ".", path + ".", context + ((path, {}),))
        else:
            out.append(Leaf(key, path, tp, context))
    return out


LEAVES = _leaves(ModelConfig)
KEYS = [leaf.key for leaf in LEAVES]


# ----------------------------------------------------------------------------- building
def _apply(data: dict, overrides: dict[str, Any]) -> dict:
    data = copy.deepcopy(data)
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return data


def _config(overrides: dict[str, Any]) -> ModelConfig:
    return model_config(_apply(BASE, overrides))


def _valid(overrides: dict[str, Any]) -> bool:
    try:
        _config(overrides)
    except ConfigError:
        return False
    return True


def _lookup(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def _context_for(leaf: Leaf) -> dict[str, Any]:
    ctx = dict(leaf.context)
    for prefix, extra in CONTEXT_BY_PREFIX.items():
        if leaf.key.startswith(prefix):
            ctx.update(extra)
    return ctx


def _members(tp: Any) -> list[Any]:
    return [a for a in typing.get_args(tp)] if typing.get_origin(tp) in (Union, types.UnionType) else [tp]


def _derived(leaf: Leaf, context: dict[str, Any]) -> list[Case]:
    """Other values from the type: bool -> not the reference's; Literal -> each other choice;
    a registry-backed name -> each other registered name valid in the context."""
    if leaf.key in REGISTRY_CHOICES:
        names = [n for n in REGISTRY_CHOICES[leaf.key]() if _valid({**context, leaf.path: n})]
        if not _valid(context):                 # the default itself is unregistered: compare to the first
            if len(names) < 2:
                return []
            context = {**context, leaf.path: names[0]}
        ref = _lookup(_config(context), leaf.path)
        return [Case({leaf.path: n}, context) for n in names if n != ref]
    if not _valid(context):
        return []
    ref = _lookup(_config(context), leaf.path)
    values: list[Any] = []
    for member in _members(leaf.annotation):
        if member is bool:
            values.append(not ref)
        elif typing.get_origin(member) is Literal:
            values += [c for c in typing.get_args(member) if c != ref]
    return [Case({leaf.path: v}, context) for v in values]


def _normalize(leaf: Leaf, entry: Any, context: dict[str, Any]) -> list[Case]:
    if callable(entry) and not isinstance(entry, (Case, dict, list)):
        entry = entry()
    if isinstance(entry, list):
        return [c for e in entry for c in _normalize(leaf, e, context)]
    if isinstance(entry, Case):
        case = Case(entry.set, {**context, **entry.context})
    elif isinstance(entry, dict):
        case = Case(entry, context)
    else:
        case = Case({leaf.path: entry}, context)
    assert leaf.path in case.set, f"VALUES['{leaf.key}'] must set {leaf.path} itself, got {case.set}"
    return [case]


def cases_for(leaf: Leaf) -> list[Case]:
    context = _context_for(leaf)
    if leaf.key in VALUES:
        return _normalize(leaf, VALUES[leaf.key], context)
    return _derived(leaf, context)


CASES = {leaf.key: ([] if leaf.key in ALLOW_LIST else cases_for(leaf)) for leaf in LEAVES}


def _case_id(leaf: Leaf, case: Case) -> str:
    """`key=value`, then any co-requisites as `+path=value`."""
    others = "".join(f"+{p}={v}" for p, v in case.set.items() if p != leaf.path)
    return f"{leaf.key}={case.set[leaf.path]}{others}".replace(" ", "")


PARAMS = [pytest.param(leaf.key, case, id=_case_id(leaf, case)) for leaf in LEAVES for case in CASES[leaf.key]]


# ----------------------------------------------------------------------------- running
def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, BASE["vocab_size"], (B, T), generator=g)
    doc_ids = torch.tensor([[0] * 6 + [1] * 6, [0] * 4 + [1] * 8])    # two documents per row
    sample_index = torch.arange(B)
    return ids, doc_ids, sample_index


_FINGERPRINTS: dict[str, tuple[dict[str, tuple[int, ...]], torch.Tensor]] = {}


def fingerprint(overrides: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
    """(state_dict name -> shape, logits in train mode and eval mode stacked) of a fresh model."""
    memo = repr(sorted(overrides.items(), key=lambda kv: kv[0]))
    if memo not in _FINGERPRINTS:
        cfg = _config(overrides)
        torch.manual_seed(0)
        model = models.Decoder(cfg).double()
        run_cfg = SimpleNamespace(train=SimpleNamespace(steps=TRAIN_STEPS), model=cfg)
        apply_activation_schedule(model, TRAIN_STEPS - 1, run_cfg)
        ids, doc_ids, sample_index = _batch()
        logits = []
        with torch.no_grad():
            for train in (True, False):
                model.train(train)
                out = model(ids, doc_ids=doc_ids, sample_index=sample_index)
                logits.append(out.logits)
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        _FINGERPRINTS[memo] = (shapes, torch.stack(logits))
    return _FINGERPRINTS[memo]


def _same(a: tuple, b: tuple) -> bool:
    (shapes_a, logits_a), (shapes_b, logits_b) = a, b
    return shapes_a == shapes_b and torch.allclose(logits_a, logits_b, rtol=0.0, atol=1e-10)


# ----------------------------------------------------------------------------- tests
def test_every_key_is_tested_or_allow_listed():
    keys = set(KEYS)
    for table in ("VALUES", "CONTEXT_BY_PREFIX", "REGISTRY_CHOICES", "ALLOW_LIST", "UNTIL_TESTABLE"):
        entries = globals()[table]
        if table == "CONTEXT_BY_PREFIX":
            stale = [p for p in entries if not any(k.startswith(p) for k in keys)]
        else:
            stale = [k for k in entries if k not in keys]
        assert not stale, f"{table} names keys that no longer exist: {stale} (enumerated: {sorted(keys)})"
    both = sorted(set(ALLOW_LIST) & (set(VALUES) | set(UNTIL_TESTABLE)))
    assert not both, f"{both}: allow-listed and also given a value / conditional reason; pick one"
    missing = [k for k in KEYS if not CASES[k] and k not in ALLOW_LIST and k not in UNTIL_TESTABLE]
    assert not missing, (
        f"config key(s) {missing} are neither tested nor allow-listed: add a non-default value to VALUES "
        f"in tests/test_models/test_model_keys.py (a value, or a dict of overrides with its companion keys), or an "
        f"ALLOW_LIST reason if the key is not meant to change a fresh model's parameters or logits")


def test_reference_is_deterministic():
    """Two builds of the same config agree exactly, so any difference below comes from the key."""
    a = fingerprint({})
    _FINGERPRINTS.clear()
    assert _same(a, fingerprint({}))


@pytest.mark.parametrize("key, case", PARAMS)
def test_key_changes_the_model(key: str, case: Case):
    reference = fingerprint(case.context)
    variant = fingerprint({**case.context, **case.set})
    assert not _same(reference, variant), (
        f"model.{key}: setting {case.set} (context {case.context}) changes neither the parameter set nor the "
        f"logits: the key does nothing. Fix the code that should read it, or, if it is only meant to change "
        f"speed / memory, give it an ALLOW_LIST reason")
