"""Batch-1 decode speed as a fraction of the memory-bandwidth limit, measured in one run.

    python benchmarks/decode_bandwidth.py --presets small base --rounds 3 [--with-hf] [--compile]

Decoding one token reads every weight once (plus the KV cache, small here; of an untied input embedding table only
one row), so on a memory-bound machine the ceiling is ``bandwidth / bytes read per token``. The script measures read bandwidth (a large fp32 ``sum``) in the
same process, then batch-1 decode tokens/s of cubelm's paged engine, of the reference generator (contiguous
cache) and optionally of transformers and of the engine with ``torch.compile``; runs are interleaved across
rounds and medians reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cubelm.systems.host import read_bandwidth


def engine_decode(model, prompt, new_tokens, compile_model=False) -> float:
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="256MiB", max_num_seqs=4,
                                                 compile_decode=compile_model), log=lambda m: None)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=new_tokens + 8, ignore_eos=True))
    for _ in range(8):  # prefill + warm-up decodes (and compilation)
        engine.step()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        engine.step()
    return new_tokens / (time.perf_counter() - t0)


def reference_decode(model, prompt, new_tokens) -> float:
    from cubelm.engine.params import SamplingParams
    from cubelm.engine.reference import generate_tokens
    it = generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True))
    next(it)  # prefill
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t0)


def hf_decode(model_dir, prompt, new_tokens) -> float:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        hf.generate(ids, do_sample=False, max_tokens=1, min_new_tokens=1, pad_token_id=0)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(ids, do_sample=False, max_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                    pad_token_id=0)
    return new_tokens / (time.perf_counter() - t0 - t_prefill)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--with-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also measure the engine with torch.compile")
    a = ap.parse_args()
    import tempfile

    from cubelm.model.config import preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    print(f"threads: {torch.get_num_threads()}")
    rows = []
    for name in a.presets:
        cfg = preset(name, eos_token_id=2, pad_token_id=0)
        model = build_model(cfg, seed=0).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if not cfg.tie_word_embeddings:  # decode reads one row of the input embedding table, not all of it
            weight_bytes -= (cfg.vocab_size - 1) * cfg.hidden_size * 4
        prompt = list(range(10, 42))
        ctx = len(prompt) + a.new_tokens / 2
        kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * ctx
        results = {k: [] for k in ("bandwidth", "engine", "reference", "hf", "engine+compile")}
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d)
            for _ in range(a.rounds):  # interleaved: A B C A B C ...
                results["bandwidth"].append(read_bandwidth(reps=7))
                results["engine"].append(engine_decode(model, prompt, a.new_tokens))
                results["reference"].append(reference_decode(model, prompt, a.new_tokens))
                if a.with_hf:
                    results["hf"].append(hf_decode(d, prompt, a.new_tokens))
                if a.compile:
                    results["engine+compile"].append(engine_decode(model, prompt, a.new_tokens, compile_model=True))
        bw = statistics.median(results["bandwidth"])
        limit = bw / (weight_bytes + kv_bytes)
        print(f"\n{name}: {cfg.num_params():,} params, {weight_bytes / 1e6:.0f} MB of fp32 weights read + ~{kv_bytes / 1e6:.1f} "
              f"MB KV per token; read bandwidth {bw / 1e9:.1f} GB/s -> limit {limit:.1f} tokens/s")
        for k in ("engine", "engine+compile", "reference", "hf"):
            if results[k]:
                tps = statistics.median(results[k])
                print(f"  {k:15s} {tps:8.1f} tokens/s = {tps / limit:6.1%} of the bandwidth limit")
                rows.append((name, k, tps, tps / limit))
    print("\n| preset | path | tokens/s | fraction of bandwidth limit |\n|---|---|---|---|")
    for name, k, tps, frac in rows:
        print(f"| {name} | {k} | {tps:.1f} | {frac:.0%} |")


if __name__ == "__main__":
    main()
