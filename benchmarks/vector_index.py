"""Vector index types of the embedded store side by side: build time, index size, query latency, recall@10.

    python benchmarks/vector_index.py --n 100000 --dim 384 --queries 200 --rounds 3 --threads 1

Data: ``n`` clustered random unit vectors (``--clusters`` Gaussian blobs, noise as large as the spread of the
centres, so neighbours are not trivially one blob) and held-out queries from the same blobs. Every index type is
built once through ``cubelm.rag.store`` (build time includes IVF-PQ / SQ8 training); queries then run one at a
time (batch 1, k=10, through ``store.search``: faiss + rescoring + SQLite rows; one query runs on one faiss
thread, see ``cubelm.rag.faiss_index``) in interleaved rounds (flat, hnsw, ivfpq, sq8, binary, flat, ...)
because the machine is shared; latency is the median over rounds of each round's median, p99 over all queries.
Recall@10 is against the exact (flat) neighbours. Size: the serialized faiss index (the float vectors stored
in SQLite for rescoring and rebuilds come on top: n x dim x 4 bytes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

KINDS = ("flat", "hnsw", "ivfpq", "sq8", "binary")


def clustered(n, dim, clusters, rng):
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads for builds (0 = faiss' default)")
    a = ap.parse_args()

    import faiss
    if a.threads:
        faiss.omp_set_num_threads(a.threads)

    from cubelm.rag.store import open_store
    from cubelm.systems.host import describe_host, host_info

    print(f"host: {describe_host(host_info())}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    rng = np.random.default_rng(0)
    x = clustered(a.n + a.queries, a.dim, a.clusters, rng)
    x, q = x[:a.n], x[a.n:]
    ids = [str(i) for i in range(a.n)]
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    kinds = a.kinds.split(",")
    stores, build_s, size = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            t0 = time.perf_counter()
            store = open_store(f"{tmp}/{kind}", dim=a.dim, index=kind)
            store.add(ids, x)
            store.search(q[:1], 10)  # trains IVF-PQ / SQ8 on everything added
            build_s[kind] = time.perf_counter() - t0
            size[kind] = len(store.index.to_bytes())
            stores[kind] = store
            print(f"built {kind:6s} in {build_s[kind]:.1f} s ({store.index.spec})", flush=True)
        lat = {k: [] for k in kinds}
        round_medians = {k: [] for k in kinds}
        recall = {}
        for _ in range(a.rounds):
            for kind in kinds:
                times, found = [], []
                for qi in q:
                    t0 = time.perf_counter()
                    hits = stores[kind].search(qi, 10)[0]
                    times.append(time.perf_counter() - t0)
                    found.append([int(h.id) for h in hits])
                lat[kind] += times
                round_medians[kind].append(statistics.median(times))
                recall[kind] = np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth)])
    flat_ms = statistics.median(round_medians[kinds[0]]) * 1e3
    print(f"\nn={a.n:,} dim={a.dim} clusters={a.clusters} queries={a.queries} x {a.rounds} rounds, batch 1, k=10")
    print(f"{'index':8s} {'build s':>8s} {'index MiB':>10s} {'bytes/vec':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'vs ' + kinds[0]:>9s} {'recall@10':>10s}")
    for kind in kinds:
        p50 = statistics.median(round_medians[kind]) * 1e3
        p99 = float(np.percentile(lat[kind], 99)) * 1e3
        print(f"{kind:8s} {build_s[kind]:8.1f} {size[kind] / 2**20:10.1f} {size[kind] / a.n:10.0f} {p50:8.3f} "
              f"{p99:8.3f} {p50 / flat_ms:8.2f}x {recall[kind]:10.3f}")


if __name__ == "__main__":
    main()
