"""Fine-tuning methods side by side: full vs LoRA vs QLoRA on one base model, in one run.

    python benchmarks/finetune.py --preset small --seq-len 512 --batch 8 --steps 4 --rounds 2

The base is the preset with seeded random weights, saved once in HF format. Each measurement is a fresh subprocess
(its peak RSS belongs to that method alone) that does what ``cubelm finetune`` does per method: ``load_model``, then
``apply_lora`` / ``apply_qlora`` / nothing (full), AdamW on the parameters that require grad, and optimizer steps
of ``FinetuneTrainer`` (masked cross-entropy on the answer half of each sequence, gradient clipping). It reports
trainable parameters, training tokens/s (median step after a warm-up step) and peak RSS. Methods run interleaved
(full, lora, qlora, full, ...) because the machine is shared and noisy; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(model_dir: str, method: str, seq_len: int, batch: int, steps: int, r: int) -> dict:
    import torch

    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.lora import num_trainable
    from cubelm.model.hf_io import load_model
    from cubelm.train.batches import IGNORE_INDEX
    from cubelm.train.config import TrainConfig
    from cubelm.train.loop import lm_loss
    from cubelm.train.optim import build_optimizer

    baseline = _rss_mib()
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.float32).train()
    lora = LoraConfig(r=r, lora_alpha=r)
    if method == "lora":
        from cubelm.finetune.lora import apply_lora
        apply_lora(model, lora)
    elif method == "qlora":
        from cubelm.finetune.qlora import apply_qlora
        apply_qlora(model, lora)
    train = TrainConfig(lr=1e-4, min_lr=1e-5, weight_decay=0.0, max_steps=10, warmup_steps=0)
    optimizer = build_optimizer(model, train)  # AdamW over what requires grad, as the trainer builds it
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
    y = x[:, 1:].clone()
    y[:, : seq_len // 2] = IGNORE_INDEX  # the prompt half carries no loss, as in instruct data
    times = []
    for i in range(steps + 1):  # the first step warms up the allocator and kernels
        t0 = time.perf_counter()
        lm_loss(model(x[:, :-1]), y).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return {"method": method, "trainable": num_trainable(model), "total": model.config.num_params(),
            "tokens_per_s": batch * seq_len / statistics.median(times), "peak_rss_mib": _rss_mib(),
            "baseline_rss_mib": baseline}



def save_base(preset: str, seq_len: int, out: Path) -> None:
    from cubelm.model.config import preset as get_preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    cfg = get_preset(preset, max_position_embeddings=max(seq_len, 2048))
    save_model(build_model(cfg, seed=0), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.model_dir, a.child, a.seq_len, a.batch, a.steps, a.lora_r)))
        return
    methods = ["full", "lora", "qlora"]
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        save_base(a.preset, a.seq_len, Path(tmp))
        for rnd in range(a.rounds):
            for method in methods:
                cmd = [sys.executable, __file__, "--child", method, "--model-dir", tmp, "--seq-len", str(a.seq_len),
                       "--batch", str(a.batch), "--steps", str(a.steps), "--lora-r", str(a.lora_r)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(proc.stdout.splitlines()[-1])
                results[method].append(res)
                print(f"round {rnd} {method:5s}: {res['tokens_per_s']:7.0f} tok/s, peak RSS {res['peak_rss_mib']:6.0f} "
                      f"MiB", flush=True)
    report(a, methods, results)


def report(a, methods: list[str], results: dict[str, list[dict]]) -> None:
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k in ("tokens_per_s", "peak_rss_mib",
                                                                       "baseline_rss_mib")} for m in methods}
    from cubelm.systems.host import describe_host, host_info
    print(f"\nhost: {describe_host(host_info())}")
    print(f"preset {a.preset}, {a.batch} x {a.seq_len} tokens per step (loss on the second half), LoRA r={a.lora_r} "
          f"on all 7 projections, {a.rounds} interleaved rounds of {a.steps} timed steps, medians:\n")
    print("| method | trainable parameters (of the base) | tokens/s | peak RSS (MiB) | peak RSS above the start "
          "(MiB) |")
    print("|---|---|---|---|---|")
    growth = {m: med[m]["peak_rss_mib"] - med[m]["baseline_rss_mib"] for m in methods}
    for m in methods:
        first = results[m][0]
        share = 100 * first["trainable"] / first["total"]
        print(f"| {m} | {first['trainable']:,} of {first['total']:,} ({share:.2f}%) | {med[m]['tokens_per_s']:,.0f} "
              f"| {med[m]['peak_rss_mib']:,.0f} | {growth[m]:,.0f} |")
    for m in methods[1:]:
        print(f"\n{m} / full: tokens/s {med[m]['tokens_per_s'] / med['full']['tokens_per_s']:.2f}x, peak RSS above "
              f"the start {growth[m] / growth['full']:.2f}x")


if __name__ == "__main__":
    main()
