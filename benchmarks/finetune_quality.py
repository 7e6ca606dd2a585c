"""Held-out quality of fine-tuning: answer-token loss on stdlib-instruct pairs from modules kept out of training,
for the base model, after LoRA and after full fine-tuning, in one run.

    python benchmarks/finetune_quality.py --out /tmp/ftq                      # the default model, 300 steps each
    python benchmarks/finetune_quality.py --out /tmp/ftq --steps 200 -- --lora-r 16 --lora-alpha 32

It runs ``cubelm finetune --data stdlib-instruct --max-val-examples 0`` twice (``--method lora``, ``--method full``;
arguments after ``--`` go to both) and reads each run's metrics.jsonl: step 0 is the untouched base evaluated on the
held-out modules (the same split in both runs), the last evaluation is the tuned model on the same examples. The
loss is the mean cross-entropy (nats) over answer tokens only, end-of-turn token included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(method: str, out: Path, a, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cubelm", "finetune", "--model", a.model, "--data", a.data, "--method", method,
           "--out", str(out), "--max-steps", str(a.steps), "--eval-interval", str(a.steps), "--max-val-examples", "0",
           "--checkpoint-interval", str(a.steps), "--no-progress", *extra]
    print("$ " + " ".join(["cubelm", *cmd[3:]]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"cubelm finetune --method {method} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    trainable = next(line for line in proc.stdout.splitlines() if "trainable" in line)
    report = json.loads((out / "data_report.json").read_text())
    return {"base": evals[0], "tuned": evals[-1], "seconds": time.perf_counter() - t0, "trainable": trainable,
            "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the two runs")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="stdlib-instruct")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("extra", nargs="*", help="arguments for cubelm finetune (after --)")
    a = ap.parse_args()
    results = {m: run(m, Path(a.out) / m, a, a.extra) for m in ("lora", "full")}
    base, report = results["lora"]["base"], results["lora"]["report"]
    assert results["full"]["base"]["val_loss"] == base["val_loss"], "both runs must see the same held-out split"
    print(f"\nheld out: {report['val_examples']} examples from {len(report['val_groups'])} modules never trained on, "
          f"{base['val_tokens']:,} answer tokens; train: {report['train_examples']:,} examples; {a.steps} steps each")
    print("\n| model | held-out answer loss (nats/token) | perplexity | bits/byte | wall time |")
    print("|---|---|---|---|---|")
    print(f"| base (default model) | {base['val_loss']:.3f} | {base['val_ppl']:.2f} | {base['val_bpb']:.3f} | |")
    for m, label in (("lora", "after LoRA"), ("full", "after full fine-tuning")):
        t = results[m]["tuned"]
        print(f"| {label} | {t['val_loss']:.3f} | {t['val_ppl']:.2f} | {t['val_bpb']:.3f} | "
              f"{results[m]['seconds'] / 60:.1f} min |")
    for m in ("lora", "full"):
        print(f"\n{m}: {results[m]['trainable']}")


if __name__ == "__main__":
    main()
