"""Ranking metrics of a retrieval run with binary relevance: recall@k, reciprocal rank, nDCG@k, and their means.

Each takes one query's ranked ids (best first, as many as were retrieved) and the set of its relevant ids:

- ``recall_at_k``: the fraction of the relevant ids found in the top k (with one relevant id: 1 if found, else 0).
- ``reciprocal_rank``: 1 / the rank (1-based) of the first relevant id in the ranking, 0 when none was retrieved;
  its mean over queries is MRR (here cut at the retrieval depth, so MRR@10 for a top-10 search).
- ``ndcg_at_k``: DCG@k = sum over ranks i <= k of rel_i / log2(i + 1), divided by the DCG of an ideal ranking
  (all relevant ids first: min(|relevant|, k) of them), so 1.0 is a perfect ranking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cubelm.errors import CubelmError


def _check(relevant) -> set:
    relevant = set(relevant)
    if not relevant:
        raise CubelmError("a query needs at least one relevant id to be scored")
    return relevant


def recall_at_k(ranked: Sequence[str], relevant, k: int) -> float:
    relevant = _check(relevant)
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant) -> float:
    relevant = _check(relevant)
    return next((1.0 / rank for rank, item in enumerate(ranked, 1) if item in relevant), 0.0)


def ndcg_at_k(ranked: Sequence[str], relevant, k: int) -> float:
    relevant = _check(relevant)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], 1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal


def mean_metrics(rankings: Sequence[Sequence[str]], relevants: Sequence, ks=(1, 5, 10),
                 ndcg_k: int = 10) -> dict[str, float]:
    """Means over queries: ``recall@K`` for each K, ``mrr`` and ``ndcg@ndcg_k``."""
    if len(rankings) != len(relevants) or not rankings:
        raise CubelmError(f"got {len(rankings)} rankings for {len(relevants)} queries (need as many, at least one)")
    n = len(rankings)
    out = {f"recall@{k}": sum(recall_at_k(r, rel, k) for r, rel in zip(rankings, relevants)) / n for k in ks}
    out["mrr"] = sum(reciprocal_rank(r, rel) for r, rel in zip(rankings, relevants)) / n
    out[f"ndcg@{ndcg_k}"] = sum(ndcg_at_k(r, rel, ndcg_k) for r, rel in zip(rankings, relevants)) / n
    return out
