"""Fold finished removable norms into the weights that read them (LayerNorm removal's last step).

Heimersheim, "You can remove GPT2's LayerNorm by fine-tuning" (arXiv 2409.13710): once every norm
divides by one frozen std, norm(x) = x * s + b with s = g / std is linear, so a projection W
reading it becomes W' = W diag(s) with bias c' = c + W b. The head reads the final norm; with tied
embeddings it cannot stay tied (the embedding must not be rescaled), so it becomes its own matrix.

Each module that reads a norm's output names what reads it in `norm_inputs` ({"all" | "qk" | "v":
entries}); an entry is a linear submodule's name, or a (weight, bias) pair of parameter names, and
`norm_input_bias_keys` names the config key that gives an entry a bias. A LayerNorm's bias needs a
bias to go into: the folded config turns those keys on (attention's `qk_bias` / `v_bias`,
`ffn.bias`, `head_bias`), and a reader without such a key (DeltaNet's, TTT's projections) is
refused. The folded model is built from the config with `norm.block/final: none`, and
`fold_norms` checks that it gives the logits of the model it came from before returning it.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from models.norm_removal import RemovableNorm


class FoldError(ValueError):
    """A model that cannot be folded (unfinished schedule, a bias with nowhere to go)."""


def folded_config(cfg: Any) -> Any:
    """The model config of the folded model: no norms, no removal schedule, an untied head."""
    out = copy.deepcopy(cfg)
    out.norm.block = out.norm.final = "none"
    out.norm.removal = None
    out.tie_embeddings = False
    return out


def _readers(module: nn.Module, path: str, where: str) -> list[tuple[str, nn.Parameter, nn.Parameter | None]]:
    """(name, weight, bias or None) of what reads a norm's output inside `module`."""
    table = getattr(module, "norm_inputs", None)
    if table is None or path not in table:
        raise FoldError(f"{where}: {type(module).__name__} does not say which weights read its input norm "
                        f"(`norm_inputs['{path}']`), so the norm cannot be folded into it")
    out = []
    for entry in table[path]:
        if isinstance(entry, tuple):
            w, b = (module.get_parameter(n) if n is not None else None for n in entry)
            name = entry[0]
        else:
            sub = getattr(module, entry, None)
            if sub is None:                    # an optional projection that is off (no gate)
                continue
            name, w, b = entry, sub.weight, sub.bias
            if not isinstance(sub, nn.Linear) or type(sub) is not nn.Linear:
                raise FoldError(f"{where}.{entry} is a {type(sub).__name__}, not a plain nn.Linear "
                                "(a weight- or spectral-normalised matrix cannot absorb a scale)")
        out.append((f"{where}.{name}", w, b))
    return out


def _has_shift(norm: RemovableNorm) -> bool:
    """Whether the norm has a nonzero (LayerNorm) bias, which needs a bias in each reader."""
    return norm.bias is not None and bool(norm.bias.ne(0).any())


@torch.no_grad()
def _fold(norm: RemovableNorm, norm_name: str, readers: list[tuple[str, nn.Parameter, nn.Parameter | None]]) -> None:
    """Fold x * s + b (s = g / std) into every reader (W, c): W diag(s), c + W b."""
    scale = norm.weight.double() / norm.std[0].double()
    shift = norm.bias.double() if _has_shift(norm) else None
    for name, w, b in readers:
        if shift is not None:
            if b is None:
                raise FoldError(f"{norm_name} has a LayerNorm bias, and {name} has no bias to fold it into")
            b.copy_((b.double() + w.double() @ shift).to(b.dtype))
        w.copy_((w.double() * scale[None, :]).to(w.dtype))


def unfinished(model: nn.Module) -> list[str]:
    """Removable norms that are not yet one fixed scale (real, or an EOT / position-0 std left)."""
    return [name for name, m in model.named_modules() if isinstance(m, RemovableNorm) and not m.finished]


def _plan(model: nn.Module) -> list[tuple[RemovableNorm, str, str, str]]:
    """(norm, its name, the module reading it, the `norm_inputs` path) for every block norm."""
    out = []
    for i, block in enumerate(model.blocks):
        split = block.mixer_norm_v is not None
        out.append((block.mixer_norm, f"blocks.{i}.mixer_norm", f"blocks.{i}.mixer", "qk" if split else "all"))
        if split:
            out.append((block.mixer_norm_v, f"blocks.{i}.mixer_norm_v", f"blocks.{i}.mixer", "v"))
        out.append((block.ffn_norm, f"blocks.{i}.ffn_norm", f"blocks.{i}.ffn", "all"))
    return out


def _with_biases(model: nn.Module, plan: list[tuple[RemovableNorm, str, str, str]]) -> Any:
    """The folded model's config: `folded_config`, plus the bias keys (a mixer's `qk_bias` /
    `v_bias`, `ffn.bias`, `head_bias`) that a nonzero LayerNorm bias needs to fold into."""
    cfg = model.cfg
    out = folded_config(cfg)
    letters = cfg.layers.letters(cfg.n_layers)
    for norm, norm_name, where, path in plan:
        if not _has_shift(norm):
            continue
        module = model.get_submodule(where)
        for name, _, bias in _readers(module, path, where):
            if bias is not None:
                continue
            entry = name[len(where) + 1:]
            key = getattr(module, "norm_input_bias_keys", {}).get(entry)
            if key is None:
                raise FoldError(f"{norm_name} has a LayerNorm bias, and {name} has no bias to fold it into "
                                f"({type(module).__name__} has no bias option)")
            if key.startswith("ffn."):
                setattr(out.ffn, key[len("ffn."):], True)
            else:
                setattr(out.layers.mixers[letters[int(where.split(".")[1])]], key, True)
    out.head_bias = out.head_bias or _has_shift(model.final_norm)
    return out


@torch.no_grad()
def fold_norms(model: nn.Module, check_ids: torch.Tensor | None = None, tol: float = 1e-5) -> nn.Module:
    """A new Decoder without norms and with the logits of `model` (a Decoder whose removal schedule
    has finished; it is left unchanged). A nonzero LayerNorm bias turns on the bias it folds into
    (`qk_bias`, `v_bias`, `ffn.bias`, `head_bias`; the new biases start at zero). check_ids: (B, T)
    token ids for the logits check (default: two seeded random rows); the folded model must match
    within tol * max(1, max |logit|)."""
    from models.decoder import Decoder

    cfg = model.cfg
    if cfg.norm.removal is None:
        raise FoldError("the model has no model.norm.removal: there are no removable norms to fold")
    left = unfinished(model)
    if left:
        raise FoldError("the removal schedule has not finished: still real or with an EOT / position-0 std: "
                        + ", ".join(left))
    plan = _plan(model)
    like = next(model.parameters())
    out = Decoder(_with_biases(model, plan), init_seed=0).to(device=like.device, dtype=like.dtype).eval()
    mine, state = model.state_dict(), out.state_dict()
    for key, value in state.items():
        if key in mine:
            value.copy_(mine[key])
        elif key == "head.weight":                        # tied before: the head starts as the embedding
            value.copy_(model.head_weight)
        elif key.endswith(".bias"):                       # a bias the fold needs: zero, then folded into
            value.zero_()
        else:
            raise FoldError(f"the folded model has {key}, which the source model does not")
    for norm, norm_name, where, path in plan:
        _fold(norm, norm_name, _readers(out.get_submodule(where), path, where))
    _fold(model.final_norm, "final_norm", [("head", out.head.weight, out.head.bias)])

    if check_ids is None:
        g = torch.Generator().manual_seed(0)
        check_ids = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=g).to(like.device)
    was_training = model.training
    want, got = model.eval()(check_ids).logits, out(check_ids).logits
    model.train(was_training)
    err = (want - got).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    if not err <= bound:
        raise FoldError(f"folding changed the logits by {err:.3g} (allowed {bound:.3g}): a module reads its "
                        "input norm other than through its `norm_inputs` (or a LayerNorm bias meets a "
                        "convolution)")
    return out
