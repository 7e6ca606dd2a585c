"""Offline throughput: cubelm's engine vs Hugging Face transformers ``generate`` with static padded batches.

    python benchmarks/engine_throughput.py --preset base --num-requests 64

Same model (a seeded random init of the preset, saved once in HF format and loaded by both), same precision
(fp32: this CPU has no bf16 hardware), same seeded workload: prompts of 32-512 random tokens, outputs of 32-256
tokens with ``ignore_eos``. transformers runs the requests in arrival order in static batches of
``--hf-batch-size``, left-padded, each batch generating until its longest request is done (that is what static
batching costs); only the requested output tokens count as useful. Reports output tokens/s and the ratio.

It also prints the compute bound: the workload's own FLOPs (no padding: the least any engine must do) at the fp32
GEMM peak measured in the same run. No engine can beat it in fp32, so ``bound / transformers`` is the largest
ratio this machine allows.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time


def workload(n: int, vocab: int, seed: int, prompt_range=(32, 512), out_range=(32, 256)):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen, olen = rng.randint(*prompt_range), rng.randint(*out_range)
        reqs.append(([rng.randrange(3, vocab) for _ in range(plen)], olen))
    return reqs


def run_cubelm(model_dir: str, reqs, *, max_num_seqs: int, max_batched: int, dtype: str = "float32",
               outputs: dict | None = None) -> float:
    """Output tokens/s of the whole workload; ``outputs`` (if given) receives each request's token ids by index."""
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    from cubelm.model.hf_io import load_model
    model = load_model(model_dir, dtype=dtype)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="4GiB", max_num_seqs=max_num_seqs,
                                                 max_num_batched_tokens=max_batched), log=lambda m: None)
    t0 = time.perf_counter()
    for i, (prompt, olen) in enumerate(reqs):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True))
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                produced += len(out.outputs[0].token_ids)
                if outputs is not None:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    assert produced == sum(o for _, o in reqs)
    return produced / dt


def run_hf(model_dir: str, reqs, batch_size: int) -> float:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    t0 = time.perf_counter()
    for b in range(0, len(reqs), batch_size):
        batch = reqs[b:b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, _) in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = max(o for _, o in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=pad)
    dt = time.perf_counter() - t0
    return sum(o for _, o in reqs) / dt


def workload_flops(cfg, reqs) -> tuple[float, float]:
    """(prefill, decode) FLOPs of the work itself: 2 x matmul parameters per token (no output head on prompt
    positions, which are never sampled; the head on every output token) + attention (QK^T and PV: 4 x context x
    heads x head_dim per token per layer). No padding, no recomputation: a lower bound for any engine."""
    h, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * cfg.intermediate_size
    body, head = layers * per_layer, h * cfg.vocab_size
    attn = lambda ctx: 4 * ctx * cfg.num_attention_heads * hd * layers
    prefill = decode = 0.0
    for prompt, out in reqs:
        n = len(prompt)
        prefill += 2 * body * n + sum(attn(i + 1) for i in range(n))
        decode += 2 * (body + head) * out + sum(attn(n + i + 1) for i in range(out))
    return prefill, decode


def gemm_peak(seconds: float = 3.0) -> float:
    """Median fp32 GFLOP/s of a 2048^3 matmul: the machine's compute roof, measured now (noisy hosts drift)."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / sorted(times)[len(times) // 2] / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, nargs="+", default=[16],
                    help="one or more static batch sizes for transformers (each is a separate timed run)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    a = ap.parse_args()

    import torch

    from cubelm.model.config import preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    cfg = preset(a.preset, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    reqs = workload(a.num_requests, cfg.vocab_size, a.seed)
    with tempfile.TemporaryDirectory() as d:
        save_model(build_model(cfg, seed=a.seed), d)
        print(f"preset {a.preset} ({cfg.num_params():,} params, fp32, {torch.get_num_threads()} threads), "
              f"{len(reqs)} requests, {sum(len(p) for p, _ in reqs):,} prompt + {sum(o for _, o in reqs):,} output "
              f"tokens", flush=True)
        peak = gemm_peak()
        prefill, decode = workload_flops(cfg, reqs)
        useful = sum(o for _, o in reqs)
        bound = useful / ((prefill + decode) / (peak * 1e9))
        print(f"work: prefill {prefill / 1e12:.2f} + decode {decode / 1e12:.2f} TFLOP; fp32 GEMM peak now "
              f"{peak:.0f} GFLOP/s -> compute bound {bound:.1f} output tokens/s", flush=True)
        ours = run_cubelm(d, reqs, max_num_seqs=a.max_num_seqs, max_batched=a.max_num_batched_tokens)
        print(f"cubelm engine:        {ours:8.1f} output tokens/s ({ours / bound:.0%} of the compute bound, "
              f"{(prefill + decode) / (useful / ours) / 1e9:.0f} useful GFLOP/s)", flush=True)
        for bsz in ([] if a.skip_hf else a.hf_batch_size):
            hf = run_hf(d, reqs, bsz)
            print(f"transformers (static batches of {bsz}): {hf:8.1f} output tokens/s ({hf / bound:.0%} of the bound)"
                  f"; ratio cubelm / transformers {ours / hf:.2f}x; the compute bound is {bound / hf:.2f}x "
                  f"transformers", flush=True)

if __name__ == "__main__":
    main()
