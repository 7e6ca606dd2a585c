"""Adaptive batching for embeddings (book §6.1.3): throughput vs batch-1, and the latency it costs, by max delay.

    python benchmarks/embed_batching.py                        # all-minilm-l6-v2, 16 clients, ~1 min
    python benchmarks/embed_batching.py --clients 32 --requests 256 --rounds 3 --delays 0 2 5 10 20

N client threads each send one text at a time (a closed loop: the next request when the last one returned) to
``cubelm.rag.batcher.AdaptiveBatcher`` in this process, the same batcher ``cubelm serve`` runs behind
``/v1/embeddings``. The baseline is the same batcher with ``max_batch_size=1`` (one forward per input, as a
server without batching does). Settings run interleaved in every round (batch-1, delay 0, delay 2, ..., then
again) because the machine is shared; the table shows medians over rounds, and the throughput ratio to batch-1
is taken within each round. Texts are 4-16 words by default (search queries, what an online embedding endpoint
mostly sees); with long passages (``--words 40 200``) an encoder on CPU is compute-bound already at batch 1,
so batching gains less, and padding costs more.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time

WORDS = ("the a vector index query passage model embedding batch token latency throughput server client retrieval "
         "chunk answer python function class module returns list of values sorted by key with optional default "
         "database nearest neighbour search cosine similarity").split()


def make_texts(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def run(embedder, ids: list[list[int]], *, clients: int, max_batch: int, delay_ms: float) -> dict:
    from cubelm.rag.batcher import AdaptiveBatcher
    batcher = AdaptiveBatcher(lambda b, p, w: embedder.embed_ids(b, prompt_lengths=p, pad_to=w),
                              max_tokens=embedder.max_tokens, max_batch_size=max_batch, max_delay_ms=delay_ms)
    latencies: list[float] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        mine = []
        for i in range(k, len(ids), clients):
            t0 = time.perf_counter()
            batcher.embed_sync([ids[i]])
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    batcher.shutdown()
    latencies.sort()
    return {"throughput": len(ids) / elapsed, "p50": latencies[len(latencies) // 2] * 1e3,
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
            "mean_batch": batcher.num_inputs / max(1, batcher.num_forwards)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2", help="embedding model (name or directory)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--requests", type=int, default=128, help="requests (one text each) per setting and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--max-batch", type=int, default=32, help="max_batch_size of the batched settings")
    ap.add_argument("--delays", type=float, nargs="+", default=[0, 2, 5, 10, 20], help="max delays (ms) to compare")
    ap.add_argument("--words", type=int, nargs=2, default=[4, 16], metavar=("MIN", "MAX"),
                    help="words per text, uniform (default: search-query lengths; 40 200 for passages)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()

    import torch

    from cubelm.rag.embedder import load_embedder
    from cubelm.systems.host import describe_host, host_info
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    embedder = load_embedder(args.model)
    ids = embedder.tokenize(make_texts(args.requests, *args.words), truncate=True)
    embedder.embed_ids(ids[:8])  # warm-up
    settings = [("batch-1", 1, 0.0)] + [(f"delay {d:g} ms", args.max_batch, d) for d in args.delays]
    print(f"host: {describe_host(host_info())}")
    print(f"model: {embedder.name} (dim {embedder.dim}); {args.clients} clients x {args.requests} requests "
          f"({statistics.mean(map(len, ids)):.0f} tokens on average), max batch {args.max_batch}, "
          f"{args.rounds} interleaved rounds")
    results: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
    for r in range(args.rounds):
        for name, max_batch, delay in settings:
            results[name].append(run(embedder, ids, clients=args.clients, max_batch=max_batch, delay_ms=delay))
        print(f"  round {r + 1}: " + ", ".join(f"{n} {results[n][-1]['throughput']:.0f}/s" for n, _, _ in settings),
              flush=True)
    base = results["batch-1"]
    print(f"\n{'setting':<14} {'inputs/s':>9} {'x batch-1':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11}")
    for name, _, _ in settings:
        rs = results[name]
        ratio = statistics.median(x["throughput"] / b["throughput"] for x, b in zip(rs, base))
        med = {k: statistics.median(x[k] for x in rs) for k in ("throughput", "p50", "p99", "mean_batch")}
        print(f"{name:<14} {med['throughput']:>9.1f} {ratio:>9.2f}x {med['p50']:>8.1f} {med['p99']:>8.1f} "
              f"{med['mean_batch']:>11.1f}")


if __name__ == "__main__":
    main()
