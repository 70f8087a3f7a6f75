"""`ablate export-hf`: a run's checkpoint as a Hugging Face folder (docs/export.md).

    ablate export-hf RUN_DIR [--step N] [--out DIR] [--format ablate|llama] [--force]

`--format ablate` (default) writes a folder that `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` loads where this repo is not installed: config.json (`model_type:
ablate`, `auto_map`), generation_config.json, model.safetensors, the run's tokenizer, a README.md
model card, and the modeling bundle. transformers' remote-code loader copies only the files a
module names in flat relative imports (`from .name import x`), so the bundle is generated here
from the package's own sources by a mechanical rewrite: every module that `models` (and
models/hf.py) imports becomes one flat file (`models/mixers/attention.py` -> `mixers_attention.py`,
the package `models` itself -> `ablate_models.py`, models/hf.py -> `modeling_ablate.py`) whose
`from models.x.y import z` lines read `from .x_y import z`. The bundle needs torch and
transformers only; a module importing anything else outside a `try:` is refused here.

`--format llama` writes a plain `LlamaForCausalLM` checkpoint (no remote code) when the
architecture is exactly Llama; otherwise a ConfigError names every key that is not.

Nothing half-written is left: the folder is built under a temporary name beside `--out` and
renamed into place; an existing `--out` that is not an earlier export is refused without --force.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from models.registry import ConfigError
from train.rundir import RunDir, code_version, step_name

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
FORMATS = ("ablate", "llama")
MARKER = "ablate_export.json"                 # names a folder as an export (so it may be replaced)
ROOT_MODULE, HF_MODULE = "models", "models.hf"
FLAT_ROOT, MODELING, CONFIGURATION = "ablate_models", "modeling_ablate", "configuration_ablate"
BUNDLE_DEPENDENCIES = {"torch", "transformers"}


class BundleError(RuntimeError):
    """A model module cannot be bundled (an import the flat rewrite or the loader cannot follow)."""


# ----------------------------------------------------------------------------- the modeling bundle
def source_file(module: str) -> Path | None:
    """models.a.b -> models/a/b.py or models/a/b/__init__.py; None if it is not a module of ours."""
    parts = module.split(".")
    if parts[0] != ROOT_MODULE:
        return None
    base = MODELS_DIR.joinpath(*parts[1:])
    for path in (base.with_suffix(".py") if len(parts) > 1 else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return path
    return None


def flat_name(module: str) -> str:
    """The bundle's file stem for a module: models.mixers.attention -> mixers_attention."""
    if module == ROOT_MODULE:
        return FLAT_ROOT
    if module == HF_MODULE:
        return MODELING
    return "_".join(module.split(".")[1:])


def _is_ours(module: str | None) -> bool:
    return module is not None and (module == ROOT_MODULE or module.startswith(ROOT_MODULE + "."))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module of a `from X import ...` (relative ones resolved against `module`)."""
    if not node.level:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _external_imports(tree: ast.AST) -> set[str]:
    """Top-level packages imported outside `try:` blocks (what transformers' check_imports requires)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _statements(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, where: str
                ) -> tuple[list[str], set[str]] | None:
    """The flat statements that replace one import of our modules, and the modules it needs;
    None when the statement imports nothing of ours."""
    if isinstance(node, ast.Import):
        ours = [a for a in node.names if _is_ours(a.name)]
        if not ours:
            return None
        if len(ours) != len(node.names) or any(a.asname is None for a in ours):
            raise BundleError(f"{where}: `import {ours[0].name}` binds the package; write "
                              "`from models.x import y` (or `import models.x as y`) instead")
        bound = ", ".join(f"{flat_name(a.name)} as {a.asname}" for a in ours)
        return [f"from . import {bound}"], {a.name for a in ours}
    target = _absolute(node, module, is_package)
    if not _is_ours(target):
        return None
    attrs, modules, deps = [], [], set()
    for alias in node.names:
        if alias.name == "*":
            raise BundleError(f"{where}: `from {target} import *` cannot be rewritten; name what is imported")
        full = f"{target}.{alias.name}"
        bound = alias.asname or alias.name
        if source_file(full) is not None:                  # a submodule: bind the flat module
            flat = flat_name(full)
            modules.append(flat + (f" as {bound}" if bound != flat else ""))
            deps.add(full)
        else:
            attrs.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
            deps.add(target)
    lines = [f"from .{flat_name(target)} import {', '.join(attrs)}"] if attrs else []
    if modules:
        lines.append(f"from . import {', '.join(modules)}")
    return lines, deps


def rewrite_module(module: str) -> tuple[str, set[str]]:
    """A module's source with every import of `models` rewritten to the flat bundle, and the
    modules of ours it imports (anywhere: top level, functions, TYPE_CHECKING blocks).

    Line numbers are kept where a statement shrinks (parenthesised imports become one line
    followed by blank ones), so tracebacks point at the source's lines plus the one header line."""
    path = source_file(module)
    rel = path.relative_to(MODELS_DIR.parent)
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    is_package = path.name == "__init__.py"
    extra = sorted(_external_imports(tree) - set(sys.stdlib_module_names) - BUNDLE_DEPENDENCIES - {ROOT_MODULE})
    if extra:
        raise BundleError(f"{rel} imports {', '.join(extra)}: an exported model may count on torch and "
                          "transformers only (import optional packages inside try/except)")
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:          # ast columns are UTF-8 byte offsets
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    edits, deps = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        where = f"{rel}:{node.lineno}"
        new = _statements(node, module, is_package, where)
        if new is None:
            continue
        stmts, needed = new
        deps |= needed
        indent = lines[node.lineno - 1][:node.col_offset]
        if indent.strip():
            raise BundleError(f"{where}: an import of models must start its line")
        blank = max(node.end_lineno - node.lineno + 1 - len(stmts), 0)
        text = ("\n" + indent) * blank + ("\n" + indent).join(stmts)
        edits.append((offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset), text))
    for a, b, text in sorted(edits, reverse=True):
        source = source[:a] + text + source[b:]
    header = f"# Generated by `ablate export-hf` from {rel.as_posix()} (flat imports); edit the source, not this.\n"
    return header + source, deps


def bundle_sources() -> dict[str, str]:
    """{file name: source} of the modeling bundle: every module `models` and models/hf.py import,
    transitively, plus configuration_ablate.py. modeling_ablate.py ends with one
    `from .name import __name__` line per module: transformers copies a local folder's files by
    following `from .name import` lines only, and the rewritten `from . import name` (a module
    bound as such) is not one of them."""
    todo, done, out = [ROOT_MODULE, HF_MODULE], set(), {}
    while todo:
        module = todo.pop()
        if module in done:
            continue
        done.add(module)
        text, deps = rewrite_module(module)
        name = flat_name(module) + ".py"
        if name in out or name == CONFIGURATION + ".py":
            raise BundleError(f"two modules flatten to {name}: rename one of them")
        out[name] = text
        todo.extend(sorted(deps - done))
    manifest = "".join(f"from .{Path(n).stem} import __name__ as _  # noqa: E402,F401\n"
                       for n in sorted(out) if n != MODELING + ".py")
    out[MODELING + ".py"] += ("\n\n# Every bundled module, in the import form transformers' remote-code loader "
                              "follows\n# when it copies a local folder (see train/export.py).\n" + manifest)
    out[CONFIGURATION + ".py"] = ("# Generated by `ablate export-hf`: the config class lives beside the model in "
                                  f"{MODELING}.py (models/hf.py).\n"
                                  f"from .{MODELING} import AblateConfig  # noqa: F401\n")
    return out


def write_bundle(out: Path, files: dict[str, str] | None = None) -> list[str]:
    """Write the bundle (default: generated now from the sources) into `out`."""
    files = bundle_sources() if files is None else files
    for name, text in files.items():
        (out / name).write_text(text)
    return sorted(files)


# ----------------------------------------------------------------------------- weights and configs
def _state(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _save_weights(state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def _save_generation_config(out: Path, token_ids: dict[str, int | None]) -> None:
    from transformers import GenerationConfig
    GenerationConfig(**{k: v for k, v in token_ids.items() if v is not None}).save_pretrained(out)


def write_ablate_folder(model: torch.nn.Module, out: Path, token_ids: dict[str, int | None] | None = None,
                        bundle: dict[str, str] | None = None) -> None:
    """config.json, generation_config.json, model.safetensors and the modeling bundle (`bundle`:
    bundle_sources(), default: generated now) of a Decoder, in its current schedule state, into
    the existing folder `out`."""
    from models.hf import AblateConfig, schedule_state
    token_ids = token_ids or {}
    config = AblateConfig(ablate=dataclasses.asdict(model.cfg), schedule=schedule_state(model), **token_ids)
    config.architectures = ["AblateForCausalLM"]
    config.auto_map = {"AutoConfig": f"{CONFIGURATION}.AblateConfig",
                       "AutoModelForCausalLM": f"{MODELING}.AblateForCausalLM"}
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(out)
    _save_generation_config(out, token_ids)
    _save_weights(_state(model, "model."), out)
    write_bundle(out, bundle)


_LLAMA_KEYS = [   # ours -> LlamaForCausalLM's (w_in is split into gate_proj, up_proj below)
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"final_norm\.weight", "model.norm.weight"),
    (r"head\.weight", "lm_head.weight"),
    (r"blocks\.(\d+)\.mixer_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.mixer\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.ffn\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def llama_checkpoint(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(LlamaForCausalLM state dict, LlamaConfig arguments) of a Decoder that is exactly Llama;
    ConfigError('--format') naming every key that is not.

    Conventions: RoPE is the rotate-half layout in both (dims j and j + Dh/2 form a pair, tables
    cat(freqs, freqs)), so q/k weights map as they are (Meta's original interleaved checkpoints
    need a permutation; ours do not); rope_theta -> rope_parameters.rope_theta; our RMSNorm
    x * rsqrt(mean(x^2) + eps) * g in fp32 is LlamaRMSNorm with rms_norm_eps = model.norm.eps; the
    GLU's fused W_in = [gate | up] splits into gate_proj and up_proj."""
    from models.hf import schedule_state
    cfg = model.cfg
    bad = []
    for letter in sorted(set(cfg.layers.letters(cfg.n_layers))):
        mixer, key = cfg.layers.mixers[letter], f"model.layers.mixers.{letter}"
        if mixer.kind != "attention":
            bad.append(f"{key}.kind={mixer.kind} (Llama is attention only)")
            continue
        default = type(mixer)()
        bad += [f"{key}.{f.name}={getattr(mixer, f.name)!r}" for f in dataclasses.fields(mixer)
                if getattr(mixer, f.name) != getattr(default, f.name)]
    if (cfg.ffn.kind, cfg.ffn.activation) != ("glu", "swiglu"):
        bad.append(f"model.ffn.kind/activation={cfg.ffn.kind}/{cfg.ffn.activation} (Llama: glu/swiglu)")
    if cfg.ffn.bias:
        bad.append("model.ffn.bias=true")
    if schedule_state(model)["relu_finetune"]:
        bad.append("model.ffn.relu_finetune_frac (this checkpoint runs the ReLU fine-tune: a ReGLU gate)")
    for key in ("block", "final"):
        if getattr(cfg.norm, key) != "rmsnorm":
            bad.append(f"model.norm.{key}={getattr(cfg.norm, key)} (Llama: rmsnorm)")
    if cfg.qk_norm:
        bad.append("model.qk_norm=true")
    if cfg.memory.layers:
        bad.append(f"model.memory.layers={cfg.memory.layers}")
    p = model.param
    if (p.input_multiplier, p.output_multiplier, p.residual_multiplier) != (1.0, 1.0, 1.0):
        bad.append(f"model.param.kind={cfg.param.kind} (forward multipliers; Llama has none)")
    if p.attention_scale(cfg.head_dim) is not None:
        bad.append("model.param.attn_scale (attention logits not scaled by 1/sqrt(head_dim))")
    state, hidden = {}, None
    for name, value in _state(model).items():
        if m := re.fullmatch(r"blocks\.(\d+)\.ffn\.w_in\.weight", name):
            hidden = value.shape[0] // 2
            state[f"model.layers.{m[1]}.mlp.gate_proj.weight"] = value[:hidden].clone()
            state[f"model.layers.{m[1]}.mlp.up_proj.weight"] = value[hidden:].clone()
            continue
        for pattern, repl in _LLAMA_KEYS:
            if re.fullmatch(pattern, name):
                state[re.sub(pattern, repl, name)] = value
                break
        else:
            bad.append(f"parameter {name} (Llama has no such weight)")
    if bad:
        raise ConfigError("--format", "llama needs exactly the Llama architecture (attention with RoPE and "
                                      "GQA, glu/swiglu, rmsnorm, sp, no extras); not Llama: " + "; ".join(bad))
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=hidden,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                  head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm.eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
                  initializer_range=cfg.init_std)
    return state, kwargs


def write_llama_folder(model: torch.nn.Module, out: Path, token_ids: dict[str, int | None] | None = None) -> None:
    """config.json (LlamaConfig), generation_config.json and model.safetensors into `out`."""
    from transformers import LlamaConfig
    state, kwargs = llama_checkpoint(model)
    token_ids = token_ids or {}
    config = LlamaConfig(**kwargs, **token_ids)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(out)
    _save_generation_config(out, token_ids)
    _save_weights(state, out)


# ----------------------------------------------------------------------------- a run's export
def default_out(run: RunDir, step: int, fmt: str) -> Path:
    return run.path / "hf" / (step_name(step) + ("" if fmt == "ablate" else f"-{fmt}"))


def check_out(out: Path, force: bool) -> None:
    """An existing --out is replaced only when it is empty, an earlier export, or --force is given."""
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise ConfigError("--out", f"{out} is a file, not an export folder; pass --force to replace it")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError("--out", f"{out} exists and is not an ablate export (no {MARKER}); "
                                   "pass --force to replace it")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds (an old `out`
    is moved aside first and deleted after); on failure it is deleted and `out` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old.exists():
                os.replace(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
    if tokenizer is None:
        return {}
    eos = tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos}


def _val_lines(run: RunDir, step: int) -> list[str]:
    rows = [r for r in run.read_metrics("val") if r.get("step") == step and r.get("val_loss") is not None]
    if not rows:
        return [f"- validation loss: none logged at step {step}"]
    return [f"- validation loss at step {step}: {r['val_loss']:.4f} (set `{r.get('set', 'heldout')}`)" for r in rows]


def model_card(run: RunDir, name: str, step: int, fmt: str, has_tokenizer: bool) -> str:
    load = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if fmt == "ablate"
            else "AutoModelForCausalLM.from_pretrained(path)  # LlamaForCausalLM, no remote code")
    version = code_version()
    code = f"- code: git {version.get('git_sha') or 'unknown'}" + (" (dirty)" if version.get("dirty") else "")
    lines = ["---", "library_name: transformers", "tags: [ablate]", "---", "",
             f"# {name}, step {step}", "",
             f"Exported by `ablate export-hf --format {fmt}` from the run `{run.path.resolve()}`.", "",
             f"- run: `{name}`", f"- checkpoint step: {step}", *_val_lines(run, step), code]
    if not has_tokenizer:
        lines.append("- no tokenizer: the run has none (pretokenized data)")
    lines += ["", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "path = \"path/to/this/folder\"", f"model = {load}"]
    if has_tokenizer:
        lines.append("tokenizer = AutoTokenizer.from_pretrained(path)")
    lines += ["```", "", "## Run config", "", "```yaml", run.config_path.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, step: int | str | None = "latest", out: str | Path | None = None,
               fmt: str = "ablate", force: bool = False) -> Path:
    """`ablate export-hf`: write a complete checkpoint of a run as a Hugging Face folder; returns it."""
    from train.data import load_tokenizer
    from train.runtime import load_model
    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown format {fmt!r}; choose {' or '.join(FORMATS)}")
    run = RunDir(run_dir)
    model, cfg, step = load_model(run_dir, step, "cpu")     # ConfigError naming RUN_DIR or --step
    out = Path(out) if out is not None else default_out(run, step, fmt)
    check_out(out, force)
    if fmt == "llama":
        llama_checkpoint(model)                             # refuse before writing anything
    tokenizer = load_tokenizer(run.tokenizer_dir) if run.tokenizer_dir.is_dir() else None
    ids = _token_ids(tokenizer)
    with staging(out) as tmp:
        (write_ablate_folder if fmt == "ablate" else write_llama_folder)(model, tmp, ids)
        if tokenizer is not None:
            for f in sorted(run.tokenizer_dir.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        name = cfg.name or run.path.name
        (tmp / "README.md").write_text(model_card(run, name, step, fmt, tokenizer is not None))
        marker = {"format": fmt, "run_dir": str(run.path.resolve()), "run": name, "step": step,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code_version": code_version(),
                  "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out
