"""Fold finished removable norms into the weights that read them (LayerNorm removal's last step).

Heimersheim, "You can remove GPT2's LayerNorm by fine-tuning" (arXiv 2409.13710): once every norm
divides by one frozen std, norm(x) = x * s + b with s = g / std is linear, so a projection W
reading it becomes W' = W diag(s) with bias c' = c + W b. The head reads the final norm; with tied
embeddings it cannot stay tied (the embedding must not be rescaled), so it becomes its own matrix.

Each module that reads a norm's output names what reads it in `norm_inputs` ({"all" | "qk" | "v":
entries}); an entry is a linear submodule's name, or a (weight, bias) pair of parameter names. A
folded model is built from the config with `norm.block/final: none`, and `fold_norms` checks that
it gives the logits of the model it came from before returning it.
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


@torch.no_grad()
def _fold(norm: RemovableNorm, norm_name: str, readers: list[tuple[str, nn.Parameter, nn.Parameter | None]]) -> None:
    scale = norm.weight.double() / norm.std[0].double()
    shift = norm.bias.double() if norm.bias is not None else None
    for name, w, b in readers:
        if shift is not None and bool(shift.ne(0).any()):
            if b is None:
                raise FoldError(f"{norm_name} has a LayerNorm bias, and {name} has no bias to fold it into "
                                "(train with model.ffn.bias / qk_bias, or remove RMSNorm norms)")
            b.copy_((b.double() + w.double() @ shift).to(b.dtype))
        w.copy_((w.double() * scale[None, :]).to(w.dtype))


def unfinished(model: nn.Module) -> list[str]:
    """Removable norms that are not yet one fixed scale (real, or an EOT / position-0 std left)."""
    return [name for name, m in model.named_modules() if isinstance(m, RemovableNorm) and not m.finished]


@torch.no_grad()
def fold_norms(model: nn.Module, check_ids: torch.Tensor | None = None, tol: float = 1e-5) -> nn.Module:
    """A new Decoder without norms and with the logits of `model` (a Decoder whose removal schedule
    has finished; it is left unchanged). check_ids: (B, T) token ids for the logits check (default:
    two seeded random rows); the folded model must match within tol * max(1, max |logit|)."""
    from models.decoder import Decoder

    cfg = model.cfg
    if cfg.norm.removal is None:
        raise FoldError("the model has no model.norm.removal: there are no removable norms to fold")
    left = unfinished(model)
    if left:
        raise FoldError("the removal schedule has not finished: still real or with an EOT / position-0 std: "
                        + ", ".join(left))
    work = copy.deepcopy(model).eval()
    for i, block in enumerate(work.blocks):
        where = f"blocks.{i}"
        split = block.mixer_norm_v is not None
        _fold(block.mixer_norm, f"{where}.mixer_norm", _readers(block.mixer, "qk" if split else "all", f"{where}.mixer"))
        if split:
            _fold(block.mixer_norm_v, f"{where}.mixer_norm_v", _readers(block.mixer, "v", f"{where}.mixer"))
        _fold(block.ffn_norm, f"{where}.ffn_norm", _readers(block.ffn, "all", f"{where}.ffn"))
    head = nn.Parameter(work.head_weight.detach().clone())
    _fold(work.final_norm, "final_norm", [("head", head, None)])

    like = next(model.parameters())
    out = Decoder(folded_config(cfg), init_seed=0).to(device=like.device, dtype=like.dtype).eval()
    mine = work.state_dict()
    state = {}
    for key in out.state_dict():
        if key == "head.weight":
            state[key] = head.detach()
        elif key in mine:
            state[key] = mine[key]
        else:
            raise FoldError(f"the folded model has {key}, which the source model does not")
    out.load_state_dict(state, strict=True)

    if check_ids is None:
        g = torch.Generator().manual_seed(0)
        check_ids = torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=g)
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
