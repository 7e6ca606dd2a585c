"""The embedded vector store: a faiss index (``cubelm.rag.faiss_index``) + SQLite items (``cubelm.rag.metadata``),
saved as atomic checksummed snapshots (``cubelm.rag.snapshot``).

Filters: SQLite first, then the search. ``where`` is compiled to SQL over the items' JSON metadata, giving the
keys that pass. A small set (<= ``exact_filter_max``) is scored exactly with its float vectors (cheaper than a
graph walk that must skip nearly every node, and exact); a larger one goes into faiss as an ``IDSelectorBatch``,
so the index itself only returns passing items. We do not over-fetch-then-filter: with a selective filter that
returns fewer than k hits however much it over-fetches, while a selector always finds k when k items pass.

Changes (add / upsert / delete) are in memory until ``save()``; trained kinds (IVF-PQ, SQ8) train on every
stored vector the first time they are searched or saved, and accept later additions into the trained index.
Upsert = delete + insert under a new key. HNSW cannot delete: deleted keys become tombstones excluded by an
``IDSelectorNot`` until they pass 25% of the index, when it is rebuilt from the stored vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cubelm.errors import CubelmError
from cubelm.rag.faiss_index import FaissIndex, IndexSpec
from cubelm.rag.metadata import MetadataDB
from cubelm.rag.snapshot import is_snapshot_root, read_snapshot, write_snapshot
from cubelm.rag.store import Hit, as_matrix, check_items

INDEX_FILE, ITEMS_FILE = "index.faiss", "items.sqlite"


class FaissStore:
    backend = "faiss"
    exact_filter_max = 2048  # filters passing at most this many items are scored exactly (see module doc)
    compact_fraction = 0.25  # HNSW: rebuild when tombstones exceed this fraction of the index

    def __init__(self, path: Path, dim: int, spec: IndexSpec, db: MetadataDB, index: FaissIndex,
                 info: dict) -> None:
        self.path, self.dim, self.spec, self.db, self.index, self.info = Path(path), dim, spec, db, index, info

    @classmethod
    def create(cls, path, dim: int, spec: IndexSpec | None = None, *, info: dict | None = None) -> FaissStore:
        if is_snapshot_root(path):
            raise CubelmError(f"an index already exists at {path}; open it, or delete the directory first")
        if not isinstance(dim, int) or dim < 1:
            raise CubelmError(f"dim must be a positive integer, got {dim!r}")
        spec = spec or IndexSpec()
        index = FaissIndex(spec, dim)
        if not index.needs_training:
            index.build(np.empty(0, np.int64), np.empty((0, dim), np.float32))
        return cls(Path(path), dim, spec, MetadataDB.new(), index, dict(info or {}))

    @classmethod
    def open(cls, path) -> FaissStore:
        snap, manifest = read_snapshot(path)
        if manifest.get("backend") != cls.backend:
            raise CubelmError(f"{path} is a {manifest.get('backend')!r} index, not an embedded faiss one")
        try:
            dim, spec, resolved = manifest["dim"], IndexSpec(**manifest["spec"]), IndexSpec(**manifest["resolved"])
        except (KeyError, TypeError, CubelmError):
            raise CubelmError(f"{snap / 'manifest.json'} does not describe a faiss index; rebuild the index") from None
        db = MetadataDB.load(snap / ITEMS_FILE)
        if INDEX_FILE in manifest["files"]:
            index = FaissIndex.from_bytes(resolved, dim, (snap / INDEX_FILE).read_bytes(), str(snap / INDEX_FILE))
        else:
            index = FaissIndex(spec, dim)
        return cls(Path(path), dim, spec, db, index, manifest.get("info", {}))

    # ---- writes ---------------------------------------------------------------------------------------------

    def add(self, ids, vectors, texts=None, metadatas=None) -> None:
        x = as_matrix(vectors, self.dim)
        ids, texts, metadatas = check_items(ids, len(x), texts, metadatas)
        existing = self.db.keys_of(ids)
        if existing:
            raise CubelmError(f"id {next(iter(existing))!r} is already in the store; use upsert to replace it")
        self._insert(ids, x, texts, metadatas)

    def upsert(self, ids, vectors, texts=None, metadatas=None) -> None:
        x = as_matrix(vectors, self.dim)
        ids, texts, metadatas = check_items(ids, len(x), texts, metadatas)
        self._remove_keys(np.fromiter(self.db.keys_of(ids).values(), dtype=np.int64))
        self._insert(ids, x, texts, metadatas)

    def delete(self, ids=None, *, where: dict | None = None) -> int:
        """Delete the items with these ids (unknown ids are ignored) and/or matching ``where``; how many."""
        if ids is None and where is None:
            raise CubelmError("delete needs ids or a where filter")
        keys = None if ids is None else np.fromiter(self.db.keys_of(list(ids)).values(), dtype=np.int64)
        if where is not None:
            matching = self.db.filter_keys(where)
            keys = matching if keys is None else np.intersect1d(keys, matching)
        self._remove_keys(keys)
        return len(keys)

    def _insert(self, ids, x, texts, metadatas) -> None:
        keys = self.db.insert(ids, texts, metadatas, x)
        if self.index.built:
            self.index.add(keys, x)
        # else: a trained kind not trained yet; the vectors wait in SQLite for _ensure_built

    def _remove_keys(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        tombstone = self.index.built and not self.index.can_remove
        if self.index.built and self.index.can_remove:
            self.index.remove(keys)
        self.db.delete_keys(keys, tombstone=tombstone)
        if tombstone and len(self.db.tombstones()) > self.compact_fraction * self.index.ntotal:
            self.rebuild()

    def rebuild(self) -> None:
        """A fresh index from the stored vectors (re-trains IVF-PQ / SQ8; drops HNSW tombstones)."""
        keys, vectors = self.db.all_vectors(self.dim)
        index = FaissIndex(self.spec, self.dim)
        index.build(keys, vectors)
        self.index = index
        self.db.clear_tombstones()

    def _ensure_built(self) -> None:
        if not self.index.built and self.db.count():
            self.rebuild()

    # ---- reads ----------------------------------------------------------------------------------------------

    def count(self) -> int:
        return self.db.count()

    def search(self, vectors, k: int = 10, where: dict | None = None) -> list[list[Hit]]:
        q = as_matrix(vectors, self.dim, "query vectors")
        if not isinstance(k, int) or k < 1:
            raise CubelmError(f"k must be a positive integer, got {k!r}")
        allowed = None if where is None else self.db.filter_keys(where)
        if self.db.count() == 0 or (allowed is not None and len(allowed) == 0):
            return [[] for _ in q]
        if allowed is not None and len(allowed) <= self.exact_filter_max:
            return self._exact(q, k, allowed)
        self._ensure_built()
        rescore = self.index.spec.effective_rescore
        fetch = min(k * max(rescore, 1), self.index.ntotal)
        excluded = None if self.index.can_remove else self.db.tombstones()
        scores, keys = self.index.search(q, fetch, allowed=allowed, excluded=excluded)
        if rescore:
            out = [self._rescored(qi, row[row >= 0], k) for qi, row in zip(q, keys)]
        else:
            out = [self._hits(row[row >= 0][:k], s[row >= 0][:k]) for row, s in zip(keys, scores)]
        if allowed is not None:  # an approximate walk can still come back short: score those queries exactly
            want = min(k, len(allowed))
            for i in (i for i, hits in enumerate(out) if len(hits) < want):
                out[i] = self._exact(q[i:i + 1], k, allowed)[0]
        return out

    def _rescored(self, q: np.ndarray, keys: np.ndarray, k: int) -> list[Hit]:
        scores = self.db.vectors(keys, self.dim) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return self._hits(keys[order], scores[order])

    def _exact(self, q: np.ndarray, k: int, keys: np.ndarray) -> list[list[Hit]]:
        scores = q @ self.db.vectors(keys, self.dim).T  # (nq, n_allowed)
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            out.append(self._hits(keys[order], row[order]))
        return out

    def _hits(self, keys: np.ndarray, scores: np.ndarray) -> list[Hit]:
        rows = self.db.rows(keys)
        return [Hit(rows[k][0], float(s), rows[k][1], rows[k][2]) for k, s in zip(keys.tolist(), scores) if k in rows]

    def get(self, ids) -> list[Hit | None]:
        """The stored items by id (score nan), None for an unknown id."""
        keys = self.db.keys_of(list(ids))
        rows = self.db.rows(keys.values())
        return [Hit(i, float("nan"), rows[keys[i]][1], rows[keys[i]][2]) if i in keys else None for i in ids]

    def vectors(self, ids) -> np.ndarray:
        """(len(ids), dim) stored float vectors (unit length), in the order of ``ids`` (MMR reranking reads them)."""
        ids = list(ids)
        keys = self.db.keys_of(ids)
        missing = [i for i in ids if i not in keys]
        if missing:
            raise CubelmError(f"no item with id {missing[0]!r} in the index")
        return self.db.vectors([keys[i] for i in ids], self.dim)

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self) -> None:
        """Write the store as the new snapshot of ``self.path``, atomically (see ``cubelm.rag.snapshot``)."""
        self._ensure_built()
        writers = {ITEMS_FILE: self.db.save_to}
        if self.index.built:
            data = self.index.to_bytes()
            writers[INDEX_FILE] = lambda p: p.write_bytes(data)
        manifest = {"backend": self.backend, "dim": self.dim, "count": self.count(), "spec": self.spec.to_dict(),
                    "resolved": self.index.spec.to_dict(), "info": self.info}
        write_snapshot(self.path, writers, manifest)

    def close(self) -> None:
        self.db.conn.close()
