"""The int8 KV cache (``kv_cache_dtype="int8"``) against the model-dtype pool: capacity, quality, decode speed.

    python benchmarks/kv_cache_int8.py --model ~/.cache/cubelm/models/default --speed-model small \
        --prompt-tokens 1024 --new-tokens 64 --rounds 5 [--threads 1]

1. capacity: tokens per GiB of pool from the engine's planner (``plan_pool``), fp32 / bf16 vs int8, for the
   given model and a few presets.
2. quality: ``cubelm eval bpb`` scores the model's plain forward, which keeps no KV cache, so it cannot see the
   int8 pool. Here the same held-out windows (package:tqdm, 256-token windows after EOS, as ``cubelm eval bpb``)
   run through the engine's ``ModelRunner`` one token per step, every row a decode that reads its whole context
   from the paged pool (the native kernel when available): bits per byte with the fp32 pool and with the int8
   pool, stepped in lockstep on the same inputs, plus the top-1 agreement and the mean / max |logit difference|
   of the two at every position. The fp32 figure must equal ``cubelm eval bpb``'s (a check of this harness).
3. speed: batch-1 decode of a seeded random ``--speed-model`` after a long prompt, ``cubelm bench decode``'s
   measurement (``cubelm.engine.bench.measure_round``), auto and int8 interleaved (A B A B), medians and ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def capacity(model_dir: str | None, presets: list[str]) -> list[dict]:
    from cubelm.engine.config import EngineConfig, plan_pool
    from cubelm.model.config import ModelConfig, preset
    configs = [(name, preset(name)) for name in presets]
    if model_dir:
        hf_config = json.loads((Path(model_dir) / "config.json").read_text())
        configs.insert(0, (Path(model_dir).name, ModelConfig.from_hf_dict(hf_config)))
    rows = []
    for name, cfg in configs:
        for dtype in (torch.float32, torch.bfloat16):
            param = torch.zeros(1, dtype=dtype)
            tokens = {}
            for kv in ("auto", "int8"):
                plan = plan_pool(cfg, EngineConfig(kv_cache_memory="1GiB", max_num_seqs=10**9, kv_cache_dtype=kv),
                                 param, cfg.max_position_embeddings)
                tokens[kv] = plan.num_tokens
            rows.append({"model": name, "model_dtype": str(dtype).removeprefix("torch."), "head_dim": cfg.head_dim,
                         "tokens_per_gib_auto": tokens["auto"], "tokens_per_gib_int8": tokens["int8"],
                         "ratio": tokens["int8"] / tokens["auto"]})
    return rows


def _windows(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """``cubelm.eval.bpb.model_bpb``'s windows: each document after EOS, ``context`` predicted tokens each."""
    out = []
    for text in texts:
        ids = [tokenizer.eos_token_id] + tokenizer.encode(text)
        for start in range(0, len(ids) - 1, context):
            out.append(ids[start:start + context + 1])
    return out


class _Row:
    """What ``ModelRunner.prepare`` reads of a sequence: its tokens and its block table."""

    def __init__(self, token_ids: list[int], block_table: list[int]):
        self.token_ids, self.block_table = token_ids, block_table


@torch.inference_mode()
def quality(model_dir: str, source: str, max_bytes: int, context: int, batch: int) -> dict:
    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.engine.decode_layout import apply_decode_layout
    from cubelm.engine.runner import ModelRunner
    from cubelm.eval.bpb import bits_per_byte, held_out_package, held_out_path, model_bpb
    from cubelm.model.hf_io import load_model
    held = (held_out_package(source.removeprefix("package:"), max_bytes) if source.startswith("package:")
            else held_out_path(source, max_bytes))
    tokenizer = load_tokenizer(model_dir)
    plain = load_model(model_dir)
    reference_bpb = model_bpb(plain, tokenizer, held.texts, context=context)  # = cubelm eval bpb
    model = copy.deepcopy(plain)
    apply_decode_layout(model)  # as the engine runs it
    windows = _windows(tokenizer, held.texts, context)
    bs = 16
    per_row = -(-(context + 1) // bs)
    runners = {kv: ModelRunner(model, batch * per_row, bs, kv_cache_dtype=kv) for kv in ("auto", "int8")}
    nats = {"auto": 0.0, "int8": 0.0}
    positions = agree = 0
    abs_diff_sum, abs_diff_max = 0.0, 0.0
    for first in range(0, len(windows), batch):
        group = windows[first:first + batch]
        rows = [_Row(w, list(range(i * per_row, (i + 1) * per_row))) for i, w in enumerate(group)]
        for t in range(max(len(w) for w in group) - 1):
            active = [r for r in rows if len(r.token_ids) - 1 > t]
            targets = torch.tensor([r.token_ids[t + 1] for r in active])
            logits = {}
            for kv, runner in runners.items():  # same inputs, each reading its own pool
                out, _ = runner.run(active, [1] * len(active), starts=[t] * len(active))
                logits[kv] = out.float()
                nats[kv] += float(F.cross_entropy(logits[kv], targets, reduction="sum"))
            diff = (logits["auto"] - logits["int8"]).abs()
            abs_diff_sum += float(diff.mean(-1).sum())
            abs_diff_max = max(abs_diff_max, float(diff.max()))
            agree += int((logits["auto"].argmax(-1) == logits["int8"].argmax(-1)).sum())
            positions += len(active)
    bpb = {kv: bits_per_byte(n, held.num_bytes) for kv, n in nats.items()}
    return {"held_out": held.name, "num_bytes": held.num_bytes, "positions": positions,
            "eval_bpb_plain_forward": reference_bpb, "engine_bpb_auto": bpb["auto"], "engine_bpb_int8": bpb["int8"],
            "delta_bpb_percent": 100 * (bpb["int8"] - bpb["auto"]) / bpb["auto"],
            "top1_agreement": agree / positions, "mean_abs_logit_diff": abs_diff_sum / positions,
            "max_abs_logit_diff": abs_diff_max}


def speed(model: str, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    from cubelm.engine.bench import BenchDecodeOptions, _load, measure_round
    results: dict[str, list[dict]] = {"auto": [], "int8": []}
    for _ in range(rounds):
        for kv in ("auto", "int8"):  # interleaved: the machine is shared and noisy
            o = BenchDecodeOptions(model=model, prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=1,
                                   kv_cache_dtype=kv)
            results[kv].append(measure_round(_load(o), o))
            print(f"  {kv:>4}: {results[kv][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    med = {kv: statistics.median(r["decode_tok_s"] for r in rs) for kv, rs in results.items()}
    same = sum(a == b for a, b in zip(results["auto"][0]["token_ids"], results["int8"][0]["token_ids"]))
    return {"model": model, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": rounds,
            "decode_tok_s": {kv: [r["decode_tok_s"] for r in rs] for kv, rs in results.items()},
            "median_tok_s_auto": med["auto"], "median_tok_s_int8": med["int8"], "ratio": med["int8"] / med["auto"],
            "greedy_tokens_equal": f"{same}/{new_tokens}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory for capacity and quality (the default model)")
    ap.add_argument("--presets", default="small,base,llama-3-8b", help="presets for the capacity table")
    ap.add_argument("--source", default="package:tqdm", help="held-out text, as cubelm eval bpb --source")
    ap.add_argument("--max-bytes", type=int, default=200_000, help="held-out bytes (cubelm eval bpb's default)")
    ap.add_argument("--context", type=int, default=256, help="tokens per scoring window")
    ap.add_argument("--batch", type=int, default=64, help="windows decoded together in the quality run")
    ap.add_argument("--speed-model", default="small", help="preset or directory for the decode-speed rounds")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch (and kernel) threads; 1 on a shared machine, "
                    "where a 2-thread OpenMP region stalls whenever a neighbour holds the other core")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: capacity,quality,speed")
    args = ap.parse_args()
    from cubelm.systems.host import describe_host, host_info
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"host": describe_host(host_info())}
    print(f"host: {report['host']}")
    if "capacity" not in skip:
        report["capacity"] = capacity(args.model, args.presets.split(","))
        for r in report["capacity"]:
            print(f"capacity {r['model']:>12} {r['model_dtype']:>8} (head_dim {r['head_dim']}): "
                  f"{r['tokens_per_gib_auto']:>9,} tokens/GiB -> int8 {r['tokens_per_gib_int8']:>9,} "
                  f"({r['ratio']:.2f}x)")
    if "quality" not in skip and args.model:
        q = report["quality"] = quality(args.model, args.source, args.max_bytes, args.context, args.batch)
        print(f"quality on {q['held_out']} ({q['num_bytes']:,} bytes, {q['positions']:,} positions): eval bpb "
              f"{q['eval_bpb_plain_forward']:.4f}; engine decode bpb auto {q['engine_bpb_auto']:.4f}, int8 "
              f"{q['engine_bpb_int8']:.4f} ({q['delta_bpb_percent']:+.3f}%); top-1 agreement "
              f"{q['top1_agreement']:.4%}; |logit diff| mean {q['mean_abs_logit_diff']:.4f}, max "
              f"{q['max_abs_logit_diff']:.3f}")
    if "speed" not in skip:
        s = report["speed"] = speed(args.speed_model, args.prompt_tokens, args.new_tokens, args.rounds)
        print(f"speed {s['model']} batch 1, {s['prompt_tokens']} + {s['new_tokens']} tokens, {s['rounds']} "
              f"interleaved rounds: auto {s['median_tok_s_auto']:.1f} tok/s, int8 {s['median_tok_s_int8']:.1f} "
              f"tok/s ({s['ratio']:.2f}x); greedy tokens equal {s['greedy_tokens_equal']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
