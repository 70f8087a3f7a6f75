"""What a researcher sees while a run goes (rank 0 only).

`train.progress: false`: nothing. Otherwise, when stderr is a terminal, a tqdm bar (loss and lr
in its postfix); when it is not (a pipe, a Slurm log), one plain line per `train.log_every` on
stdout, with no carriage returns: step, loss, lr, tokens/s, MFU, memory. Every validation result
is printed when it is computed, in both modes.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO


def _tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def interactive() -> bool:
    """Whether progress bars may draw (stderr is a terminal)."""
    return _tty(sys.stderr)


class Console:
    """Progress output of one training process; `enabled=False` (other ranks, progress off): silent."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int, *, bar: bool | None = None,
                 out: TextIO | None = None):
        self.enabled, self.total = enabled, total_steps
        self.out = out or sys.stdout
        self.bar = None
        if enabled and (interactive() if bar is None else bar):
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)

    def step(self, metrics: dict[str, Any]) -> None:
        """After every step: advance the bar."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")

    def train_row(self, row: dict[str, Any]) -> None:
        """A logged train row: one plain line when there is no bar."""
        if self.enabled and self.bar is None:
            parts = [f"step {row['step']}/{self.total}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}",
                     f"{row['tokens_per_s']:,.0f} tok/s"]
            if row.get("mfu") is not None:
                parts.append(f"mfu {100 * row['mfu']:.1f}%")
            parts.append(f"mem {row['mem_gb']:.2f} GB")
            self._print(" | ".join(parts))

    def val_row(self, row: dict[str, Any]) -> None:
        """A validation result, in both modes."""
        if not self.enabled:
            return
        extra = "".join(f" {k} {v:.4f}" for k, v in row.items()
                        if k.startswith("val_") and k not in ("val_loss", "val_ppl") and isinstance(v, float))
        self._print(f"val step {row['step']} [{row['set']}]: loss {row['val_loss']:.4f} "
                    f"ppl {row['val_ppl']:.2f}{extra}")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
