"""The server backend: the ``VectorStore`` interface over a collection on a Chroma server (``chroma run``).

``open_store("http://HOST:PORT/COLLECTION", dim=...)`` connects with chromadb's ``HttpClient`` and creates the
collection (cosine HNSW space) when it is missing and ``dim`` is given. The server persists every write, so
``save()`` has nothing to do. Semantics match the embedded store: ``add`` refuses an id already present (Chroma
itself silently ignores it), vectors are L2-normalized and dimension-checked on the client, the score is the
cosine similarity (1 - Chroma's cosine distance), ``where`` is the same syntax (compiled by
``cubelm.rag.filters.to_chroma``). The store's dimension and ``info`` live in the collection's metadata.
"""

from __future__ import annotations

import json
from urllib.parse import urlparse

from cubelm.errors import CubelmError
from cubelm.rag.filters import parse_where, to_chroma
from cubelm.rag.store import Hit, as_matrix, check_items

_DIM_KEY, _INFO_KEY = "cubelm_dim", "cubelm_info"


def _chroma_call(what: str, fn, *args, **kwargs):
    """Run a chromadb call; its errors (bad request, connection refused) become one-line CubelmErrors."""
    try:
        return fn(*args, **kwargs)
    except CubelmError:
        raise
    except Exception as e:  # chromadb raises its own error classes, httpx ones, and ValueError
        raise CubelmError(f"chroma server: {what} failed: {' '.join(str(e).split())[:200]}") from None


class ChromaStore:
    backend = "chroma"

    def __init__(self, url: str, collection, dim: int, info: dict) -> None:
        self.url, self.collection, self.dim, self.info = url, collection, dim, info

    @classmethod
    def connect(cls, url: str, *, dim: int | None = None, info: dict | None = None,
                create: bool | None = None) -> ChromaStore:
        import chromadb
        from chromadb.config import Settings

        parsed = urlparse(url)
        name = parsed.path.strip("/")
        if not name or not parsed.hostname:
            raise CubelmError(f"a Chroma store URL is http://HOST:PORT/COLLECTION, got {url!r}")
        client = _chroma_call("connect", chromadb.HttpClient, host=parsed.hostname, port=parsed.port or 8000,
                              ssl=parsed.scheme == "https", settings=Settings(anonymized_telemetry=False))
        existing = {c.name for c in _chroma_call("list collections", client.list_collections)}
        if name in existing:
            if create is True:
                raise CubelmError(f"collection {name!r} already exists on {parsed.netloc}")
            col = _chroma_call("get collection", client.get_collection, name, embedding_function=None)
            meta = col.metadata or {}
            if _DIM_KEY not in meta:
                raise CubelmError(f"collection {name!r} was not created by cubelm (no {_DIM_KEY} in its metadata)")
            return cls(url, col, int(meta[_DIM_KEY]), json.loads(meta.get(_INFO_KEY, "{}")))
        if dim is None or create is False:
            raise CubelmError(f"no collection {name!r} on the Chroma server at {parsed.netloc}")
        info = dict(info or {})
        col = _chroma_call("create collection", client.create_collection, name, embedding_function=None,
                           configuration={"hnsw": {"space": "cosine"}},
                           metadata={_DIM_KEY: dim, _INFO_KEY: json.dumps(info)})
        return cls(url, col, dim, info)

    def add(self, ids, vectors, texts=None, metadatas=None) -> None:
        x = as_matrix(vectors, self.dim)
        ids, texts, metadatas = check_items(ids, len(x), texts, metadatas)
        present = _chroma_call("get", self.collection.get, ids=ids, include=[])["ids"]
        if present:
            raise CubelmError(f"id {present[0]!r} is already in the store; use upsert to replace it")
        _chroma_call("add", self.collection.add, ids=ids, embeddings=x, documents=texts,
                     metadatas=[m or None for m in metadatas])

    def upsert(self, ids, vectors, texts=None, metadatas=None) -> None:
        x = as_matrix(vectors, self.dim)
        ids, texts, metadatas = check_items(ids, len(x), texts, metadatas)
        # delete first: Chroma's upsert merges metadata keys instead of replacing the item's metadata
        _chroma_call("delete", self.collection.delete, ids=ids)
        _chroma_call("add", self.collection.add, ids=ids, embeddings=x, documents=texts,
                     metadatas=[m or None for m in metadatas])

    def delete(self, ids=None, *, where: dict | None = None) -> int:
        if ids is None and where is None:
            raise CubelmError("delete needs ids or a where filter")
        tree = parse_where(where)
        kw = {"ids": list(ids) if ids is not None else None, "where": to_chroma(tree) if tree else None}
        doomed = _chroma_call("get", self.collection.get, include=[], **kw)["ids"]
        if doomed:
            _chroma_call("delete", self.collection.delete, ids=doomed)
        return len(doomed)

    def count(self) -> int:
        return _chroma_call("count", self.collection.count)

    def search(self, vectors, k: int = 10, where: dict | None = None) -> list[list[Hit]]:
        q = as_matrix(vectors, self.dim, "query vectors")
        if not isinstance(k, int) or k < 1:
            raise CubelmError(f"k must be a positive integer, got {k!r}")
        tree = parse_where(where)
        n = self.count()
        if n == 0:
            return [[] for _ in q]
        r = _chroma_call("query", self.collection.query, query_embeddings=q, n_results=min(k, n),
                         where=to_chroma(tree) if tree else None, include=["documents", "metadatas", "distances"])
        return [[Hit(i, 1.0 - float(dist), doc or "", meta or {}) for i, dist, doc, meta in zip(*row)]
                for row in zip(r["ids"], r["distances"], r["documents"], r["metadatas"])]

    def get(self, ids) -> list[Hit | None]:
        ids = list(ids)
        r = _chroma_call("get", self.collection.get, ids=ids, include=["documents", "metadatas"])
        found = {i: Hit(i, float("nan"), d or "", m or {}) for i, d, m in zip(r["ids"], r["documents"],
                                                                            r["metadatas"])}
        return [found.get(i) for i in ids]

    def save(self) -> None:
        """Nothing to do: the server persists each write."""

    def close(self) -> None:
        """Nothing to release: chromadb's HTTP client holds no open handle that needs closing."""
