"""``cubelm bench decode``: decode speed of cubelm's engine alone, against the memory-bandwidth bound of the host.

    cubelm bench decode --model small --rounds 3                # batch-1 decode of a seeded random `small`
    cubelm bench decode --model DIR --batch 8 --json            # an HF directory, 8 sequences, one JSON object

Each round builds the model and a fresh engine, adds ``--batch`` requests of the same ``--prompt-tokens`` seeded
random ids, and times the steps: the prefill (until every request has its first token) and the decode steps after
it (greedy, ``ignore_eos``). Between rounds it measures the read bandwidth, so the bound ``bandwidth / bytes read
per step`` comes from the same minutes as the speed (the machines are shared and noisy). Bytes read per decode
step = every weight once (of an untied input embedding only the rows looked up) + the K/V of the average context.
The greedy token ids of the first round are reported, so runs in other dtypes or other engines can be compared
token for token (``benchmarks/`` holds the side-by-side scripts).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "int8": "int8",
          "int4": "int4"}
QUANTIZED = ("int8", "int4")  # fp32 compute over weight-only int8 / int4 (cubelm.compress.quantize)


@dataclass(slots=True, kw_only=True)
class BenchDecodeOptions:
    model: str = opt("small", help="a preset (seeded random weights: tiny, small, base, ...) or an HF model directory",
                     metavar="PRESET|DIR")
    dtype: str = opt("float32", choices=sorted(DTYPES), help="weights and compute dtype; int8 / int4: weight-only "
                                                             "quantized at load, fp32 compute")
    kv_cache_dtype: str = opt("auto", choices=("auto", "int8"), help="KV-cache storage: auto (the model's dtype) "
                                                                      "or int8 (a scale per token and head)")
    group_size: int = opt(32, help="int4: inputs per weight scale (32, 64 or 128)")
    quantize_head: bool = opt(False, help="int8 / int4: quantize the output head too (as llama.cpp's q8_0 and "
                                          "CTranslate2's int8 do); default: the head stays fp32")
    batch: int = opt(1, help="sequences decoded together (1 = batch-1 decode)")
    prompt_tokens: int = opt(128, help="prompt length in tokens (seeded random ids)")
    new_tokens: int = opt(128, help="tokens generated per sequence")
    rounds: int = opt(3, help="measurements; medians are reported")
    device: str = opt("cpu", help="torch device: cpu, cuda, ...")
    seed: int = opt(0, help="seed of the random weights (presets) and of the prompt ids")
    json: bool = opt(False, help="print one JSON object (host, per-round figures, medians, token ids)")

    def __post_init__(self) -> None:
        for name in ("batch", "prompt_tokens", "new_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise CubelmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise CubelmError("--new-tokens must be >= 2 (the first token comes from the prefill)")
        if DTYPES[self.dtype] == "int4":
            from cubelm.compress.quantize import check_method
            check_method("int4", self.group_size)


def _load(o: BenchDecodeOptions):
    from pathlib import Path

    from cubelm.model.hf_io import load_model, resolve_device
    device, dtype = resolve_device(o.device), DTYPES[o.dtype]
    quantization = dtype if dtype in QUANTIZED else None
    dtype = "float32" if quantization else dtype
    if Path(o.model).is_dir():
        return _quantize(load_model(o.model, device=device, dtype=dtype), quantization, o.group_size,
                         o.quantize_head)
    from cubelm.model.config import preset
    from cubelm.model.transformer import build_model
    try:
        cfg = preset(o.model, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    except (CubelmError, KeyError, ValueError) as e:
        raise CubelmError(f"--model {o.model}: neither a directory nor a preset ({e})") from None
    import torch
    model = build_model(cfg, seed=o.seed).to(device=device, dtype=getattr(torch, dtype))
    return _quantize(model, quantization, o.group_size, o.quantize_head)


def _quantize(model, method: str | None, group_size: int, include_head: bool):
    if method is None:
        return model
    from cubelm.compress.quantized_linear import apply_weight_quantization
    return apply_weight_quantization(model, method, group_size, include_head=include_head)


def bytes_per_step(model, context: float, batch: int, kv_cache_dtype: str = "auto") -> float:
    """Bytes one decode step reads: the weights once, the looked-up embedding rows, and every sequence's K/V.
    Quantized weights (buffers of ``QuantLinear``) count as stored: codes and scales."""
    cfg = model.config
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    weights += sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                   if name.endswith((".qweight", ".scales")))
    embed = model.model.embed_tokens.weight
    if not cfg.tie_word_embeddings:  # the head reads its own matrix; the input table only its looked-up rows
        weights -= embed.numel() * embed.element_size() - batch * embed.shape[1] * embed.element_size()
    from cubelm.systems.memory import kv_cache_bytes_per_token
    kv_dtype = "int8" if kv_cache_dtype == "int8" else str(embed.dtype).removeprefix("torch.")
    return weights + batch * context * kv_cache_bytes_per_token(cfg, kv_dtype)


def prompt_ids(vocab_size: int, num_tokens: int, seed: int) -> list[int]:
    """The seeded random prompt every round uses (ids >= 3 skip the special tokens); ``benchmarks/engine_peers.py``
    feeds the same ids to the other engines."""
    import torch
    return torch.randint(3, vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure_round(model, o: BenchDecodeOptions, **engine_options) -> dict:
    """One timed run of ``o`` on ``model``; ``engine_options`` go to ``EngineConfig`` (benchmarks compare paths)."""
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.params import SamplingParams
    prompt = prompt_ids(model.config.vocab_size, o.prompt_tokens, o.seed)
    engine = LLMEngine(model, None, EngineConfig(
        max_num_seqs=o.batch, max_num_batched_tokens=max(512, o.batch * o.prompt_tokens),
        max_model_len=o.prompt_tokens + o.new_tokens + 16, enable_prefix_caching=False,
        kv_cache_dtype=o.kv_cache_dtype, **engine_options), log=lambda m: None)
    params = SamplingParams(temperature=0, max_tokens=o.new_tokens, ignore_eos=True, output_kind="delta")
    for i in range(o.batch):
        engine.add_request(f"r{i}", prompt, params)
    got = {f"r{i}": [] for i in range(o.batch)}
    t0 = time.perf_counter()
    t_first = None
    decode_steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].extend(out.outputs[0].token_ids)
        if t_first is None:
            if all(got.values()):
                t_first, cpu_first = time.perf_counter(), time.process_time()
        else:
            decode_steps += 1
    t_end, cpu_end = time.perf_counter(), time.process_time()
    if t_first is None or any(len(ids) != o.new_tokens for ids in got.values()):
        raise CubelmError(f"the engine produced {[len(v) for v in got.values()]} tokens, expected {o.new_tokens}")
    decode_s = t_end - t_first
    return {"prefill_s": t_first - t0, "decode_s": decode_s, "decode_steps": decode_steps,
            "decode_tok_s": o.batch * (o.new_tokens - 1) / decode_s, "step_ms": 1e3 * decode_s / decode_steps,
            # CPU seconds of the whole process (all threads) per step: with one thread, immune to time slices lost
            # to other jobs on a shared machine (not to their use of the memory bandwidth)
            "step_cpu_ms": 1e3 * (cpu_end - cpu_first) / decode_steps,
            "token_ids": got["r0"]}


def run_bench_decode(o: BenchDecodeOptions) -> int:
    from cubelm.systems.host import describe_host, host_info, read_bandwidth
    info = host_info()
    rounds, bandwidths, step_bytes = [], [], 0.0
    for _ in range(o.rounds):
        bandwidths.append(read_bandwidth())
        model = _load(o)  # fresh weights each round: the engine lays them out for decode in place
        step_bytes = step_bytes or bytes_per_step(model, o.prompt_tokens + o.new_tokens / 2, o.batch,
                                                  o.kv_cache_dtype)
        num_params = model.config.num_params()
        rounds.append(measure_round(model, o))
    bandwidth = statistics.median(bandwidths)
    step_ms = statistics.median(r["step_ms"] for r in rounds)
    bound_ms = 1e3 * step_bytes / bandwidth
    result = {
        "host": info, "model": o.model, "dtype": DTYPES[o.dtype], "kv_cache_dtype": o.kv_cache_dtype,
        "group_size": o.group_size if DTYPES[o.dtype] == "int4" else None, "device": o.device, "batch": o.batch,
        "prompt_tokens": o.prompt_tokens, "new_tokens": o.new_tokens,
        "params": num_params,
        "rounds": [{k: v for k, v in r.items() if k != "token_ids"} for r in rounds],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rounds),
        "prefill_s": statistics.median(r["prefill_s"] for r in rounds),
        "step_ms": step_ms, "read_bandwidth_gb_s": bandwidth / 1e9, "bytes_per_step": step_bytes,
        "bandwidth_bound_step_ms": bound_ms, "fraction_of_bandwidth_bound": bound_ms / step_ms,
        "greedy_tokens_agree_across_rounds": all(r["token_ids"] == rounds[0]["token_ids"] for r in rounds),
        "token_ids": rounds[0]["token_ids"],
    }
    if o.json:
        print(json.dumps(result))
        return 0
    print(f"host: {describe_host(info)}")
    print(f"{o.model} ({DTYPES[o.dtype]}, KV cache {o.kv_cache_dtype}, {o.device}), batch {o.batch}, "
          f"{o.prompt_tokens} prompt + {o.new_tokens} "
          f"new tokens, {o.rounds} rounds")
    for i, r in enumerate(rounds):
        print(f"  round {i + 1}: decode {r['decode_tok_s']:8.1f} tok/s ({r['step_ms']:.2f} ms/step), prefill "
              f"{r['prefill_s'] * 1e3:.0f} ms; read bandwidth {bandwidths[i] / 1e9:.1f} GB/s")
    print(f"median: decode {result['decode_tok_s']:.1f} tok/s, {step_ms:.2f} ms/step; bandwidth bound "
          f"{bound_ms:.2f} ms/step ({step_bytes / 2**20:.1f} MiB per step at {bandwidth / 1e9:.1f} GB/s): "
          f"{result['fraction_of_bandwidth_bound']:.0%} of the bound")
    if not result["greedy_tokens_agree_across_rounds"]:
        print("warning: greedy tokens differ between rounds", file=sys.stderr)
    return 0
