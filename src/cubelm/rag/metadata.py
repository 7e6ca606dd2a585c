"""The SQLite half of the embedded vector store: string ids <-> int64 keys, texts, metadata, float vectors.

One row per item: ``key`` (INTEGER PRIMARY KEY AUTOINCREMENT, the int64 id faiss knows the vector by; never
reused, so a key still inside an index that cannot remove vectors - HNSW - can never point at a newer item), the
caller's string ``id``, ``text``, ``metadata`` (JSON, filtered with JSON1) and the float32 ``vector`` (the source
of truth: IVF-PQ / SQ8 train on it, binary search and PQ rescore with it, an index is rebuilt from it).

The database is held in memory while a store is open and copied to / from a snapshot file with SQLite's backup
API: a snapshot on disk is always the (index, database) pair one ``save()`` wrote, never a database that moved
ahead of its index. ``tombstones`` lists keys deleted from the database but still inside the faiss index.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from cubelm.errors import CubelmError
from cubelm.rag.filters import parse_where, to_sql

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (key INTEGER PRIMARY KEY);
"""


def check_metadata(meta) -> dict:
    """Metadata is a flat dict of str -> str | int | float | bool (what both SQLite/JSON and Chroma can filter)."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CubelmError(f"metadata must be a dict, got {type(meta).__name__}")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
            raise CubelmError(f"metadata {k!r}: values must be str, int, float or bool, got {type(v).__name__}")
    return meta


class MetadataDB:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)

    @classmethod
    def new(cls) -> MetadataDB:
        return cls(sqlite3.connect(":memory:"))

    @classmethod
    def load(cls, path: Path) -> MetadataDB:
        conn = sqlite3.connect(":memory:")
        try:
            src = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
            src.backup(conn)
            src.close()
            conn.execute("SELECT count(*) FROM items").fetchone()
        except sqlite3.DatabaseError as e:
            raise CubelmError(f"{path} is not a readable item database ({e}); rebuild the index") from None
        return cls(conn)

    def save_to(self, path: Path) -> None:
        dest = sqlite3.connect(path)
        with dest:
            self.conn.backup(dest)
        dest.close()

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM items").fetchone()[0]

    def keys_of(self, ids: list[str]) -> dict[str, int]:
        out = {}
        for i in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[i:i + 900]
            q = f"SELECT id, key FROM items WHERE id IN ({','.join('?' * len(part))})"
            out.update(self.conn.execute(q, part).fetchall())
        return out

    def insert(self, ids: list[str], texts: list[str], metadatas: list[dict], vectors: np.ndarray) -> np.ndarray:
        """Insert rows; their new keys (int64) in order."""
        cur = self.conn.cursor()
        keys = []
        for i, t, m, v in zip(ids, texts, metadatas, vectors):
            cur.execute("INSERT INTO items (id, text, metadata, vector) VALUES (?, ?, ?, ?)",
                        (i, t, json.dumps(m, ensure_ascii=False), v.astype(np.float32).tobytes()))
            keys.append(cur.lastrowid)
        self.conn.commit()
        return np.asarray(keys, dtype=np.int64)

    def delete_keys(self, keys, *, tombstone: bool) -> None:
        rows = [(int(k),) for k in keys]
        self.conn.executemany("DELETE FROM items WHERE key = ?", rows)
        if tombstone:
            self.conn.executemany("INSERT OR IGNORE INTO tombstones (key) VALUES (?)", rows)
        self.conn.commit()

    def tombstones(self) -> np.ndarray:
        return np.asarray([k for (k,) in self.conn.execute("SELECT key FROM tombstones")], dtype=np.int64)

    def clear_tombstones(self) -> None:
        self.conn.execute("DELETE FROM tombstones")
        self.conn.commit()

    def filter_keys(self, where: dict | None) -> np.ndarray:
        tree = parse_where(where)
        sql, params = ("1", []) if tree is None else to_sql(tree)
        rows = self.conn.execute(f"SELECT key FROM items WHERE {sql} ORDER BY key", params).fetchall()
        return np.asarray([k for (k,) in rows], dtype=np.int64)

    def rows(self, keys) -> dict[int, tuple[str, str, dict]]:
        """key -> (id, text, metadata)."""
        out = {}
        keys = [int(k) for k in keys]
        for i in range(0, len(keys), 900):
            part = keys[i:i + 900]
            q = f"SELECT key, id, text, metadata FROM items WHERE key IN ({','.join('?' * len(part))})"
            for key, id_, text, meta in self.conn.execute(q, part):
                out[key] = (id_, text, json.loads(meta))
        return out

    def vectors(self, keys, dim: int) -> np.ndarray:
        """(len(keys), dim) float32 in the order of ``keys`` (all must exist)."""
        keys = [int(k) for k in keys]
        found = {}
        for i in range(0, len(keys), 900):
            part = keys[i:i + 900]
            q = f"SELECT key, vector FROM items WHERE key IN ({','.join('?' * len(part))})"
            found.update(self.conn.execute(q, part).fetchall())
        out = np.empty((len(keys), dim), dtype=np.float32)
        for row, k in enumerate(keys):
            out[row] = np.frombuffer(found[k], dtype=np.float32)
        return out

    def all_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, vector), by key."""
        rows = self.conn.execute("SELECT key, vector FROM items ORDER BY key").fetchall()
        keys = np.asarray([k for k, _ in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(v for _, v in rows), dtype=np.float32).reshape(len(rows), dim)
        return keys, vecs.copy()
