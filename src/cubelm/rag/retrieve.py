"""Retrieval for RAG: an embedder + a vector store, with optional MMR reranking (book §6.1.7).

    r = Retriever.open("idx/")                                   # the embedder the index was built with
    hits = r.retrieve("how do I parse JSON?", k=4)               # the 4 nearest chunks
    hits = r.retrieve("how do I parse JSON?", k=4, mmr_lambda=0.5, where={"source": {"$in": ["json/decoder.py"]}})

MMR (maximal marginal relevance, Carbonell & Goldstein 1998) reranks ``fetch_k`` nearest candidates: it picks, one
at a time, the candidate maximizing ``lambda * sim(query, d) - (1 - lambda) * max(sim(d, s) for s picked)``, so a
near-duplicate of a chunk already picked loses to a different chunk that is almost as relevant. ``lambda = 1`` is
plain ranking, ``0`` pure diversity. Similarities are cosines of the stored (float) vectors when the store can
give them (``FaissStore.vectors``), else of the candidates' texts embedded again as passages. Hits keep their
cosine score to the query; their order is MMR's.

The query is embedded with the embedder's ``query`` prompt when it has one (e5/bge-style prefixes), as
``cubelm rag query`` does, and truncated to the embedder's length rather than refused: the start of a long
question still retrieves.
"""

from __future__ import annotations

import numpy as np

from cubelm.errors import CubelmError
from cubelm.rag.store import Hit, as_matrix

MAX_K = 100  # chunks one retrieval may return
MAX_FETCH_K = 1000  # candidates MMR may rerank


def mmr(query: np.ndarray, candidates: np.ndarray, k: int, lam: float) -> list[int]:
    """Indices of ``k`` rows of ``candidates`` (n, d) in MMR order for ``query`` (d,); rows and query unit vectors."""
    n = candidates.shape[0]
    relevance = candidates @ query  # (n,)
    redundancy = np.full(n, -np.inf, dtype=np.float64)  # max similarity to anything picked; -inf: none picked
    picked: list[int] = []
    free = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = np.where(free, lam * relevance - (1.0 - lam) * penalty, -np.inf)
        best = int(np.argmax(score))  # ties: the earlier (better-ranked) candidate
        picked.append(best)
        free[best] = False
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    return picked


def check_retrieval_args(k, fetch_k, mmr_lambda) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise CubelmError(f"k must be an integer in 1..{MAX_K}, got {k!r}")
    if fetch_k is not None and (not isinstance(fetch_k, int) or isinstance(fetch_k, bool)
                                or not k <= fetch_k <= MAX_FETCH_K):
        raise CubelmError(f"fetch_k must be an integer in k..{MAX_FETCH_K} (k = {k}), got {fetch_k!r}")
    if mmr_lambda is not None and not (isinstance(mmr_lambda, (int, float)) and 0.0 <= mmr_lambda <= 1.0):
        raise CubelmError(f"mmr_lambda must be a number in [0, 1] (or None: no MMR), got {mmr_lambda!r}")


class Retriever:
    def __init__(self, store, embedder) -> None:
        if embedder.dim != store.dim:
            raise CubelmError(f"embedder {embedder.name} gives {embedder.dim}-dim vectors but the index holds "
                              f"{store.dim}-dim ones (built with {store.info.get('embedder')!r})")
        self.store, self.embedder = store, embedder
        prompts = getattr(embedder, "prompts", None) or {}
        self.query_prompt = "query" if "query" in prompts else None
        self.passage_prompt = next((p for p in ("passage", "document") if p in prompts), None)

    @classmethod
    def open(cls, index: str, *, embedder: str | None = None, device: str = "cpu") -> Retriever:
        """The store at ``index`` (never created) and ``embedder`` (default: the one recorded at ingest)."""
        from cubelm.rag.embedder import load_embedder
        from cubelm.rag.store import open_store
        store = open_store(index, create=False)
        name = embedder or store.info.get("embedder")
        if not name:
            raise CubelmError(f"{index} does not record its embedder; name one (--rag-embed-model / --embedder)")
        return cls(store, load_embedder(name, device=device))

    def embed_query(self, question: str) -> np.ndarray:
        return as_matrix(self.embedder.encode([question], prompt_name=self.query_prompt, truncate=True), self.store.dim)

    def retrieve(self, question: str, k: int = 4, *, fetch_k: int | None = None, mmr_lambda: float | None = None,
                 where: dict | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``question`` (fewer when the index or the filter holds fewer)."""
        if not isinstance(question, str) or not question.strip():
            raise CubelmError("the question is empty")
        check_retrieval_args(k, fetch_k, mmr_lambda)
        q = self.embed_query(question)
        if mmr_lambda is None:
            return self.store.search(q, k, where=where)[0]
        fetch = fetch_k if fetch_k is not None else min(max(4 * k, 20), MAX_FETCH_K)
        candidates = self.store.search(q, fetch, where=where)[0]
        if len(candidates) <= 1:
            return candidates[:k]
        order = mmr(q[0], self.candidate_vectors(candidates), k, float(mmr_lambda))
        return [candidates[i] for i in order]

    def candidate_vectors(self, hits: list[Hit]) -> np.ndarray:
        """(n, dim) unit vectors of ``hits``: the stored ones when the store gives them, else re-embedded texts."""
        stored = getattr(self.store, "vectors", None)
        if callable(stored):
            return as_matrix(stored([h.id for h in hits]), self.store.dim)
        return as_matrix(self.embedder.encode([h.text for h in hits], prompt_name=self.passage_prompt,
                                              truncate=True), self.store.dim)

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if callable(close):
            close()
