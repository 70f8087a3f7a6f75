"""Loads Hugging Face exports where this repo cannot be imported and compares them with what the
test computed with our own code (tests/test_eval/test_export.py). One process for every check.

    python tests/hf_export_check.py SPEC.json REPORT.json

Run from a working directory outside the repo. The repo's editable install (a meta-path finder
that maps `models`, `train`, `eval` to it) and any sys.path entry inside it are removed first, so
only transformers' remote-code loader can reach the exported modeling bundle. Writes REPORT.json:
whether `import models` failed, and per check its largest difference or its outputs.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def hide_repo(repo: Path) -> None:
    """Make the repo unimportable: drop it from sys.path (its .venv may stay) and drop the
    editable-install finder that maps its packages."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != repo]
    for finder in list(sys.meta_path):
        mapping = getattr(sys.modules.get(getattr(finder, "__module__", "")), "MAPPING", None)
        if isinstance(mapping, dict) and any(Path(p).resolve().is_relative_to(repo) for p in mapping.values()):
            sys.meta_path.remove(finder)


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def check_option(path: Path, expected_path: Path) -> dict:
    """Full logits, left-padded logits per row, and greedy decoding of a left-padded batch."""
    import torch
    from transformers import AutoModelForCausalLM

    e = torch.load(expected_path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    out = {"class": type(model).__module__.split(".")[0] + "." + type(model).__name__}
    with torch.no_grad():
        out["logits"] = max_diff(model(e["ids"]).logits, e["logits"])
        prompts = e["prompts"]
        width = max(len(p) for p in prompts)
        batch = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
        logits = model(batch, attention_mask=mask).logits
        out["padded"] = max(max_diff(logits[i, width - len(p):], e["row_logits"][i]) for i, p in enumerate(prompts))
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=e["greedy"][0].numel(), do_sample=False,
                             pad_token_id=0)
        out["greedy"] = [gen[i, width:].tolist() == e["greedy"][i].tolist() for i in range(len(prompts))]
    return out


def check_run(spec: dict) -> dict:
    """The trained run's export: greedy generation, lm-eval's own `hf` backend, the llama format."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out: dict = {}
    path = spec["export"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        ids = tok(spec["prompt"], add_special_tokens=False, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=spec["max_new_tokens"], do_sample=False)
        out["generate"] = tok.decode(gen[0], skip_special_tokens=True)
        tok.padding_side = "left"
        batch = tok(spec["prompts"], add_special_tokens=False, return_tensors="pt", padding=True)
        gen = model.generate(**batch, max_new_tokens=spec["max_new_tokens"], do_sample=False)
        out["generate_batch"] = [tok.decode(g[batch["input_ids"].shape[1]:], skip_special_tokens=True) for g in gen]
        out["generate_rows"] = []
        for p in spec["prompts"]:
            one = tok(p, add_special_tokens=False, return_tensors="pt")
            g = model.generate(**one, max_new_tokens=spec["max_new_tokens"], do_sample=False)
            out["generate_rows"].append(tok.decode(g[0, one["input_ids"].shape[1]:], skip_special_tokens=True))

    lm = HFLM(pretrained=path, trust_remote_code=True, device="cpu", dtype="float32", batch_size=spec["batch_size"])
    tm = TaskManager(include_path=[spec["task_dir"]], include_defaults=False, metadata={"val_docs": spec["val_docs"]})
    res = lm_eval.simple_evaluate(model=lm, tasks=[spec["task"]], task_manager=tm, limit=spec["limit"],
                                  log_samples=True, bootstrap_iters=0)
    samples = sorted(res["samples"][spec["task"]], key=lambda s: s["doc_id"])
    out["hflm_loglikelihoods"] = [float(s["resps"][0][0]) for s in samples]
    out["hflm_metrics"] = {k.split(",")[0]: v for k, v in res["results"][spec["task"]].items()
                           if k.endswith(",none") and "stderr" not in k}

    llama = {}
    for name, (folder, expected) in spec["llama"].items():
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)        # no remote code
        e = torch.load(expected)
        with torch.no_grad():
            llama[name] = {"class": type(m).__name__, "logits": max_diff(m(e["ids"]).logits, e["logits"])}
    out["llama"] = llama
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    hide_repo(Path(spec["repo"]).resolve())
    report: dict = {"models_importable": True, "options": {}}
    try:
        import models  # noqa: F401
    except ImportError:
        report["models_importable"] = False
    for name, folder, expected in spec["options"]:
        try:
            report["options"][name] = check_option(Path(folder), Path(expected))
        except Exception:  # noqa: BLE001 - one option's failure is reported, not fatal
            report["options"][name] = {"error": traceback.format_exc()}
    if spec.get("run"):
        try:
            report["run"] = check_run(spec["run"])
        except Exception:  # noqa: BLE001
            report["run"] = {"error": traceback.format_exc()}
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
