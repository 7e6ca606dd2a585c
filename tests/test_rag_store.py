"""The vector stores (cubelm.rag.store): each faiss index type against exact search, item semantics, filters,
atomic snapshots (a save killed or failing midway leaves the previous index), corrupt files, the Chroma server."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed: pip install -e '.[rag]'")

from cubelm.errors import CubelmError  # noqa: E402
from cubelm.rag import snapshot  # noqa: E402
from cubelm.rag.faiss_store import FaissStore  # noqa: E402
from cubelm.rag.store import open_store  # noqa: E402
from helpers import assert_clean_error, cli_in_process, free_port  # noqa: E402

DIM = 64


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # NOTE: on a shared 2-core host, faiss' OpenMP threads spin against each other: k-means training of a
    # 2k-vector IVF-PQ takes ~0.5 s on one thread and 10+ s on two busy ones.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n, rng, centers, noise=1.0):
    x = centers[rng.integers(0, len(centers), n)] + noise * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, DIM)).astype(np.float32)
    x, q = clustered(2000, rng, centers), clustered(100, rng, centers)
    ids = [f"doc{i}" for i in range(len(x))]
    metas = [{"source": f"s{i % 5}", "n": i} for i in range(len(x))]
    return x, q, ids, metas


def exact_top(q, x, k, subset=None):
    subset = np.arange(len(x)) if subset is None else np.asarray(subset)
    scores = q @ x[subset].T
    return [subset[np.argsort(-row, kind="stable")[:k]] for row in scores]


def recall(hits, truth):
    return np.mean([len({int(h.id[3:]) for h in hs} & set(t.tolist())) / len(t) for hs, t in zip(hits, truth)])


PARAMS = {"flat": {}, "hnsw": {"hnsw_m": 16, "ef_construction": 64, "ef_search": 64},
          "ivfpq": {"nbits": 6}, "sq8": {}, "binary": {}}


@pytest.mark.parametrize("kind", list(PARAMS))
def test_index_type_recall_and_reopen(tmp_path, data, kind):
    x, q, ids, metas = data
    store = open_store(tmp_path / "ix", dim=DIM, index=kind, **PARAMS[kind])
    store.add(ids, x, [f"text {i}" for i in ids], metas)
    hits = store.search(q, 10)
    truth = exact_top(q, x, 10)
    if kind == "flat":  # exact: the same neighbours in the same order, scores = cosine
        assert [[int(h.id[3:]) for h in hs] for hs in hits] == [t.tolist() for t in truth]
        np.testing.assert_allclose([h.score for h in hits[0]], np.sort(q[0] @ x.T)[::-1][:10], atol=1e-5)
    else:
        assert recall(hits, truth) >= 0.9, (kind, recall(hits, truth))
    assert hits[0][0].text == f"text {hits[0][0].id}" and hits[0][0].metadata == metas[int(hits[0][0].id[3:])]
    store.save()
    again = FaissStore.open(tmp_path / "ix")
    assert again.count() == len(x) and again.index.spec == store.index.spec
    assert [[(h.id, round(h.score, 5)) for h in hs] for hs in again.search(q, 10)] == \
           [[(h.id, round(h.score, 5)) for h in hs] for hs in hits]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "sq8", "binary"])
def test_add_upsert_delete(tmp_path, data, kind):
    x, q, ids, metas = data
    n = 400
    params = {"ivfpq": {"nbits": 4, "nlist": 4}}.get(kind, {})
    store = open_store(tmp_path / "ix", dim=DIM, index=kind, **params)
    store.add(ids[:n], x[:n], [f"old {i}" for i in range(n)], metas[:n])
    with pytest.raises(CubelmError, match="already in the store"):
        store.add(ids[:1], x[:1])
    with pytest.raises(CubelmError, match="dimension 63"):
        store.upsert(["doc0"], x[:1, :63])
    with pytest.raises(CubelmError, match="twice"):
        store.add(["a", "a"], x[:2])
    # upsert doc0 with doc500's vector: a search for that vector finds doc0, its text replaced; the old vector
    # no longer leads to doc0
    store.upsert(["doc0", "new"], x[[500, 501]], ["replaced", "brand new"], [{"source": "u"}, {}])
    assert store.count() == n + 1
    top = store.search(x[[500, 0]], 3)
    assert top[0][0].id == "doc0" and top[0][0].text == "replaced" and top[0][0].metadata == {"source": "u"}
    assert "doc0" not in [h.id for h in top[1]]
    assert store.search(x[501], 1)[0][0].id == "new"
    assert store.delete(["doc1", "doc2", "missing"]) == 2 and store.count() == n - 1
    assert not {"doc1", "doc2"} & {h.id for h in store.search(x[[1, 2]], 5)[0] + store.search(x[[1, 2]], 5)[1]}
    assert store.get(["doc3", "doc1"])[1] is None and store.get(["doc3"])[0].text == "old 3"
    removed = store.delete(where={"source": "s3"})
    assert removed == sum(1 for m in metas[3:n] if m["source"] == "s3") and store.count() == n - 1 - removed
    assert all(h.metadata.get("source") != "s3" for hs in store.search(q, 10) for h in hs)
    store.save()
    again = FaissStore.open(tmp_path / "ix")
    assert again.count() == store.count() and again.get(["doc0"])[0].text == "replaced"
    assert [h.id for h in again.search(x[500], 5)[0]] == [h.id for h in store.search(x[500], 5)[0]]


def test_hnsw_tombstones_then_compaction(tmp_path, data):
    x, q, ids, _ = data
    store = open_store(tmp_path / "ix", dim=DIM, index="hnsw")
    store.add(ids[:200], x[:200])
    store.delete(ids[:40])  # 40 <= 25% of 200: tombstoned, excluded by a selector inside faiss
    assert len(store.db.tombstones()) == 40 and store.index.ntotal == 200
    hits = store.search(x[:40], 5)
    assert all(int(h.id[3:]) >= 40 for hs in hits for h in hs) and all(len(hs) == 5 for hs in hits)
    store.delete(ids[40:60])  # 60 > 25%: rebuilt from the stored vectors, tombstones gone
    assert len(store.db.tombstones()) == 0 and store.index.ntotal == 140
    got = [[int(h.id[3:]) for h in hs] for hs in store.search(q[:5], 10)]
    want = [(t + 60).tolist() for t in exact_top(q[:5], x[60:200], 10)]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
@pytest.mark.parametrize("exact_max", [0, 10_000])  # 0: the faiss IDSelector path; 10k: the exact path
def test_filters(tmp_path, data, kind, exact_max):
    x, q, ids, metas = data
    store = open_store(tmp_path / "ix", dim=DIM, index=kind)
    store.exact_filter_max = exact_max
    store.add(ids, x, None, metas)
    for where, keep in [({"source": "s1"}, lambda m: m["source"] == "s1"),
                        ({"source": {"$in": ["s0", "s4"]}}, lambda m: m["source"] in ("s0", "s4")),
                        ({"source": "s2", "n": {"$lt": 500}}, lambda m: m["source"] == "s2" and m["n"] < 500),
                        ({"$or": [{"n": {"$gte": 1990}}, {"n": 7}]}, lambda m: m["n"] >= 1990 or m["n"] == 7)]:
        subset = [i for i, m in enumerate(metas) if keep(m)]
        hits = store.search(q[:20], 10, where=where)
        assert all(keep(h.metadata) for hs in hits for h in hs)
        assert all(len(hs) == min(10, len(subset)) for hs in hits)  # k results whenever k items pass
        truth = exact_top(q[:20], x, 10, subset)
        if kind == "flat" or exact_max:
            assert [[int(h.id[3:]) for h in hs] for hs in hits] == [t.tolist() for t in truth]
        else:
            assert recall(hits, truth) >= 0.9
    assert store.search(q[:2], 5, where={"source": "nope"}) == [[], []]
    with pytest.raises(CubelmError, match="operator"):
        store.search(q[0], 5, where={"source": {"$like": "s%"}})


def test_bad_input(tmp_path, data):
    x = data[0]
    store = open_store(tmp_path / "a", dim=DIM)
    store.add(["a"], x[:1])
    with pytest.raises(CubelmError, match="dimension 32"):
        store.search(x[:1, :32], 3)
    with pytest.raises(CubelmError, match="all-zero"):
        store.add(["z"], np.zeros((1, DIM)))
    with pytest.raises(CubelmError, match="k must be"):
        store.search(x[0], 0)
    store.save()
    with pytest.raises(CubelmError, match="64-dim vectors, not 128"):
        open_store(tmp_path / "a", dim=128)
    with pytest.raises(CubelmError, match="is a 'flat' index, not 'hnsw'"):
        open_store(tmp_path / "a", dim=DIM, index="hnsw")
    with pytest.raises(CubelmError, match="no index at"):
        open_store(tmp_path / "missing")
    with pytest.raises(CubelmError, match="at least 64 vectors to train"):
        few = open_store(tmp_path / "b", dim=DIM, index="ivfpq", nbits=6)
        few.add([f"i{i}" for i in range(20)], x[:20])
        few.save()
    with pytest.raises(CubelmError, match="divisible by 8"):
        open_store(tmp_path / "c", dim=12, index="binary")
    with pytest.raises(CubelmError, match="not one of"):
        open_store(tmp_path / "d", dim=DIM, index="lsh")


def _fill(path, x, n):
    store = open_store(path, dim=DIM, index="hnsw")
    store.add([f"doc{i}" for i in range(n)], x[:n], [str(i) for i in range(n)])
    store.save()
    return store


@pytest.mark.parametrize("step", ["files", "renamed"])
def test_failed_save_leaves_previous_snapshot(tmp_path, data, monkeypatch, step):
    x = data[0]
    store = _fill(tmp_path / "ix", x, 100)
    before = [h.id for h in FaissStore.open(tmp_path / "ix").search(x[150], 5)[0]]
    store.add([f"doc{i}" for i in range(100, 200)], x[100:200])

    def fail(name):
        if name == step:
            raise OSError(f"disk gone after {name}")
    monkeypatch.setattr(snapshot, "save_hook", fail)
    with pytest.raises(OSError):
        store.save()
    monkeypatch.setattr(snapshot, "save_hook", None)
    old = FaissStore.open(tmp_path / "ix")
    assert old.count() == 100 and [h.id for h in old.search(x[150], 5)[0]] == before
    store.save()  # the next save commits and clears the leftovers of the failed one
    assert FaissStore.open(tmp_path / "ix").count() == 200
    assert sorted(p.name for p in (tmp_path / "ix").iterdir())[0] == "CURRENT" and \
        len([p for p in (tmp_path / "ix").iterdir() if p.is_dir()]) == 1


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from pathlib import Path
    from cubelm.rag import snapshot
    from cubelm.rag.faiss_store import FaissStore
    path, step = Path(sys.argv[1]), sys.argv[2]
    store = FaissStore.open(path)
    x = np.random.default_rng(1).standard_normal((300, store.dim)).astype(np.float32)
    store.add([f"new{i}" for i in range(300)], x)
    def hook(name):
        if name == step:
            (path.parent / "at-step").write_text(name)
            time.sleep(600)
    snapshot.save_hook = hook
    store.save()
""")


@pytest.mark.parametrize("step", ["files", "renamed"])
def test_killed_save_leaves_previous_snapshot(tmp_path, data, step):
    x = data[0]
    _fill(tmp_path / "ix", x, 100)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ix"), step], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "at-step").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the saving process did not reach the step"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p.name for p in (tmp_path / "ix").iterdir() if p.is_dir()]
    assert len(leftovers) == 2  # the half-written snapshot is there, but CURRENT still names the old one
    store = FaissStore.open(tmp_path / "ix")
    assert store.count() == 100 and store.search(x[5], 1)[0][0].id == "doc5"


def test_corrupt_files_are_one_line_errors(tmp_path, data, capsys):
    x = data[0]
    _fill(tmp_path / "ix", x, 50)
    snap = tmp_path / "ix" / (tmp_path / "ix" / "CURRENT").read_text()
    blob = bytearray((snap / "index.faiss").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (snap / "index.faiss").write_bytes(bytes(blob))
    with pytest.raises(CubelmError, match="index.faiss is corrupt"):
        FaissStore.open(tmp_path / "ix")
    r = cli_in_process(capsys, "rag", "query", "--index", tmp_path / "ix", "hello")
    assert_clean_error(r, "corrupt")
    # a file that passes its checksum but is not a faiss index (manifest rewritten): faiss' error, one line
    import hashlib
    import json
    (snap / "index.faiss").write_bytes(b"not an index" * 10)
    manifest = json.loads((snap / "manifest.json").read_text())
    manifest["files"]["index.faiss"] = hashlib.sha256((snap / "index.faiss").read_bytes()).hexdigest()
    (snap / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CubelmError, match="not a readable faiss index") as e:
        FaissStore.open(tmp_path / "ix")
    assert "\n" not in str(e.value)
    r = cli_in_process(capsys, "rag", "query", "--index", tmp_path / "nowhere", "hello")
    assert_clean_error(r, "no index at")
    # the item database and the manifest are checked the same way
    _fill(tmp_path / "ix2", x, 20)
    snap2 = tmp_path / "ix2" / (tmp_path / "ix2" / "CURRENT").read_text()
    with open(snap2 / "items.sqlite", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CubelmError, match="items.sqlite is corrupt"):
        FaissStore.open(tmp_path / "ix2")
    (snap2 / "manifest.json").write_text("{")
    with pytest.raises(CubelmError, match="manifest.json is missing or corrupt"):
        FaissStore.open(tmp_path / "ix2")


# ---- the server backend: a real `chroma run` on loopback ---------------------------------------------------------

@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory):
    pytest.importorskip("chromadb", reason="chromadb (the Chroma server) is not installed: pip install -e '.[rag]'")
    exe = Path(sys.executable).with_name("chroma")
    if not exe.exists():
        pytest.skip(f"the chroma server CLI is not installed next to {sys.executable}")
    port, data_dir = free_port(), tmp_path_factory.mktemp("chroma")
    log = open(data_dir.parent / "chroma.log", "w")
    proc = subprocess.Popen([str(exe), "run", "--path", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.skip(f"the chroma server did not start (exit {proc.returncode})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("the chroma server did not listen within 60 s")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_chroma_server_end_to_end(tmp_path, data, chroma_url):
    x, q, ids, metas = data
    n = 300
    url = f"{chroma_url}/cubelm-test"
    store = open_store(url, dim=DIM, info={"embedder": "test"})
    reference = open_store(tmp_path / "ref", dim=DIM)  # the embedded flat store: exact answers
    for s in (store, reference):
        s.add(ids[:n], x[:n], [f"t{i}" for i in range(n)], metas[:n])
    with pytest.raises(CubelmError, match="already in the store"):
        store.add(ids[:1], x[:1])
    with pytest.raises(CubelmError, match="dimension 32"):
        store.upsert(["doc0"], x[:1, :32])
    for s in (store, reference):
        s.upsert(["doc0"], x[[250]], ["replaced"], [{"source": "u"}])
        assert s.delete(["doc1", "nope"]) == 1
        assert s.delete(where={"source": "s3"}) == sum(1 for m in metas[2:n] if m["source"] == "s3")
    assert store.count() == reference.count()
    for where in (None, {"source": "s1"}, {"source": {"$in": ["s0", "u"]}, "n": {"$gte": 0}}):
        got, want = store.search(q[:10], 5, where=where), reference.search(q[:10], 5, where=where)
        assert recall_ids(got, want) >= 0.9
        for g, w in zip(got, want):  # same items: same texts, metadata and cosine scores
            common = {h.id: h for h in w}
            for h in g:
                if h.id in common:
                    assert h.text == common[h.id].text and h.metadata == common[h.id].metadata
                    assert abs(h.score - common[h.id].score) < 1e-4
    # replaced whole: Chroma's own upsert would have kept the old "n" key next to the new "source"
    assert store.get(["doc0"])[0].text == "replaced" and store.get(["doc0"])[0].metadata == {"source": "u"}
    again = open_store(url)  # a new client sees the same collection, dim and info
    assert again.dim == DIM and again.info == {"embedder": "test"} and again.count() == store.count()
    with pytest.raises(CubelmError, match="no collection"):
        open_store(f"{chroma_url}/cubelm-missing")


def recall_ids(got, want):
    return np.mean([len({h.id for h in g} & {h.id for h in w}) / max(len(w), 1) for g, w in zip(got, want)])
