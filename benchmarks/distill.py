"""Distilled student vs the same student trained from scratch: held-out bits per byte, same data, steps and seed.

    OMP_NUM_THREADS=1 python benchmarks/distill.py --out /tmp/distill                 # default model -> nano
    python benchmarks/distill.py --out /tmp/distill --teacher DIR --student small -- --alpha 0.9 --temperature 4

Runs ``cubelm compress distill --baseline`` (arguments after ``--`` are passed on): the distilled student
(α·T²·KL(teacher‖student at T) + (1−α)·CE), then the scratch student (next-token loss only, the same windows in
the same order, the same steps, schedule and initialization seed), then ``cubelm.eval.bpb`` on the same held-out
text (tqdm's sources, which none of the models trained on) for the teacher and both students. The table also has
each model's bits per byte on the training data's validation split and the students' KL to the teacher there.
Training throughput (median tok/s over steps) is printed for scale only: the distilled student pays one teacher
forward per step; the two runs are sequential, not interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the distilled student and the run (work/)")
    ap.add_argument("--teacher", default=None, help="teacher model directory (default: the default model)")
    ap.add_argument("--student", default="nano", help="student preset or model directory")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each student")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("extra", nargs="*", help="more cubelm compress distill arguments (after --)")
    a = ap.parse_args()
    import torch

    from cubelm.cli import main as cubelm
    from cubelm.systems.host import describe_host, host_info
    out = Path(a.out)
    args = ["compress", "distill", *(["--teacher", a.teacher] if a.teacher else []), "--student", a.student,
            "--out", str(out / "student"), "--work-dir", str(out / "work"), "--max-steps", str(a.steps),
            "--seq-len", str(a.seq_len), "--micro-batch-size", str(a.micro_batch_size), "--baseline",
            "--no-progress", *a.extra]
    print(f"host: {describe_host(host_info())}; torch threads {torch.get_num_threads()}")
    print("$ cubelm " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    code = cubelm(args)
    if code:
        sys.exit(code)
    summary = json.loads((out / "student" / "distillation.json").read_text())
    print(f"wall time {time.perf_counter() - t0:.0f} s (distilled {summary['distilled']['seconds']:.0f} s, scratch "
          f"{summary['scratch']['seconds']:.0f} s); summary: {out / 'student' / 'distillation.json'}")


if __name__ == "__main__":
    main()
