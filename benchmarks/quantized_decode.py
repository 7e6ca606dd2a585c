"""Batch-1 decode of cubelm's engine with fp32 vs weight-only int8 vs int4 weights, interleaved in one run.

    PYTHONPATH=src python benchmarks/quantized_decode.py --presets small base --rounds 3 [--group-size 32]

Per preset: one seeded random model is built once; each round deep-copies it, quantizes the copy (int8 / int4, or
not), builds a fresh engine and times the decode steps after the prefill (``cubelm.engine.bench.measure_round``,
the same measurement as ``cubelm bench decode``). Rounds go fp32, int8, int4, fp32, int8, int4, ... so the three
see the same machine state; medians and ratios to fp32 are printed with the host's ISA, plus how many greedy
tokens each quantized model shares with fp32 before the first difference (random weights: a quality hint only;
the quality figure is ``cubelm eval bpb`` on the default model, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from cubelm.compress.quantized_linear import apply_weight_quantization
from cubelm.engine.bench import BenchDecodeOptions, bytes_per_step, measure_round
from cubelm.model.config import preset
from cubelm.model.transformer import build_model
from cubelm.systems.host import describe_host, host_info


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_preset(name: str, args) -> None:
    cfg = preset(name, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    base = build_model(cfg, seed=0).eval()
    o = BenchDecodeOptions(model=name, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    kinds = [("fp32", None), ("int8", None), ("int4", args.group_size)]
    results = {k: [] for k, _ in kinds}
    cpu_ms = {k: [] for k, _ in kinds}
    tokens, step_bytes = {}, {}
    for _ in range(args.rounds):
        for kind, group in kinds:
            model = copy.deepcopy(base)
            if kind != "fp32":
                apply_weight_quantization(model, kind, group, include_head=args.include_head)
            step_bytes[kind] = bytes_per_step(model, o.prompt_tokens + o.new_tokens / 2, 1)
            r = measure_round(model, o)
            results[kind].append(r["decode_tok_s"])
            cpu_ms[kind].append(r["step_cpu_ms"])
            tokens.setdefault(kind, r["token_ids"])
            del model
    fp32, fp32_cpu = statistics.median(results["fp32"]), statistics.median(cpu_ms["fp32"])
    print(f"{name} ({cfg.num_params() / 1e6:.1f}M params), batch 1, {o.prompt_tokens} prompt + {o.new_tokens} new "
          f"tokens, {args.rounds} interleaved rounds, output head {'quantized' if args.include_head else 'fp32'}")
    for kind, group in kinds:
        med = statistics.median(results[kind])
        label = f"{kind} g={group}" if group else kind
        same = common_prefix(tokens[kind], tokens["fp32"])
        cpu = statistics.median(cpu_ms[kind])
        print(f"  {label:10s} {med:8.1f} tok/s  x{med / fp32:.2f} vs fp32; CPU time {cpu:6.2f} ms/step, "
              f"x{fp32_cpu / cpu:.2f} vs fp32  ({step_bytes[kind] / 2**20:7.1f} MiB read "
              f"per step; rounds {', '.join(f'{v:.1f}' for v in results[kind])}; greedy tokens equal to fp32's: "
              f"first {same} of {len(tokens['fp32'])})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "base"], help="model presets (seeded random weights)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per kind; medians are reported")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (seeded random ids)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated")
    p.add_argument("--include-head", action="store_true", help="quantize the output head too")
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's); 1 keeps "
                   "OpenMP barriers out of the figures on a machine shared with other jobs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"host: {describe_host(host_info())}; torch threads {torch.get_num_threads()}")
    for name in args.presets:
        run_preset(name, args)


if __name__ == "__main__":
    main()
