"""Multi-LoRA serving throughput: the base model alone vs 1 adapter vs 4 adapters mixed, same run, interleaved.

    python benchmarks/multi_lora.py --preset base --rounds 3
    python benchmarks/multi_lora.py --kernels          # one projection's low-rank delta, four ways

The workload is ``engine_throughput.py``'s (64 requests, prompts of 32-512 random tokens, outputs of 32-256,
``ignore_eos``, greedy) on a seeded random init of the preset, fp32. Adapters: rank 16 on all seven projections
of every layer, random A and B (the cost does not depend on the values). Configurations, each a fresh engine over
a fresh copy of the model:

* ``base``: the engine without LoRA (``enable_lora`` off): what the adapters are measured against;
* ``base, LoRA on``: ``enable_lora`` with no adapter requests (the cost of the wrapped projections alone);
* ``1 adapter``: every request on the same adapter;
* ``4 adapters``: request i on adapter i mod 4, ``max_loras`` 4 (four adapters in every step).

Rounds run the configurations in turn (A B C D A B C D ...), so slow drifts of a shared machine hit all of them;
the script reports each configuration's rounds, the median output tokens/s, and the ratio to ``base``. It also
reports output tokens per CPU-second of the process (``time.process_time``): on a machine shared with other jobs,
wall time measures the neighbours as much as the engine, while CPU time with ``--threads 1`` counts only the work
this process did (with more threads it also counts OpenMP's spin-waiting, so read it with one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import workload  # noqa: E402

CONFIGS = ("base", "base, LoRA on", "1 adapter", "4 adapters")



def make_adapters(model_dir: str, out: Path, count: int, rank: int) -> list[Path]:
    import torch

    from cubelm.finetune.adapter import save_adapter
    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.lora import apply_lora, lora_layers
    from cubelm.model.hf_io import load_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank)
    paths = []
    for i in range(count):
        model = apply_lora(load_model(model_dir), cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.01)
        paths.append(save_adapter(model, cfg, out / f"adapter{i}"))
    return paths


def run(model_dir: str, reqs, config: str, adapters: list[Path], *, rank: int, max_num_seqs: int,
        max_batched: int) -> tuple[float, float]:
    """(output tokens per wall second, per CPU second of this process) of one run of the workload."""
    from cubelm.engine.config import EngineConfig
    from cubelm.engine.llm_engine import LLMEngine
    from cubelm.engine.lora import LoRARequest
    from cubelm.engine.params import SamplingParams
    from cubelm.model.hf_io import load_model
    num_adapters = {"base": 0, "base, LoRA on": 0, "1 adapter": 1, "4 adapters": 4}[config]
    lora = {} if config == "base" else dict(enable_lora=True, max_loras=max(1, num_adapters), max_lora_rank=rank)
    engine = LLMEngine(load_model(model_dir), None, EngineConfig(
        kv_cache_memory="4GiB", max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched, **lora),
        log=lambda m: None)
    loras = [LoRARequest(f"a{i}", str(p)) for i, p in enumerate(adapters[:num_adapters])]
    for lr in loras:  # read the adapters before the clock starts (a server loads them at startup)
        engine.lora_manager.resolve(lr)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, (prompt, olen) in enumerate(reqs):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True),
                           lora_request=loras[i % len(loras)] if loras else None)
    produced = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                produced += len(out.outputs[0].token_ids)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert produced == sum(o for _, o in reqs)
    return produced / dt, produced / cpu


def kernels(rank: int, slots: int, repeats: int = 100) -> None:
    """One projection's low-rank delta for rows spread over ``slots`` adapters, four ways: grouped by slot in
    PyTorch (rows sorted by slot, two GEMMs per segment), the native kernel (``kernels/lora_delta.c``: every
    segment in one call), gathered per row (BGMV in PyTorch: each row's A and B gathered, two bmm), and the base
    projection's own GEMM for scale. Median microseconds per call."""
    import torch

    from cubelm.engine.kernels import lora_delta

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    for k, n in ((768, 768), (768, 2048)):
        at, bt = torch.randn(slots, k, rank) * 0.1, torch.randn(slots, rank, n) * 0.1
        w = torch.randn(n, k)
        for rows in (1, 4, 16, 64, 256, 1024):
            x, y = torch.randn(rows, k), torch.zeros(rows, n)
            slot = torch.arange(rows) * slots // rows  # sorted: contiguous segments, as the runner orders rows
            segments = [(s, int((slot < s).sum()), int((slot <= s).sum())) for s in range(slots) if (slot == s).any()]
            seg_t, ranks = torch.tensor(segments, dtype=torch.int64), torch.full((slots,), rank, dtype=torch.int64)

            def grouped():
                for s, lo, hi in segments:
                    y[lo:hi].addmm_(x[lo:hi] @ at[s], bt[s])

            def gathered():
                y.add_(torch.bmm(torch.bmm(x.unsqueeze(1), at[slot]), bt[slot]).squeeze(1))

            ways = {"base GEMM": lambda: torch.mm(x, w.T), "grouped": grouped, "gathered": gathered}
            if lora_delta.supports(x):
                ways["kernel"] = lambda: lora_delta.lora_delta(x, y, at, bt, seg_t, ranks)
            print(f"{k}->{n}, rows {rows:4d}, {len(segments)} adapters, r {rank}: " + ", ".join(
                f"{name} {timed(fn):7.1f}" for name, fn in ways.items()) + " us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--kernels", action="store_true", help="only the low-rank product micro-benchmark")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the cores)")
    a = ap.parse_args()
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    from cubelm.systems.host import describe_host, host_info
    print(f"host: {describe_host(host_info())}", flush=True)
    if a.kernels:
        kernels(a.rank, 4)
        return

    from cubelm.model.config import preset
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    cfg = preset(a.preset, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    reqs = workload(a.num_requests, cfg.vocab_size, a.seed)
    with tempfile.TemporaryDirectory() as d:
        model_dir = str(Path(d) / "model")
        save_model(build_model(cfg, seed=a.seed), model_dir)
        adapters = make_adapters(model_dir, Path(d), 4, a.rank)
        print(f"preset {a.preset} ({cfg.num_params():,} params, fp32), {len(reqs)} requests, "
              f"{sum(len(p) for p, _ in reqs):,} prompt + {sum(o for _, o in reqs):,} output tokens; adapters: "
              f"r={a.rank} on all 7 projections", flush=True)
        wall: dict[str, list[float]] = {c: [] for c in a.configs}
        cpu: dict[str, list[float]] = {c: [] for c in a.configs}
        for r in range(a.rounds):
            for config in a.configs:
                tps, per_cpu = run(model_dir, reqs, config, adapters, rank=a.rank, max_num_seqs=a.max_num_seqs,
                                   max_batched=a.max_num_batched_tokens)
                wall[config].append(tps)
                cpu[config].append(per_cpu)
                print(f"round {r + 1} {config:14s} {tps:8.1f} output tokens/s, {per_cpu:8.1f} per CPU-second",
                      flush=True)
    for title, results in (("output tokens/s (wall)", wall), ("output tokens per CPU-second", cpu)):
        table(title, results)


def table(title: str, results: dict[str, list[float]]) -> None:
    base = statistics.median(results["base"]) if "base" in results else None
    print(f"\n| configuration | rounds: {title} | median | vs base |\n|---|---|---|---|")
    for config, values in results.items():
        med = statistics.median(values)
        ratio = f"{med / base:.3f} ({base / med - 1:+.1%} time)" if base else "-"
        print(f"| {config} | {', '.join(f'{v:.1f}' for v in values)} | {med:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
