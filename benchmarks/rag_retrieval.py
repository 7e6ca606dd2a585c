"""RAG retrieval cost and diversity: plain top-k vs MMR reranking (stored vectors vs re-embedded candidates).

    python benchmarks/rag_retrieval.py                          # 20 stdlib files, all-minilm-l6-v2, ~2-3 min
    python benchmarks/rag_retrieval.py --files 200 --rounds 5 --fetch-k 50 --index /tmp/rag-idx-200

Builds (or reuses, ``--index``) a flat index of the first ``--files`` standard-library modules (``cubelm rag
ingest``'s pipeline), then for each question (first docstring sentences of the indexed functions) times
``Retriever.retrieve`` three ways, interleaved within every round (the machine is shared): plain top-k; MMR over
``--fetch-k`` candidates using the vectors the store holds (``FaissStore.vectors``); MMR re-embedding the
candidates' texts (what a store that cannot return vectors costs, e.g. a Chroma server). Reports median ms per
query and the ratio to plain within each round, plus the redundancy of the k results (mean pairwise cosine; lower =
more diverse) and how often the plain top-1 stays first under MMR.
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import tempfile
import time
from pathlib import Path


def questions_from(store, limit: int) -> list[str]:
    """First docstring sentences of functions in the indexed chunks (the stdlib retrieval set's kind of question)."""
    out = []
    for key, (id_, text, meta) in sorted(store.db.rows(store.db.filter_keys(None)).items()):
        if meta.get("kind") != "function":
            continue
        try:
            fn = ast.parse(text).body[0]
        except (SyntaxError, IndexError):
            continue
        doc = ast.get_docstring(fn) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if doc and len(doc.split()) >= 4:
            out.append(doc.split(".")[0].strip())
        if len(out) >= limit:
            break
    return out


def redundancy(vectors) -> float:
    sims = vectors @ vectors.T
    n = len(vectors)
    return float((sims.sum() - n) / max(n * (n - 1), 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--index", default=None, help="index directory, built when missing (default: a temporary one)")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--fetch-k", type=int, default=20)
    ap.add_argument("--mmr-lambda", type=float, default=0.7)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from cubelm.rag.commands import IngestOptions, run_ingest
    from cubelm.rag.retrieve import Retriever
    from cubelm.systems.host import describe_host, host_info

    print(f"host: {describe_host(host_info())}")
    with tempfile.TemporaryDirectory() as tmp:
        idx = args.index or str(Path(tmp) / "idx")
        if not Path(idx).exists():
            t0 = time.perf_counter()
            run_ingest(IngestOptions(source="stdlib", index=idx, max_files=args.files))
            print(f"ingest: {time.perf_counter() - t0:.1f} s")
        r = Retriever.open(idx)
        qs = questions_from(r.store, args.questions)
        print(f"{r.store.count()} chunks, {len(qs)} questions, k={args.k}, fetch_k={args.fetch_k}, "
              f"lambda={args.mmr_lambda}")

        class NoVectors:  # the store interface without .vectors: MMR must embed the candidates again
            def __init__(self, store):
                self.search, self.dim, self.info = store.search, store.dim, store.info

        reembed = Retriever(NoVectors(r.store), r.embedder)
        ways = {"plain": lambda q: r.retrieve(q, args.k),
                "mmr (stored vectors)": lambda q: r.retrieve(q, args.k, fetch_k=args.fetch_k,
                                                             mmr_lambda=args.mmr_lambda),
                "mmr (re-embedded)": lambda q: reembed.retrieve(q, args.k, fetch_k=args.fetch_k,
                                                                mmr_lambda=args.mmr_lambda)}
        for f in ways.values():  # warm-up
            f(qs[0])
        times = {w: [] for w in ways}
        ratios = {w: [] for w in ways}
        for _ in range(args.rounds):
            per_round = {}
            for name, f in ways.items():  # interleaved: every way runs in every round
                t = time.perf_counter()
                for q in qs:
                    f(q)
                per_round[name] = (time.perf_counter() - t) / len(qs) * 1e3
                times[name].append(per_round[name])
            for name in ways:
                ratios[name].append(per_round[name] / per_round["plain"])
        red, top1_kept = {}, 0
        for name in ("plain", "mmr (stored vectors)"):
            vals = []
            for q in qs:
                hits = ways[name](q)
                vals.append(redundancy(r.store.vectors([h.id for h in hits])))
            red[name] = statistics.mean(vals)
        for q in qs:
            top1_kept += ways["plain"](q)[0].id == ways["mmr (stored vectors)"](q)[0].id
        print(f"\n| retrieval | ms/query (median of {args.rounds}) | x plain | mean pairwise cosine of the {args.k} |")
        print("|---|---|---|---|")
        for name in ways:
            rd = f"{red[name]:.3f}" if name in red else "(same as stored)"
            print(f"| {name} | {statistics.median(times[name]):.2f} | {statistics.median(ratios[name]):.2f} | {rd} |")
        print(f"\nMMR kept the plain top-1 first for {top1_kept}/{len(qs)} questions")
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
