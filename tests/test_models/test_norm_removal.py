"""LayerNorm removal by fine-tuning (models/norm_removal.py, models/norm_fold.py), model side:
a fake norm with the measured std equals the real norm on that batch (float64); EOT tokens and
position 0 keep their own std until their switch; folding preserves the logits (float64 and
fp32) for attention, DeltaNet and TTT layers, tied heads included; the refusals; the auxiliary
residual-std loss against a hand computation; the schedule's steps."""
from __future__ import annotations

import copy

import pytest
import torch

import models
from models.config import RemovalConfig, model_config
from models.norm_fold import FoldError, fold_norms
from models.norm_removal import BOS, EOT, ORDINARY, RemovableNorm, position_kinds, removal_schedule
from models.registry import ConfigError

BASE = {"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "max_seq_len": 32}
EOT_ID = 3


def _rows_with_std(B: int, T: int, d: int, std: float, centred: bool) -> torch.Tensor:
    """Rows whose per-token divisor is the same (RMS, or std after centring, equal to `std`)."""
    x = torch.randn(B, T, d, dtype=torch.float64)
    if centred:
        x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * std


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_fake_norm_with_the_measured_std_equals_the_real_norm(kind):
    torch.manual_seed(0)
    eps = 1e-6
    norm = RemovableNorm(kind, 8, eps).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
        if norm.bias is not None:
            norm.bias.copy_(torch.randn(8))
    x = _rows_with_std(2, 5, 8, 3.7, centred=True)   # centred: the fake LayerNorm subtracts no mean
    norm.train()
    real = norm(x)
    std = norm.freeze(norm.stats)
    torch.testing.assert_close(std, torch.full((3,), (3.7 ** 2 + eps) ** 0.5, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    for s in (EOT, BOS):
        norm.end_special(s)
    torch.testing.assert_close(norm(x), real, rtol=1e-12, atol=1e-12)
    # the frozen divisor as a per-token tensor: the fake form equals the real norm on any batch
    y = torch.randn(2, 5, 8, dtype=torch.float64)
    y = y - y.mean(-1, keepdim=True) if kind == "layernorm" else y
    divisor = y.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    fake = y / divisor * norm.weight + (norm.bias if norm.bias is not None else 0)
    norm.fake.fill_(False)
    torch.testing.assert_close(fake, norm(y), rtol=1e-12, atol=1e-12)


def test_a_non_finite_batch_cannot_be_frozen():
    norm = RemovableNorm("rmsnorm", 4, 1e-6)
    with pytest.raises(RuntimeError, match="non-finite"):
        norm.freeze(torch.tensor([[float("nan"), 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64))
    assert not bool(norm.fake)


def test_fake_layernorm_subtracts_no_mean():
    norm = RemovableNorm("layernorm", 4, 1e-6).double()
    norm.freeze(torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]], dtype=torch.float64)
    torch.testing.assert_close(norm(x), x / 2.0, rtol=0, atol=1e-15)


def test_eot_and_first_positions_keep_their_own_std_until_their_switch():
    norm = RemovableNorm("rmsnorm", 4, 1e-6).double()
    norm.freeze(torch.tensor([[2.0, 12.0, 5.0], [1.0, 3.0, 1.0]], dtype=torch.float64))   # stds 2, 4, 5
    assert torch.equal(norm.std, torch.tensor([2.0, 4.0, 5.0]))
    ids = torch.tensor([[7, 9, EOT_ID, 9]])
    kinds = position_kinds(ids, 0, None, EOT_ID)
    assert kinds.tolist() == [[BOS, ORDINARY, EOT, ORDINARY]]
    x = torch.ones(1, 4, 4, dtype=torch.float64)
    assert norm(x, kinds)[0, :, 0].tolist() == [1 / 5, 1 / 2, 1 / 4, 1 / 2]
    norm.end_special(EOT)
    assert norm(x, kinds)[0, :, 0].tolist() == [1 / 5, 1 / 2, 1 / 2, 1 / 2]
    norm.end_special(BOS)
    assert norm.finished and norm(x, kinds)[0, :, 0].tolist() == [1 / 2] * 4


def test_position_kinds_follow_decoding_and_left_padding():
    ids = torch.tensor([[EOT_ID, 5, 6], [1, EOT_ID, 2]])
    assert position_kinds(ids, 4, None, EOT_ID).tolist() == [[EOT, 0, 0], [0, EOT, 0]]   # a later chunk: no BOS
    assert position_kinds(ids, 0, None, None).tolist() == [[BOS, 0, 0], [BOS, 0, 0]]
    pad = torch.tensor([[False, True, True], [True, True, True]])
    assert position_kinds(ids, 0, pad, EOT_ID).tolist() == [[EOT, BOS, 0], [BOS, EOT, 0]]


def _finished(cfg_over: dict, seed: int = 0, dtype=torch.float64) -> models.Decoder:
    """A removal model with perturbed gains, every norm frozen on a batch and both special cases
    ended."""
    cfg = model_config({**copy.deepcopy(BASE), **copy.deepcopy(cfg_over)})
    torch.manual_seed(seed)
    model = models.Decoder(cfg, init_seed=seed).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RemovableNorm):
                m.weight.mul_(1 + 0.3 * torch.randn_like(m.weight))
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    ids[:, 5] = EOT_ID
    model(ids, labels=ids)
    for m in model.modules():
        if isinstance(m, RemovableNorm):
            m.freeze(m.stats)
            m.end_special(EOT)
            m.end_special(BOS)
    return model.eval()


REMOVAL = {"eot_token": EOT_ID}
ARCHS = {
    "attention": {},
    "attention+qk_norm+untied": {"qk_norm": True, "tie_embeddings": False},
    "deltanet": {"layers": {"pattern": "AD", "mixers": {"A": {"kind": "attention"}, "D": {"kind": "deltanet"}}}},
    "ttt_linear+pre_conv": {"layers": {"pattern": "T", "mixers": {"T": {"kind": "ttt_linear", "mini_batch_size": 4,
                                                                       "pre_conv": True}}}},
    "memory": {"memory": {"layers": [1], "heads": 2, "k_dim": 8, "n_keys": 8, "knn": 2, "gated": True}},
    "mlp+layernorm": {"ffn": {"kind": "mlp", "activation": "gelu"}, "norm": {"block": "layernorm",
                                                                              "final": "layernorm"}},
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_folding_preserves_the_logits(arch):
    over = copy.deepcopy(ARCHS[arch])
    over.setdefault("norm", {}).update(removal=REMOVAL)
    model = _finished(over)
    ids = torch.randint(0, 64, (3, 20))
    ids[0, 0], ids[1, 7] = EOT_ID, EOT_ID
    folded = fold_norms(model)
    assert not any(isinstance(m, RemovableNorm) for m in folded.modules())
    assert folded.cfg.norm.block == folded.cfg.norm.final == "none" and folded.head is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    # fp32 (the bound): the same model in float32 folds within 1e-5
    model32 = model.float()
    folded32 = fold_norms(model32)
    with torch.no_grad():
        torch.testing.assert_close(folded32(ids).logits, model32(ids).logits, rtol=1e-5, atol=1e-5)


def test_fold_refuses_unfinished_schedules_and_unfoldable_readers():
    cfg = model_config({**BASE, "norm": {"removal": REMOVAL}})
    with pytest.raises(FoldError, match="has not finished"):
        fold_norms(models.Decoder(cfg))
    with pytest.raises(FoldError, match="no model.norm.removal"):
        fold_norms(models.Decoder(model_config(BASE)))
    model = _finished({"norm": {"block": "layernorm", "final": "layernorm", "removal": REMOVAL},
                       "layers": {"pattern": "AD", "mixers": {"A": {"kind": "attention"}, "D": {"kind": "deltanet"}}}})
    with torch.no_grad():
        model.blocks[1].mixer_norm.bias.add_(0.1)
    with pytest.raises(FoldError, match=r"blocks.1.mixer_norm has a LayerNorm bias.*blocks.1.mixer.wq has no bias.*"
                                        r"DeltaNet has no bias option"):
        fold_norms(model)
    model = _finished({"norm": {"removal": REMOVAL}, "ffn": {"weight_norm": "weight"}})
    with pytest.raises(FoldError, match="not a plain nn.Linear"):
        fold_norms(model)


def test_layernorm_biases_fold_into_biases_the_folded_model_turns_on():
    """Trained LayerNorm biases are nonzero everywhere: the folded config gains q/k/v, FFN and head
    biases where there were none (and keeps the ones there were), with the same logits."""
    for qk_bias in (False, True):
        model = _finished({"norm": {"block": "layernorm", "final": "layernorm", "removal": REMOVAL},
                           "layers": {"mixers": {"A": {"kind": "attention", "qk_bias": qk_bias}}}})
        torch.manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, RemovableNorm):
                    m.bias.copy_(0.2 * torch.randn_like(m.bias))
            if qk_bias:
                model.blocks[0].mixer.wq.bias.add_(0.3)
        folded = fold_norms(model)
        mixer = folded.cfg.layers.mixers["A"]
        assert mixer.qk_bias and mixer.v_bias and folded.cfg.ffn.bias and folded.cfg.head_bias
        ids = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(folded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
        # training through the head bias: the chunked loss equals the logits' cross-entropy
        labels = torch.randint(0, 64, (2, 12))
        folded.cfg.loss_chunk_tokens = 8
        ce = folded(ids, labels=labels).losses["ce"].value
        want = torch.nn.functional.cross_entropy(folded(ids).logits.flatten(0, 1), labels.flatten(), reduction="sum")
        torch.testing.assert_close(ce, want, rtol=1e-12, atol=1e-12)


def test_auxiliary_residual_std_loss_matches_a_hand_computation():
    cfg = model_config({**BASE, "norm": {"removal": {**REMOVAL, "aux_loss_weight": 0.5}}})
    model = models.Decoder(cfg, init_seed=0).double().train()
    captured = {}
    model.final_norm.register_forward_pre_hook(lambda m, args: captured.update(h=args[0].detach()))
    ids = torch.randint(0, 64, (2, 10))
    ids[1, 4] = EOT_ID
    out = model(ids, labels=ids)
    h = captured["h"]
    std = (h.var(-1, unbiased=False) + 1e-5).sqrt()
    ordinary = torch.ones_like(std, dtype=torch.bool)
    ordinary[:, 0] = False
    ordinary[1, 4] = False
    want = 0.5 * (std - std[ordinary].mean()).pow(2).mean()
    term = out.losses["ln_aux"]
    assert term.reduction == "mean"
    torch.testing.assert_close(term.value, want, rtol=1e-12, atol=0)
    term.value.backward()
    assert model.embed.weight.grad.abs().sum() > 0          # it reaches the residual stream
    assert "ln_aux" not in model.eval()(ids, labels=ids).losses
    model0 = models.Decoder(model_config({**BASE, "norm": {"removal": REMOVAL}})).train()
    assert "ln_aux" not in model0(ids, labels=ids).losses


def test_the_schedule_is_the_follow_up_codes_order():
    sched = removal_schedule(RemovalConfig(), 12)          # GPT-2 small: 12 layers, the defaults
    steps = {(s.group, s.layer): s.step for s in sched}
    assert [steps[("ffn", i)] for i in range(12)] == list(range(20, 44, 2))
    assert [steps[("qk", i)] for i in range(12)] == list(range(44, 68, 2))
    assert [steps[("v", i)] for i in range(12)] == list(range(68, 104, 3))
    assert (steps[("final", None)], steps[("eot", None)], steps[("bos", None)]) == (103, 105, 115)
    assert [s.step for s in sched] == sorted(s.step for s in sched)


def test_removal_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        model_config({**BASE, "norm": {"block": "dyt", "final": "rmsnorm", "removal": {}}})
    assert e.value.key == "model.norm.removal" and "dyt" in e.value.message
    with pytest.raises(ConfigError) as e:
        model_config({**BASE, "norm": {"removal": {"start_step": 0}}})
    assert e.value.key == "model.norm.removal.start_step"
    with pytest.raises(ConfigError) as e:
        model_config({**BASE, "norm": {"removal": {"gap_v": -1}}})
    assert e.value.key == "model.norm.removal.gap_v"
