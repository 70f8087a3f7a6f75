"""Decoding: the cached greedy path equals step-by-step argmax over full forwards."""
from __future__ import annotations

import torch

import models
from models.config import model_config
from train.generate import generate, generate_from_run


def test_greedy_generation_equals_full_forward_argmax():
    torch.manual_seed(0)
    cfg = model_config({"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 50,
                        "layers": {"pattern": "AS", "mixers": {"A": {"kind": "attention"},
                                                               "S": {"kind": "attention", "window": 4}}}})
    model = models.Decoder(cfg).double().eval()
    prompt = torch.randint(0, 50, (2, 5))
    out = generate(model, prompt, max_new_tokens=12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = model(ids).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_generate_from_run(finished_run):
    text = generate_from_run(finished_run, "def ", max_new_tokens=10, temperature=0.8, top_k=20, seed=1)
    assert text.startswith("def ") and len(text) > 4
    again = generate_from_run(finished_run, "def ", max_new_tokens=10, temperature=0.8, top_k=20, seed=1)
    assert text == again
