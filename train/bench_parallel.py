"""Step time of parallel.backend none vs ddp vs fsdp2 (a benchmark, not a test).

    python -m train.bench_parallel CONFIG [KEY=VALUE ...] [--nproc 2] [--steps 30] [--deepspeed]

`--deepspeed` adds DeepSpeed ZeRO stages 1, 2 and 3 (`deepspeed-zN` rows).

Runs the real trainer for each backend (none: one process; ddp / fsdp2: `--nproc` torchrun
ranks) on the same config and global batch, and prints the median step time after warm-up
and tokens/s, with the ratio to `none`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(config: str, overrides: list[str], backend: str, nproc: int, steps: int, run_dir: Path) -> list[dict]:
    stage = []
    if backend.startswith("deepspeed-z"):
        backend, stage = "deepspeed", [f"parallel.zero_stage={backend[-1]}"]
    ov = [*overrides, f"parallel.backend={backend}", *stage, f"train.steps={steps}", "train.log_every=1",
          "train.val_every=0", "checkpoint.every=0", "train.progress=false"]
    if backend == "none":
        cmd = [sys.executable, "-m", "train", config, *ov, "--run-dir", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               "-m", "train", config, *ov, "--run-dir", str(run_dir)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--deepspeed", action="store_true", help="also DeepSpeed ZeRO stages 1, 2, 3")
    args = p.parse_args()
    backends = ["none", "ddp", "fsdp2"] + (["deepspeed-z1", "deepspeed-z2", "deepspeed-z3"] if args.deepspeed else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            rows = _run(args.config, args.overrides, backend, args.nproc, args.steps, Path(tmp) / backend)
            times = [b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:])][args.warmup:]
            step_s = statistics.median(times)
            tokens = rows[0]["tokens"]
            results[backend] = (step_s, tokens / step_s)
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; distributed backends with {args.nproc} ranks "
          f"(torchrun: 1 thread each), none with {torch.get_num_threads()} threads")
    base = results["none"][0]
    for backend, (step_s, tps) in results.items():
        print(f"{backend:12s} {step_s * 1e3:8.1f} ms/step {tps:10,.0f} tokens/s  x{base / step_s:.2f} vs none")


if __name__ == "__main__":
    main()
