"""Retrieval evaluation: each embedder x each vector-index type on a labeled set (``cubelm.eval.retrieval_set``).

    cubelm eval retrieval --embedder all-minilm-l6-v2,default --index flat,hnsw,ivfpq,sq8,binary --out DIR

For each embedder: embed the corpus (passage prompt when the model has one) and the questions (query prompt;
one at a time, timed: a user's query arrives alone); then for each index type: build an embedded store
(``cubelm.rag.store.open_store``; build time includes IVF-PQ / SQ8 training), search all questions at k=10 for
the quality metrics (``cubelm.eval.retrieval_metrics``), and time batch-1 searches through ``store.search``
(faiss + rescoring + SQLite rows) in interleaved rounds over the index types (flat, hnsw, ..., flat, hnsw, ...):
the host is shared, so each type gets the same share of the noise. Latency: median over rounds of each round's
median, p99 over every query. Memory: the serialized faiss index (the float vectors kept in SQLite for rescoring
and rebuilds come on top: n x dim x 4 bytes). ``overlap@10`` is the fraction of flat's exact top 10 that the
index returns (ANN recall), next to the task recall against the labels.

Embedder names: ``all-minilm-l6-v2``, a model directory, ``default`` (the model store's default model), each
optionally ``:POOLING`` (cls, mean, max, last) to override the model's pooling.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cubelm.errors import CubelmError
from cubelm.eval.retrieval_metrics import mean_metrics
from cubelm.eval.retrieval_set import RetrievalSet

POOLINGS = ("cls", "mean", "max", "last")


@dataclass(slots=True)
class IndexResult:
    label: str  # the kind, or "hnsw ef=16" when several efSearch values are compared
    kind: str
    params: dict
    build_s: float
    index_bytes: int
    search_p50_ms: float
    search_p99_ms: float
    metrics: dict
    overlap_vs_flat: float | None


@dataclass(slots=True)
class EmbedderResult:
    name: str
    dim: int
    pooling: str
    corpus_chunks: int
    embed_s: float
    query_p50_ms: float
    indexes: list[IndexResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def split_embedder(spec: str) -> tuple[str, str | None]:
    """``NAME[:POOLING]`` -> (name, pooling or None)."""
    name, _, pooling = spec.rpartition(":")
    return (name, pooling) if name and pooling in POOLINGS else (spec, None)


def load_eval_embedder(spec: str, device: str = "cpu"):
    from cubelm.rag.embedder import load_embedder
    name, pooling = split_embedder(spec)
    if name != "default":
        return load_embedder(name, pooling=pooling, device=device)
    from cubelm.engine.commands import resolve_model_dir
    emb = load_embedder(str(resolve_model_dir(None)), pooling=pooling, device=device)
    emb.name = "default"  # not the store's digest directory name
    return emb


def _prompt(emb, *names: str) -> str | None:
    return next((n for n in names if n in emb.prompts), None)


def embed_set(emb, rset: RetrievalSet) -> tuple[np.ndarray, np.ndarray, float, list[float]]:
    """(corpus vectors, question vectors, corpus seconds, per-question encode seconds)."""
    t0 = time.perf_counter()
    # truncate: the set is chunked once (one tokenizer) for every embedder; one with a smaller limit or a
    # wordier tokenizer embeds the start of a chunk, as it would have to in any shared index
    corpus = emb.encode(rset.chunk_texts, prompt_name=_prompt(emb, "passage", "document"), truncate=True)
    embed_s = time.perf_counter() - t0
    query_prompt = _prompt(emb, "query")
    rows, times = [], []
    for q in rset.questions:
        t0 = time.perf_counter()
        rows.append(emb.encode([q.text], prompt_name=query_prompt, truncate=True))
        times.append(time.perf_counter() - t0)
    return corpus.numpy(), np.concatenate([r.numpy() for r in rows]), embed_s, times


def build_store(path: str, kind: str, ids: list[str], vectors: np.ndarray, params: dict):
    from cubelm.rag.store import open_store
    t0 = time.perf_counter()
    store = open_store(path, dim=vectors.shape[1], index=kind, **params)
    store.add(ids, vectors)
    store.search(vectors[:1], 1)  # trains IVF-PQ / SQ8 on everything added
    return store, time.perf_counter() - t0


def _ranked(store, queries: np.ndarray, k: int) -> list[list[str]]:
    return [[h.id for h in hits] for hits in store.search(queries, k)]


def time_searches(stores: dict, queries: np.ndarray, k: int, rounds: int) -> dict[str, tuple[float, float]]:
    """kind -> (p50 ms, p99 ms) of batch-1 searches, rounds interleaved over the kinds."""
    all_times = {kind: [] for kind in stores}
    round_medians = {kind: [] for kind in stores}
    for _ in range(rounds):
        for kind, store in stores.items():
            times = []
            for q in queries:
                t0 = time.perf_counter()
                store.search(q, k)
                times.append(time.perf_counter() - t0)
            all_times[kind] += times
            round_medians[kind].append(statistics.median(times))
    return {kind: (statistics.median(round_medians[kind]) * 1e3, float(np.percentile(all_times[kind], 99)) * 1e3)
            for kind in stores}


def evaluate_embedder(emb, rset: RetrievalSet, variants: list[tuple[str, str, dict]], *, k: int = 10,
                      rounds: int = 3) -> EmbedderResult:
    """``variants``: (label, index kind, IndexSpec parameters) of each index to build (``index_variants``)."""
    corpus, queries, embed_s, qtimes = embed_set(emb, rset)
    relevant = [q.relevant for q in rset.questions]
    result = EmbedderResult(name=emb.name, dim=int(corpus.shape[1]), pooling=emb.pooling.mode,
                            corpus_chunks=len(rset.chunk_ids), embed_s=embed_s,
                            query_p50_ms=statistics.median(qtimes) * 1e3)
    with tempfile.TemporaryDirectory(prefix="cubelm-reteval-") as tmp:
        stores, built = {}, {}
        for n, (label, kind, params) in enumerate(variants):
            stores[label], built[label] = build_store(f"{tmp}/{n}", kind, rset.chunk_ids, corpus, params)
        ranked = {label: _ranked(store, queries, k) for label, store in stores.items()}
        exact = ranked.get("flat")
        latency = time_searches(stores, queries, k, rounds)
        for label, store in stores.items():
            overlap = None if exact is None else float(np.mean(
                [len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(ranked[label], exact)]))
            result.indexes.append(IndexResult(
                label=label, kind=store.index.spec.kind, params=_shown_params(store.index.spec),
                build_s=built[label], index_bytes=len(store.index.to_bytes()), search_p50_ms=latency[label][0],
                search_p99_ms=latency[label][1], metrics=mean_metrics(ranked[label], relevant),
                overlap_vs_flat=overlap))
    return result


_KIND_PARAMS = {"hnsw": ("hnsw_m", "ef_construction", "ef_search"), "ivfpq": ("nlist", "pq_m", "nbits", "nprobe"),
                "sq8": (), "flat": (), "binary": ()}


def _applies(kind: str, key: str) -> bool:
    return key in _KIND_PARAMS[kind] or key == "rescore"


def _shown_params(spec) -> dict:
    shown = {key: getattr(spec, key) for key in _KIND_PARAMS[spec.kind]}
    if spec.effective_rescore:
        shown["rescore"] = spec.effective_rescore
    return shown


def index_variants(kinds: list[str], params: dict, ef_searches: list[int]) -> list[tuple[str, str, dict]]:
    """(label, kind, params) per index to build: flat first (the exact reference of overlap@10), one HNSW per
    efSearch value."""
    from cubelm.rag.faiss_index import KINDS
    bad = [kind for kind in kinds if kind not in KINDS]
    if bad or not kinds:
        raise CubelmError(f"--index {','.join(kinds)}: each must be one of {', '.join(KINDS)}")
    if not ef_searches or min(ef_searches) < 1:
        raise CubelmError(f"--ef-search {ef_searches}: give one or more values >= 1")
    out = []
    for kind in sorted(dict.fromkeys(kinds), key=lambda kind: kind != "flat"):
        own = {key: v for key, v in params.items() if _applies(kind, key)}
        if kind == "hnsw":
            efs = list(dict.fromkeys(ef_searches))
            out += [(kind if len(efs) == 1 else f"hnsw ef={ef}", kind, own | {"ef_search": ef}) for ef in efs]
        else:
            out.append((kind, kind, own))
    return out


def markdown_table(results: list[EmbedderResult]) -> str:
    head = ("| embedder | index | params | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | overlap@10 vs flat "
            "| build s | index KiB | search p50 ms | search p99 ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for ix in r.indexes:
            m = ix.metrics
            params = " ".join(f"{key}={v}" for key, v in ix.params.items()) or "-"
            overlap = "-" if ix.overlap_vs_flat is None else f"{ix.overlap_vs_flat:.3f}"
            lines.append(f"| {r.name} ({r.pooling}) | {ix.kind} | {params} | {m['recall@1']:.3f} | "
                         f"{m['recall@5']:.3f} | {m['recall@10']:.3f} | {m['mrr']:.3f} | {m['ndcg@10']:.3f} | "
                         f"{overlap} | {ix.build_s:.2f} | {ix.index_bytes / 1024:,.0f} | {ix.search_p50_ms:.3f} | "
                         f"{ix.search_p99_ms:.3f} |")
    return "\n".join(lines)


def embedder_lines(results: list[EmbedderResult]) -> str:
    return "\n".join(f"- {r.name} ({r.pooling} pooling, dim {r.dim}): corpus of {r.corpus_chunks:,} chunks embedded "
                     f"in {r.embed_s:.1f} s ({r.corpus_chunks / r.embed_s:.0f} chunks/s); query encode p50 "
                     f"{r.query_p50_ms:.1f} ms (batch 1)" for r in results)
