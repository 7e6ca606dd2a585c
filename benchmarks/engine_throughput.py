"""Offline throughput: cubelm's engine vs Hugging Face transformers ``generate`` with static padded batches.

    python benchmarks/engine_throughput.py --preset base --num-requests 64

Same model (a seeded random init of the preset, saved once in HF format and loaded by both), same precision
(fp32: this CPU has no bf16 hardware), same seeded workload: prompts of 32-512 random tokens, outputs of 32-256
tokens with ``ignore_eos``. transformers runs the requests in arrival order in static batches of
``--hf-batch-size``, left-padded, each batch generating until its longest request is done (that is what static
batching costs); only the requested output tokens count as useful. Reports output tokens/s and the ratio.
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


def run_cubelm(model_dir: str, reqs, *, max_num_seqs: int, max_batched: int, compile_decode: bool = False) -> float:
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    from cubelm.model.hf_io import load_model
    model = load_model(model_dir)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-size", type=int, default=16)
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
        ours = run_cubelm(d, reqs, max_num_seqs=a.max_num_seqs, max_batched=a.max_num_batched_tokens)
        print(f"cubelm engine:        {ours:8.1f} output tokens/s", flush=True)
        if not a.skip_hf:
            hf = run_hf(d, reqs, a.hf_batch_size)
            print(f"transformers (static batches of {a.hf_batch_size}): {hf:8.1f} output tokens/s", flush=True)
            print(f"ratio cubelm / transformers: {ours / hf:.2f}x")


if __name__ == "__main__":
    main()
