"""`--metric`: which number arms are ranked and tested on.

- `val_loss` (default), `val_ppl`, `val_<name>`: a validation row field, on the first validation
  set (`heldout`); `val_loss@SET` names another set.
- `loss`, `loss_<term>`, any other train row field: the train row at the point.
- `TASK/METRIC[@HASH8]`: an lm-eval result (the settings hash most runs have when not given).

Losses, perplexities and bits are better lower; everything else (accuracies) higher.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from eval.compare.runs import Point
from models.registry import ConfigError

LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "bpb", "bits", "nll")


@dataclass(frozen=True)
class Metric:
    spec: str
    kind: str                   # val | train | eval
    field: str                  # the row field, or lm-eval's metric name
    set: str | None = None      # val: the validation set (None: the first)
    task: str | None = None     # eval
    hash8: str | None = None    # eval: the settings hash (None: not chosen yet)

    @classmethod
    def parse(cls, text: str) -> "Metric":
        text = text.strip()
        if not text:
            raise ConfigError("--metric", "empty metric name")
        if "/" in text:
            task, _, rest = text.partition("/")
            metric, _, hash8 = rest.partition("@")
            if not task or not metric:
                raise ConfigError("--metric", f"expected TASK/METRIC[@HASH8], got {text!r}")
            return cls(text, "eval", metric, task=task, hash8=hash8 or None)
        field, _, vset = text.partition("@")
        if field.startswith("val_"):
            return cls(text, "val", field, set=vset or None)
        if vset:
            raise ConfigError("--metric", f"@SET applies to validation fields (val_*), got {text!r}")
        return cls(text, "train", field)

    @property
    def label(self) -> str:
        if self.kind == "eval":
            return f"{self.task}/{self.field}" + (f" [{self.hash8}]" if self.hash8 else "")
        return self.field + (f" ({self.set})" if self.set else "")

    @property
    def lower_is_better(self) -> bool:
        return any(w in self.field.lower() for w in LOWER_IS_BETTER)

    def value(self, p: Point) -> float | None:
        if self.kind == "val":
            row = p.val.get(self.set) if self.set else next(iter(p.val.values()), None)
        elif self.kind == "train":
            row = p.train
        else:
            row = p.eval.get((self.task, self.field, self.hash8))
            row = {self.field: row.get("value")} if row else None
        v = row.get(self.field) if row else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def resolve(self, points: list[Point]) -> tuple["Metric", str | None]:
        """An lm-eval metric with its settings hash chosen (the most common one), plus a message
        when there was a choice; a ConfigError when no run has the metric at all."""
        if self.kind == "eval" and self.hash8 is None:
            hashes = Counter(h for p in points for (t, m, h) in p.eval if (t, m) == (self.task, self.field))
            if hashes:
                chosen = replace(self, hash8=hashes.most_common(1)[0][0])
                note = None
                if len(hashes) > 1:
                    note = (f"--metric {self.spec}: runs have it under {len(hashes)} settings hashes "
                            f"({', '.join(sorted(hashes))}); using {chosen.hash8}, the most common "
                            f"(name another as {self.spec}@HASH8)")
                return chosen, note
        if not any(self.value(p) is not None for p in points):
            raise ConfigError("--metric", f"no run has {self.spec!r} at the chosen point; found: "
                              + ", ".join(available(points)))
        return self, None


def available(points: list[Point]) -> list[str]:
    """Every metric name `--metric` accepts for these points."""
    names: dict[str, None] = {}
    for p in points:
        for i, (vset, row) in enumerate(p.val.items()):
            for k, v in row.items():
                if k.startswith("val_") and isinstance(v, (int, float)):
                    names[k if i == 0 else f"{k}@{vset}"] = None
        for k, v in (p.train or {}).items():
            if k not in ("step", "tokens", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                names[k] = None
        for t, m, h in p.eval:
            names[f"{t}/{m}"] = None
    return list(names) or ["nothing (no rows at or before that point)"]

