"""The run config: dataclass tree, YAML loading with `base:` inheritance, dotted overrides.

`load_config(path, overrides)` is the single entry point; every command calls it first, so a
bad key fails before any work with a ConfigError naming the full key path (the CLI exits 2).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

import models  # noqa: F401  (registers every technique, so validation knows the names)
from models.config import ModelConfig
from models.registry import ConfigError
from models.schema import build, require, to_dict, validate_tree


# ----------------------------------------------------------------------------- sections
# Keys a data section (the run's, a mixture entry, a validation set) takes from the run's `data`.
RUN_DATA_KEYS = ("seq_len", "seed", "cache_dir", "num_proc")


@dataclass
class DataConfig:
    """`data`: where tokens come from. `source` names a registered source (train/data/source.py);
    a source's own keys are the section `data.<source name>` (e.g. `data.hf`)."""

    source: str = "embedded"               # a registered source: embedded | files | hf | pretokenized | mixture | mqar
    paths: list[str] = field(default_factory=list)   # files / pretokenized / hf data files: files, folders, globs
    text_field: str = "text"               # the jsonl / json / parquet / hf column holding the text
    mixture: list[dict[str, Any]] = field(default_factory=list)   # mixture: [{weight, <a data section>}, ...]
    seq_len: int = 256                     # tokens per training sample (the model sees seq_len, predicts seq_len)
    seed: int = 0                          # data order only (arms compared in pairs share it)
    cache_dir: str | None = None           # token cache; null: $ABLATE_CACHE or ~/.cache/ablate
    val_fraction: float = 0.05             # fraction of documents held out for validation (the `heldout` set)
    val_paths: list[str] = field(default_factory=list)   # files that replace the held-out documents
    val_sets: dict[str, dict[str, Any]] = field(default_factory=dict)   # more validation sets: name -> a data
                                           # section (own `set` in val rows)
    dtype: Literal["uint16", "uint32", "auto"] = "auto"  # token dtype of pretokenized files and of the cache
    encoding_errors: Literal["error", "replace"] = "error"  # non-UTF-8 bytes in text files: fail or U+FFFD
    num_proc: int = 1                      # tokenization threads

    # keys that moved into a source's own section
    MOVED_KEYS: ClassVar[dict[str, str]] = {"vocab_size": "pretokenized.vocab_size",
                                            "embedded_max_bytes": "embedded.max_bytes"}

    def __post_init__(self) -> None:
        self._sections: dict[str, Any] = {name: cls() for name, cls in self.open_sections().items()}

    def __getattr__(self, name: str) -> Any:      # data.<source>: a registered source's section
        sections = self.__dict__.get("_sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"DataConfig has no attribute or source section '{name}'")

    @classmethod
    def open_sections(cls) -> dict[str, type]:
        """The `data.<name>` sections: each registered source's config dataclass."""
        from train.data.source import source_configs
        return source_configs()

    def validate(self, path: str) -> None:
        from train.data.source import source

        require(self.seq_len >= 2, f"{path}.seq_len", f"must be >= 2, got {self.seq_len}")
        require(0.0 <= self.val_fraction < 1.0, f"{path}.val_fraction",
                f"must be in [0, 1), got {self.val_fraction}")
        require(self.num_proc >= 1, f"{path}.num_proc", f"must be >= 1, got {self.num_proc}")
        source(self.source, f"{path}.source").check(self, path)       # an unknown name fails here
        for i, (_, child) in enumerate(self.mixture_sources(path)):
            key = f"{path}.mixture[{i}]"
            require(source(child.source, f"{key}.source").text, f"{key}.source",
                    f"'{child.source}' cannot be mixed: a mixture interleaves documents of text sources")
        for name in self.val_sets:
            require(isinstance(name, str) and name.isidentifier() and name != "heldout", f"{path}.val_sets.{name}",
                    "a validation set's name is an identifier other than 'heldout' (the held-out split's)")
        self.val_set_configs(path)

    def _child(self, raw: Any, key: str, refused: tuple[str, ...], fixed: dict[str, Any]) -> "DataConfig":
        """A nested data section (mixture entry, validation set): the run's RUN_DATA_KEYS, plus `fixed`."""
        require(isinstance(raw, dict), key, f"expected a mapping (a data section), got {raw!r}")
        for k in refused:
            require(k not in raw, f"{key}.{k}", f"the run's data.{k} applies here" if k in RUN_DATA_KEYS
                    else "has no meaning here")
        child = build(DataConfig, {**raw, **{k: getattr(self, k) for k in RUN_DATA_KEYS}, **fixed}, key)
        validate_tree(child, key)
        return child

    def mixture_sources(self, path: str = "data") -> list[tuple[float, "DataConfig"]]:
        """(weight, DataConfig) of each mixture entry; the seq_len, seed and cache are the parent's."""
        out = []
        for i, entry in enumerate(self.mixture):
            key = f"{path}.mixture[{i}]"
            require(isinstance(entry, dict), key, "expected a mapping {weight, source, ...}")
            weight = entry.get("weight")
            require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
                    f"{key}.weight", f"must be a number > 0, got {weight!r}")
            sub = {k: v for k, v in entry.items() if k != "weight"}
            require(sub.get("source", "embedded") != "mixture", f"{key}.source", "mixtures cannot nest")
            out.append((float(weight), self._child(sub, key, RUN_DATA_KEYS + ("val_sets",), {})))
        return out

    def val_set_configs(self, path: str = "data") -> dict[str, "DataConfig"]:
        """{name: DataConfig} of `data.val_sets`: each read whole as validation text."""
        refused = RUN_DATA_KEYS + ("val_sets", "val_fraction", "val_paths")
        return {name: self._child(raw, f"{path}.val_sets.{name}", refused, {"val_fraction": 0.0})
                for name, raw in self.val_sets.items()}


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "pretrained"] = "bpe"   # bpe: train a byte-level BPE; pretrained: load `path`
    vocab_size: int = 4096                         # bpe: the trained vocabulary's size (EOS and PAD included)
    path: str | None = None                        # local folder (or hub name, online)
    train_bytes: int = 20_000_000                  # bpe: at most this much text is used to train

    def validate(self, path: str) -> None:
        require(self.vocab_size >= 260, f"{path}.vocab_size",
                f"must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        if self.kind == "pretrained":
            require(self.path is not None, f"{path}.path", "tokenizer.kind=pretrained needs a path")


@dataclass
class ProfileConfig:
    """`train.profile`: a torch.profiler window of `steps` steps after step `start` (0: the first
    steps), written as Chrome traces under RUN_DIR/profile/. steps 0: off."""

    start: int = 0                 # steps before the window (0: it opens with the first step)
    steps: int = 0                 # steps profiled (0: off)

    def validate(self, path: str) -> None:
        require(self.start >= 0, f"{path}.start", f"must be >= 0, got {self.start}")
        require(self.steps >= 0, f"{path}.steps", f"must be >= 0, got {self.steps}")


@dataclass
class TrainConfig:
    steps: int = 100               # optimizer steps (raise it on resume to extend a run)
    global_batch: int = 8          # sequences per optimizer step, over all ranks and micro-batches
    micro_batch: int = 8           # sequences per rank per forward (accumulation: global / (micro x ranks))
    log_every: int = 10            # a `train` metrics row every this many steps (and at the last)
    val_every: int = 50            # validation every this many steps (0: only at the end; the last always)
    val_batches: int = 4           # validation micro-batches: the first val_batches x micro_batch windows
    peak_tflops: float | None = None   # one device's peak for mfu; null: nominal bf16 of known GPUs (none on CPU)
    z_loss: float = 0.0            # weight of the z-loss, logsumexp(logits)^2 per target token (loss_z); 0: off
    nonfinite: Literal["skip", "halt"] = "skip"   # a non-finite loss or grad norm: skip the update, or fail
    spike_window: int = 0          # loss-spike detector: moving window of steps (0 = off)
    spike_sigma: float = 6.0       # a spike is a loss above mean + sigma * std of the window
    spike_action: Literal["log", "skip"] = "log"   # a spike: an event row only, or also skip the update
    progress: bool = True          # progress bars on stderr (rank 0): data preparation and training
    max_skipped_steps: int = 10    # halt (FAILED) after this many consecutive non-finite skipped steps (0: never)
    probe_every: int = 0           # steps between in-training probes (attention entropy rows; 0: off)
    log_group_norms: bool = False  # per optimizer group: grad norm and update/parameter RMS ratio, at log_every
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def validate(self, path: str) -> None:
        for key in ("steps", "global_batch", "micro_batch", "log_every"):
            require(getattr(self, key) >= 1, f"{path}.{key}", f"must be >= 1, got {getattr(self, key)}")
        require(self.val_every >= 0, f"{path}.val_every", "must be >= 0 (0 = only at the end)")
        require(self.val_batches >= 1, f"{path}.val_batches", f"must be >= 1, got {self.val_batches}")
        require(self.global_batch % self.micro_batch == 0, f"{path}.global_batch",
                f"global_batch={self.global_batch} is not a multiple of micro_batch={self.micro_batch}")
        require(self.z_loss >= 0, f"{path}.z_loss", f"must be >= 0, got {self.z_loss}")
        require(self.probe_every >= 0, f"{path}.probe_every", f"must be >= 0 (0: off), got {self.probe_every}")
        require(self.spike_window >= 0, f"{path}.spike_window", f"must be >= 0, got {self.spike_window}")
        require(self.max_skipped_steps >= 0, f"{path}.max_skipped_steps", f"must be >= 0, got {self.max_skipped_steps}")
        require(self.spike_sigma > 0, f"{path}.spike_sigma", f"must be > 0, got {self.spike_sigma}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "linear", "constant"] = "cosine"   # the LR factor after warmup (train/schedule.py)
    warmup: int = 0                # steps of linear warmup, from lr / warmup at step 0 up to lr
    decay_frac: float = 0.2        # wsd: the final fraction of steps that decays
    decay_start: int | None = None  # wsd: explicit first decay step (overrides decay_frac)
    min_lr_ratio: float = 0.1      # the final LR as a fraction of the peak (cosine, linear, wsd)

    def validate(self, path: str) -> None:
        require(self.warmup >= 0, f"{path}.warmup", f"must be >= 0, got {self.warmup}")
        require(0.0 <= self.decay_frac <= 1.0, f"{path}.decay_frac", f"must be in [0, 1], got {self.decay_frac}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{path}.min_lr_ratio",
                f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_start is not None:
            require(self.decay_start >= 0, f"{path}.decay_start", f"must be >= 0, got {self.decay_start}")


@dataclass
class MuonConfig:
    lr: float = 0.02                   # peak LR of the Muon groups (hidden matrices); the schedule scales it
    momentum: float = 0.95             # beta of the momentum buffer (an EMA of the gradients)
    nesterov: bool = True              # orthogonalise (1 - beta) G + beta B instead of the buffer B
    ns_steps: int = 5                  # Newton-Schulz iterations approximating the momentum's U V^T
    weight_decay: float | None = None  # null: optim.weight_decay


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"   # muon: Muon for hidden matrices, AdamW for the rest (train/muon.py)
    lr: float = 3.0e-3               # peak LR of the AdamW groups (times each group's rule); the schedule scales it
    betas: tuple[float, float] = (0.9, 0.95)   # AdamW (beta1, beta2), Muon's AdamW groups included
    eps: float = 1.0e-8              # AdamW epsilon (times the parameterization's per-group multiplier)
    weight_decay: float = 0.1        # decoupled; times each group's multiplier (sp: block matrices and tables only)
    grad_clip: float = 1.0           # 0 disables clipping
    fused: bool | None = None        # null: fused AdamW when on CUDA
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    muon: MuonConfig = field(default_factory=MuonConfig)

    def validate(self, path: str) -> None:
        require(self.lr > 0, f"{path}.lr", f"must be > 0, got {self.lr}")
        require(self.eps > 0, f"{path}.eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"{path}.grad_clip", f"must be >= 0, got {self.grad_clip}")
        for i, b in enumerate(self.betas):
            require(0.0 <= b < 1.0, f"{path}.betas[{i}]", f"must be in [0, 1), got {b}")


@dataclass
class CheckpointConfig:
    every: int = 0                 # 0: only at the end (and on stop requests)
    keep_last: int = 2             # newest complete checkpoints kept
    keep_every: int = 0            # also keep every checkpoint whose step is a multiple of this
    verify: bool = True            # check the files' checksums on resume (a damaged one falls back)
    async_save: bool = False       # write in the background (DCP async save); COMPLETE still comes last

    def validate(self, path: str) -> None:
        require(self.every >= 0, f"{path}.every", f"must be >= 0, got {self.every}")
        require(self.keep_last >= 1, f"{path}.keep_last", f"must be >= 1, got {self.keep_last}")
        require(self.keep_every >= 0, f"{path}.keep_every", f"must be >= 0, got {self.keep_every}")


@dataclass
class ParallelConfig:
    backend: Literal["none", "ddp", "fsdp2", "deepspeed"] = "none"   # none: one process; the others: torchrun
    zero_stage: int = 1                # deepspeed: ZeRO stage 1, 2 or 3
    reshard_after_forward: bool = True   # fsdp2: free gathered parameters after forward (gather again in backward)
    activation_checkpointing: str = "none"   # none | full | every_k (checkpoint blocks 0, k, 2k, ...)
    ac_every: int = 2                  # every_k: k
    compile: bool = False              # torch.compile each block
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"   # fsdp2 compute dtype; auto: bf16 on CUDA, fp32 on CPU
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"          # fsdp2 gradient reduction dtype
    replicate: int = 1                 # fsdp2: HSDP replicas (mesh replicate x shard); 1 = plain FSDP
    cpu_offload: bool = False          # fsdp2: parameters, gradients and optimizer state on CPU
    timeout_s: float = 600.0           # collective timeout: a dead rank ends the others after this

    def validate(self, path: str) -> None:
        key = f"{path}.activation_checkpointing"
        require(self.activation_checkpointing != "selective", key,
                "'selective' was renamed: it meant every k-th block, which is now 'every_k' (with "
                f"{path}.ac_every = k); torchtitan's op-level selective checkpointing is not implemented")
        require(self.activation_checkpointing in ("none", "full", "every_k"), key,
                f"must be one of none, full, every_k, got {self.activation_checkpointing!r}")
        require(self.ac_every >= 1, f"{path}.ac_every", f"must be >= 1, got {self.ac_every}")
        require(self.replicate >= 1, f"{path}.replicate", f"must be >= 1, got {self.replicate}")
        require(self.timeout_s > 0, f"{path}.timeout_s", f"must be > 0, got {self.timeout_s}")
        if self.backend != "fsdp2":
            for key, default in (("replicate", 1), ("cpu_offload", False)):
                require(getattr(self, key) == default, f"{path}.{key}", "only applies to parallel.backend=fsdp2")
        require(self.zero_stage in (1, 2, 3), f"{path}.zero_stage", f"must be 1, 2 or 3, got {self.zero_stage}")
        if self.backend == "deepspeed":
            require(self.reduce_dtype == "fp32", f"{path}.reduce_dtype",
                    "only applies to parallel.backend=fsdp2 (deepspeed reduces in its own dtype)")


@dataclass
class EvalConfig:
    every: int = 0                 # lm-eval in the loop every this many steps and at the last (0: off)
    tasks: list[str] = field(default_factory=list)   # lm-eval task names of the in-loop evaluation
    limit: int | None = None       # in the loop: at most this many documents per task (null: all)
    include_path: str | None = None   # extra folder of task YAMLs (also `ablate eval`'s default --include-path)
    data_dir: str | None = None    # folder with hellaswag/ and arc_easy/ (also `ablate eval`'s default --data-dir)


@dataclass
class LogConfig:
    tensorboard: bool = False      # mirror the metrics rows' numbers to TensorBoard (RUN_DIR/tensorboard)
    wandb: bool = False            # mirror them to Weights & Biases (run name: `name`; files under RUN_DIR)
    wandb_project: str | None = None   # W&B project; null: ablate
    wandb_mode: Literal["online", "offline"] = "offline"   # offline: nothing is sent until `wandb sync`


@dataclass
class LaunchConfig:
    """`launch`: how `ablate launch` / `ablate sweep` run a job (launch/slurm.py)."""

    setup: list[str] = field(default_factory=list)   # shell lines run first in the job (activate an env,
                                                     # module loads)
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. "--gres=gpu:8", "--mem=0"
    template: str | None = None    # a job script template replacing launch/job.sbatch (same {{placeholders}})
    python: str | None = None      # the interpreter on the compute nodes; null: the one running ablate launch


@dataclass
class Config:
    seed: int = 0                  # model init and the process RNGs (stochastic masks too); not the data order
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: CUDA when there is a GPU, else CPU
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    init_from: str | None = None   # RUN_DIR or checkpoint dir: weights only (fresh optimizer and data order)
    init_from_allow_new: list[str] = field(default_factory=list)     # globs of parameters init_from may
                                    # leave to fresh init (new modules)
    init_from_allow_unused: list[str] = field(default_factory=list)  # globs of checkpoint keys init_from
                                    # may ignore (removed modules)
    branch_from: str | None = None  # RUN_DIR or checkpoint dir: the full state (optimizer, data position,
                                    # RNG, step), e.g. a WSD decay branch off a stable-phase checkpoint
    name: str | None = None        # the run's name (default: the config file's stem)

    def validate(self, path: str = "") -> None:
        require(not (self.init_from and self.branch_from), "branch_from",
                "set init_from (weights only) or branch_from (full state), not both")
        for key in ("init_from_allow_new", "init_from_allow_unused"):
            require(not getattr(self, key) or self.init_from, key, "only applies with init_from")
        require(not (self.optim.name == "muon" and self.model.param.kind != "sp"), "optim.name",
                f"muon with model.param.kind={self.model.param.kind} is not supported yet (its rules are "
                "written for AdamW); use adamw")
        require(not (self.checkpoint.async_save and self.parallel.backend == "deepspeed"), "checkpoint.async_save",
                "not available with parallel.backend=deepspeed (DeepSpeed writes its own checkpoints)")
        require(not (self.train.log_group_norms and self.parallel.backend == "deepspeed"), "train.log_group_norms",
                "not available with parallel.backend=deepspeed (ZeRO owns the flattened gradients)")
        removal = self.model.norm.removal
        if removal is not None:
            from models.norm_removal import removal_schedule
            last = removal_schedule(removal, self.model.n_layers)[-1].step
            require(last < self.train.steps, "model.norm.removal",
                    f"the schedule's last switch (position 0, bos_after) is at step {last}; train.steps="
                    f"{self.train.steps} must exceed it, so that some step trains with it: raise train.steps "
                    "or shorten start_step / the gaps")
        require(self.model.max_seq_len >= self.data.seq_len, "data.seq_len",
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.model.vocab_size is not None and self.tokenizer.kind == "bpe" and self.source_vocab() is None:
            require(self.model.vocab_size >= self.tokenizer.vocab_size, "model.vocab_size",
                    f"model.vocab_size={self.model.vocab_size} is smaller than "
                    f"tokenizer.vocab_size={self.tokenizer.vocab_size}")

    def source_vocab(self) -> int | None:
        """The training source's own vocabulary, when its config says it (pretokenized, synthetic)."""
        from train.data.source import source
        return source(self.data.source).vocab_size(self.data)

    def resolved_vocab_size(self, tokenizer_vocab: int | None = None) -> int:
        """The model's vocabulary: model.vocab_size, else the tokenizer's rounded up to 64."""
        if self.model.vocab_size is not None:
            return self.model.vocab_size
        if tokenizer_vocab is None:
            tokenizer_vocab = self.source_vocab() or self.tokenizer.vocab_size
        return 64 * math.ceil(tokenizer_vocab / 64)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# Keys that may differ between a run's saved config and the config it is resumed with.
RESUMABLE_PREFIXES = ("train.steps", "optim.schedule.decay_frac", "optim.schedule.decay_start",
                      "optim.schedule.min_lr_ratio", "checkpoint.", "eval.", "log.", "parallel.",
                      "launch.", "train.log_every", "train.val_every", "train.val_batches",
                      "train.progress", "train.peak_tflops", "train.spike_", "train.log_group_norms",
                      "train.max_skipped_steps", "train.probe_every",
                      "train.profile.", "data.cache_dir", "data.num_proc", "name",
                      "code_version", "derived")

# Top-level keys of a run's config.yaml that are records, not config: popped when it is loaded.
RECORD_KEYS = ("code_version", "derived")


def resolve_config(cfg: Config, tokenizer_vocab: int | None = None, eos_id: int | None = None) -> dict[str, str]:
    """Set the values derived after validation, in one place; returns {key: where it came from}
    for the `derived:` record in config.yaml. Keys already set explicitly are left alone.

    - model.vocab_size: null -> the tokenizer's vocabulary rounded up to 64 ("tokenizer")
    - model.ffn.stochastic.seed: null -> the run's top-level seed ("seed"), when the FFN uses
      stochastic activations (their masks then follow the run's seed)
    - model.norm.removal.eot_token: null -> the data's EOS id ("tokenizer"), when it has one
    """
    derived: dict[str, str] = {}
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = cfg.resolved_vocab_size(tokenizer_vocab)
        derived["model.vocab_size"] = "tokenizer"
    ffn = cfg.model.ffn
    if ffn.activation == "stochastic" and ffn.stochastic.seed is None:
        ffn.stochastic.seed = cfg.seed
        derived["model.ffn.stochastic.seed"] = "seed"
    removal = cfg.model.norm.removal
    if removal is not None and removal.eot_token is None and eos_id is not None:
        removal.eot_token = eos_id
        derived["model.norm.removal.eot_token"] = "tokenizer"
    return derived


# ----------------------------------------------------------------------------- loading
def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping, with errors naming the file (and line, for syntax errors)."""
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError("", f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping of sections")
    return data


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged dict of a config file and its chain of `base:` files (relative to each file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError("base", f"circular base: {' -> '.join(str(p) for p in (*_seen, path))}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict[str, Any] = {}
    for b in bases:
        if not isinstance(b, str):
            raise ConfigError("base", f"{path}: expected a relative path, got {b!r}")
        merged = _deep_merge(merged, load_raw(path.parent / b, (*_seen, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError("", f"override '{text}' is not KEY=VALUE")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override '{text}' has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def set_dotted(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """data[parts[0]][parts[1]]... = value, making sections on the way (an override's effect)."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), f"is not a section, cannot set {'.'.join(parts)}")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Command-line KEY=VALUE overrides (values parsed as YAML) applied to a raw config dict."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(data, parts, value)
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = build(Config, data)
    validate_tree(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, merge bases, apply overrides, build and validate. Raises ConfigError."""
    data = apply_overrides(load_raw(path), overrides or [])
    for key in RECORD_KEYS:
        data.pop(key, None)
    cfg = config_from_dict(data)
    if cfg.name is None:
        cfg.name = Path(path).stem
    return cfg


def dump_config(cfg: Config, extra: dict[str, Any] | None = None) -> str:
    data = cfg.to_dict()
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} view of a nested dict (lists are leaves)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ and may not change on resume."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(set(a) | set(b))
    diffs = []
    for k in keys:
        if a.get(k) == b.get(k):
            continue
        if any(k == p or k.startswith(p) for p in RESUMABLE_PREFIXES):
            continue
        diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return diffs
