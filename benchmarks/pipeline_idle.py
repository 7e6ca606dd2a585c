"""The pipeline simulator's predicted idle time vs the measured idle time of a real 2-stage run.

    python benchmarks/pipeline_idle.py --microbatches 4 --hidden-size 256

For each schedule the real run (``torchrun`` with 2 gloo ranks, ``cubelm.parallel.pipeline_timing``) measures every
micro-batch's forward and backward per rank; their means become the simulator's F and B costs (per stage, the
slower rank's), the simulator predicts each rank's idle time, and the two are printed side by side as a markdown
table. Measured idle also contains what the simulator does not model: point-to-point transfers, the loss, Python.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(schedule: str, microbatches: int, hidden: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "timing.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "cubelm.parallel.pipeline_timing", "--schedule", schedule, "--microbatches", str(microbatches),
               "--hidden-size", str(hidden), "--steps", str(steps), "--json", str(out)]
        for attempt in range(3):  # a rendezvous on a shared machine occasionally fails to start: retry
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                return json.loads(out.read_text())
        raise SystemExit(f"torchrun failed 3 times; last stderr:\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    from cubelm.systems.pipeline_sim import Costs, compare_with_measured, simulate
    print("| schedule | p | m | measured F / B per micro-batch (ms) | predicted bubble | measured bubble | "
          "rank 0 idle predicted / measured (ms) | rank 1 idle predicted / measured (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for schedule in ("gpipe", "1f1b"):
        t = measure(schedule, a.microbatches, a.hidden_size, a.steps)
        ranks = t["ranks"]
        f = max(r["forward_s"] for r in ranks)
        b = max(r["backward_s"] for r in ranks)
        sim = simulate(schedule, stages=2, microbatches=a.microbatches,
                       costs=Costs(forward=f, backward_input=b, backward_weight=0.0))
        cmp = compare_with_measured(sim, [(r["busy_s"], r["idle_s"]) for r in ranks])
        d0, d1 = cmp["devices"]
        print(f"| {schedule} | 2 | {a.microbatches} | {f * 1e3:.1f} / {b * 1e3:.1f} | "
              f"{cmp['predicted_bubble_fraction']:.3f} | {cmp['measured_bubble_fraction']:.3f} | "
              f"{d0['predicted_idle'] * 1e3:.1f} / {d0['measured_idle'] * 1e3:.1f} | "
              f"{d1['predicted_idle'] * 1e3:.1f} / {d1['measured_idle'] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
