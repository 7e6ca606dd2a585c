"""Peak memory of a training step: full fine-tuning vs LoRA vs QLoRA, measured, next to ``cubelm plan``'s prediction.

    python benchmarks/qlora_memory.py --presets small base --seq-len 256 --batch 4 --rank 8 --steps 3

Each (preset, mode, allocator setting) runs in a fresh subprocess, so its peak resident set belongs to that setting
alone. The child first trains one step of a tiny model in the same mode (so the kernels, thread pools and library
pages a step touches are resident), frees it and records its RSS: the runtime baseline (interpreter + torch +
cubelm, ~300 MiB), which no plan counts. Then it builds the preset in fp32 (seeded), applies the mode (full:
everything trains; lora: ``apply_lora``; qlora: ``apply_qlora``, which quantizes the projections to NF4 and frees
their fp32 weights), releases freed heap to the OS (``malloc_trim``), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` = 5), runs ``--steps`` AdamW steps on random tokens and reads ``VmHWM``. The build-time
peak (the fp32 model before quantization) is thereby left out: the planner describes the steady state of training,
and that is what the step peak measures. Every setting runs twice: with glibc's default allocator behaviour, and
with a fixed mmap threshold so that freed tensors leave the process at once (see ``ALLOCATORS``).

The planner's numbers come from ``cubelm.systems.plan.plan_memory`` with the same preset, dtype (float32), context,
batch and LoRA rank (``cubelm plan --model PRESET --mode MODE --dtype float32 --context S --batch B --lora-rank R``):
weights + adapters + gradients + AdamW moments + activations saved for backward. ``tensors held`` is the bytes of
the model's parameters and buffers as built, a direct check of the planner's weight lines.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys

MODES = ("full", "lora", "qlora")
MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _release_and_reset_peak() -> bool:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    from flash_attention import reset_peak_rss  # benchmarks/ is the script's directory, first on sys.path
    return reset_peak_rss()


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _build(preset: str, mode: str, rank: int, seq_len: int, **overrides):
    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.lora import apply_lora
    from cubelm.finetune.qlora import apply_qlora
    from cubelm.model.config import preset as get_preset
    from cubelm.model.transformer import build_model

    cfg = get_preset(preset, max_position_embeddings=max(seq_len, 2048), **overrides)
    model = build_model(cfg, seed=0).train()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank)
    if mode == "lora":
        apply_lora(model, lora)
    elif mode == "qlora":
        apply_qlora(model, lora)
    return cfg, model


def _train(model, cfg, seq_len: int, batch: int, steps: int) -> None:
    import torch

    from cubelm.train.loop import lm_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(preset: str, mode: str, seq_len: int, batch: int, rank: int, steps: int) -> dict:
    from cubelm.finetune.lora import num_trainable

    # Warm-up: one step of a tiny model in the same mode touches the same kernels, thread pools and library
    # pages; what stays resident afterwards is the runtime baseline, which no plan counts.
    tiny_cfg, tiny = _build(preset, mode, rank, seq_len, vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    _train(tiny, tiny_cfg, seq_len, batch, 1)
    del tiny
    _release_and_reset_peak()
    baseline = _status_kib("VmRSS") * 1024
    cfg, model = _build(preset, mode, rank, seq_len)
    held = _tensor_bytes(model)
    reset = _release_and_reset_peak()
    setup = _status_kib("VmRSS") * 1024
    _train(model, cfg, seq_len, batch, steps)
    peak = _status_kib("VmHWM") * 1024
    return {"preset": preset, "mode": mode, "trainable": num_trainable(model), "tensors_held": held,
            "baseline_rss": baseline, "setup_rss": setup, "peak_rss": peak, "peak_reset": reset}


def predicted(preset: str, mode: str, seq_len: int, batch: int, rank: int) -> dict:
    from cubelm.model.config import preset as get_preset
    from cubelm.systems.plan import plan_memory

    cfg = get_preset(preset, max_position_embeddings=max(seq_len, 2048))
    plan = plan_memory(cfg, model=preset, mode=mode, dtype="float32", context=seq_len, batch=batch, lora_rank=rank)
    s = plan.states
    return {"weights": s.weights + s.adapter_weights, "states": s.total, "activations": plan.activation_total,
            "total": plan.total}


# glibc keeps freed heap memory for reuse, and raises its mmap threshold (up to 32 MiB) each time a large block is
# freed, so freed activations can stay resident; a fixed threshold makes every tensor of 128 KiB or more its own
# mapping, returned to the OS on free, and RSS then follows the live tensors the planner counts.
ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(*a.child, a.seq_len, a.batch, a.rank, a.steps)))
        return
    rows = []
    for preset in a.presets:
        for mode in a.modes:
            row = predicted(preset, mode, a.seq_len, a.batch, a.rank)
            for label, env in ALLOCATORS.items():
                out = subprocess.run([sys.executable, __file__, "--child", preset, mode, "--seq-len", str(a.seq_len),
                                      "--batch", str(a.batch), "--rank", str(a.rank), "--steps", str(a.steps)],
                                     capture_output=True, text=True, check=True, env={**os.environ, **env})
                m = json.loads(out.stdout.strip().splitlines()[-1])
                row |= {k: m[k] for k in ("preset", "mode", "trainable", "tensors_held")}
                row[label] = m
                print(f"{preset:6s} {mode:5s} {label:24s}: planned {row['total'] / MIB:6.0f} MiB, peak - baseline "
                      f"{(m['peak_rss'] - m['baseline_rss']) / MIB:6.0f} MiB (baseline {m['baseline_rss'] / MIB:.0f})"
                      + ("" if m["peak_reset"] else " (peak counter NOT reset: includes the build)"), flush=True)
            rows.append(row)
    print(f"\nfp32, AdamW, {a.batch} × {a.seq_len} tokens per step, LoRA/QLoRA rank {a.rank} on all 7 projections, "
          f"{a.steps} steps; MiB; measured = peak RSS − warm runtime baseline")
    labels = list(ALLOCATORS)
    print("| preset | mode | trainable params | planned weights (+adapters) | tensors held | planned states | "
          "planned activations | planned total | runtime baseline | "
          + " | ".join(f"measured, {label} | ÷ planned" for label in labels) + " |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(labels))
    for r in rows:
        cells = []
        for label in labels:
            used = r[label]["peak_rss"] - r[label]["baseline_rss"]
            cells += [f"{used / MIB:,.0f}", f"{used / r['total']:.2f}"]
        print(f"| {r['preset']} | {r['mode']} | {r['trainable']:,} | {r['weights'] / MIB:,.1f} | "
              f"{r['tensors_held'] / MIB:,.1f} | {r['states'] / MIB:,.0f} | {r['activations'] / MIB:,.0f} | "
              f"{r['total'] / MIB:,.0f} | {r[labels[0]]['baseline_rss'] / MIB:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
