"""The compression report on the models the issue names: the default model and `small` trained a few minutes.

    python benchmarks/compression.py                         # the default model
    python benchmarks/compression.py --train-small 240       # + `small` trained 240 steps on the default's data
    python benchmarks/compression.py --model DIR --model DIR2

For each model this runs ``cubelm compress report`` (every method, interleaved speed rounds on this host) and prints
its table and claims; ``--train-small`` first trains the `small` preset with ``cubelm train`` on the default model's
own packed data (same tokenizer, so the held-out bits per byte are comparable), 8 x 256 tokens per step. The
figures in docs/benchmarks.md come from this script; rerun it rather than copying them: the host decides the speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def cubelm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cubelm", *args], check=True)


def train_small(steps: int, default_dir: Path, work: Path) -> Path:
    summary = json.loads((default_dir / "training_summary.json").read_text())
    run = work / "small-run"
    if not (run / "model" / "model.safetensors").is_file():
        cubelm("train", "--data", summary["data"], "--out", str(run), "--recipe", "small", "--seq-len", "256",
               "--micro-batch-size", "8", "--grad-accum", "1", "--max-steps", str(steps),
               "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(max(1, steps // 3)),
               "--checkpoint-interval", str(max(1, steps // 3)), "--no-progress")
    return run / "model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="model directory (repeatable); default: the default model")
    ap.add_argument("--train-small", type=int, metavar="STEPS", help="also train `small` for STEPS steps and report it")
    ap.add_argument("--work", default="runs/compression", help="output root: one report directory per model")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    ap.add_argument("--recover-steps", type=int, default=100, help="recovery steps of the pruning rows")
    args = ap.parse_args()
    from cubelm.store import model_path
    work = Path(args.work)
    models = [Path(m) for m in args.model] if args.model else [model_path()]
    if args.train_small:
        models.append(train_small(args.train_small, model_path(), work))
    for m in models:
        name = m.parent.name if m.name == "model" else m.name
        print(f"\n## {name} ({m})  [OMP threads: {os.environ.get('OMP_NUM_THREADS', 'default')}]\n", flush=True)
        cubelm("compress", "report", "--model", str(m), "--out", str(work / name), "--rounds", str(args.rounds),
               "--recover-steps", str(args.recover_steps))


if __name__ == "__main__":
    main()
