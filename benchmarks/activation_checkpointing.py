"""Activation checkpointing: peak memory and training throughput with and without it, same run, interleaved.

    python benchmarks/activation_checkpointing.py --preset small --seq-len 512 --batch 8 --steps 6 --rounds 2

Each measurement is a fresh subprocess (so its peak RSS belongs to that setting alone) that builds the preset,
runs warm-up + timed AdamW steps on random tokens, and reports tokens/s and peak resident memory. Settings run
interleaved (off, on, off, on, ...) because the machine is shared and noisy; medians and ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(preset: str, seq_len: int, batch: int, steps: int, ac: bool) -> dict:
    import torch

    from cubelm.model.config import preset as get_preset
    from cubelm.train.activation_checkpointing import apply_activation_checkpointing
    from cubelm.train.loop import lm_loss
    from cubelm.model.transformer import build_model

    torch.manual_seed(0)
    cfg = get_preset(preset, max_position_embeddings=max(seq_len, 2048))
    model = build_model(cfg)
    if ac:
        apply_activation_checkpointing(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 1):  # the first step warms up allocator and kernels
        t0 = time.perf_counter()
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"ac": ac, "tokens_per_s": batch * seq_len / statistics.median(times),
            "peak_rss_mib": peak / 1024, "rss_before_training_mib": rss_before / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.preset, a.seq_len, a.batch, a.steps, a.child == "on")))
        return
    results = {"off": [], "on": []}
    for r in range(a.rounds):
        for setting in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", setting, "--preset", a.preset,
                                  "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--steps", str(a.steps)],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[setting].append(res)
            print(f"round {r} AC {setting:3s}: {res['tokens_per_s']:8.0f} tok/s, peak RSS {res['peak_rss_mib']:7.0f} MiB",
                  flush=True)
    med = {s: {k: statistics.median(x[k] for x in results[s]) for k in ("tokens_per_s", "peak_rss_mib",
                                                                        "rss_before_training_mib")}
           for s in results}
    print(f"\npreset {a.preset}, seq_len {a.seq_len}, batch {a.batch} ({a.batch * a.seq_len} tokens/step), "
          f"{a.rounds} interleaved rounds, medians:")
    print("| activation checkpointing | tokens/s | peak RSS (MiB) | peak RSS above model+optimizer start (MiB) |")
    print("|---|---|---|---|")
    for s in ("off", "on"):
        m = med[s]
        print(f"| {s} | {m['tokens_per_s']:.0f} | {m['peak_rss_mib']:.0f} | "
              f"{m['peak_rss_mib'] - m['rss_before_training_mib']:.0f} |")
    print(f"\nratios (on / off): tokens/s {med['on']['tokens_per_s'] / med['off']['tokens_per_s']:.2f}, "
          f"peak RSS {med['on']['peak_rss_mib'] / med['off']['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
