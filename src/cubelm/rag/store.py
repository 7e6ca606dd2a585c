"""``cubelm.rag.store``: one vector-store interface, an embedded backend (faiss + SQLite) and a server one (Chroma).

``open_store(path_or_url, ...)`` picks the backend: a directory path is the embedded store
(``cubelm.rag.faiss_store``: faiss index + SQLite texts/metadata, atomic snapshots), an ``http://HOST:PORT/NAME``
URL is collection NAME on a Chroma server (``cubelm.rag.chroma_store``). Both hold (id, vector, text, metadata)
items, score by cosine similarity (vectors are L2-normalized on the way in), filter with the same ``where``
syntax (``cubelm.rag.filters``) and raise ``CubelmError`` for bad input: an id added twice, a vector of another
dimension, an unknown index, a corrupt file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from cubelm.errors import CubelmError


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float  # cosine similarity (higher is closer)
    text: str
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class VectorStore(Protocol):
    dim: int
    info: dict  # free-form facts persisted with the store (embedder name, chunking parameters, ...)

    def add(self, ids: list[str], vectors, texts: list[str] | None = None,
            metadatas: list[dict] | None = None) -> None: ...

    def upsert(self, ids: list[str], vectors, texts: list[str] | None = None,
               metadatas: list[dict] | None = None) -> None: ...

    def delete(self, ids: list[str] | None = None, *, where: dict | None = None) -> int: ...

    def search(self, vectors, k: int = 10, where: dict | None = None) -> list[list[Hit]]: ...

    def get(self, ids: list[str]) -> list[Hit | None]: ...

    def count(self) -> int: ...

    def save(self) -> None: ...


def as_matrix(vectors, dim: int | None, what: str = "vectors") -> np.ndarray:
    """Torch tensor / numpy array / nested list -> (n, d) C-contiguous float32, L2-normalized, dim checked."""
    if hasattr(vectors, "detach"):  # torch, without importing it
        vectors = vectors.detach().to("cpu").float().numpy()
    x = np.asarray(vectors, dtype=np.float32)
    if x.size == 0 and dim is not None:  # an empty batch: nothing to add, nothing to search
        return np.empty((0, dim), dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise CubelmError(f"{what} must be (n, dim) or (dim,), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise CubelmError(f"{what} have dimension {x.shape[1]} but the store holds {dim}-dim vectors "
                          "(was it built with another embedder?)")
    if not np.isfinite(x).all():
        raise CubelmError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise CubelmError(f"{what} contain an all-zero vector (no direction, no cosine similarity)")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def check_items(ids, n: int, texts, metadatas) -> tuple[list[str], list[str], list[dict]]:
    """Validate the parallel lists of an add/upsert (texts default to "", metadata to {})."""
    from cubelm.rag.metadata import check_metadata

    ids = list(ids)
    if len(ids) != n:
        raise CubelmError(f"got {len(ids)} ids for {n} vectors")
    if any(not isinstance(i, str) or not i for i in ids):
        raise CubelmError("ids must be non-empty strings")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CubelmError(f"id {dup!r} appears twice in one call")
    texts = [""] * n if texts is None else list(texts)
    metadatas = [{}] * n if metadatas is None else [check_metadata(m) for m in metadatas]
    if len(texts) != n or len(metadatas) != n:
        raise CubelmError(f"got {len(texts)} texts and {len(metadatas)} metadatas for {n} ids")
    return ids, texts, metadatas


def is_url(path_or_url: str) -> bool:
    return str(path_or_url).startswith(("http://", "https://"))


def open_store(path_or_url, *, dim: int | None = None, index: str | None = None, info: dict | None = None,
               create: bool | None = None, **index_params) -> VectorStore:
    """Open the store at ``path_or_url``; create it when it does not exist and ``dim`` is given.

    ``index`` (flat | hnsw | ivfpq | sq8 | binary) and ``index_params`` (``IndexSpec`` fields) apply to a new
    embedded store; ``create=False`` never creates, ``create=True`` requires a new one.
    """
    if is_url(path_or_url):
        from cubelm.rag.chroma_store import ChromaStore
        store = ChromaStore.connect(str(path_or_url), dim=dim, info=info, create=create)
    else:
        from cubelm.rag.faiss_store import FaissStore
        from cubelm.rag.faiss_index import IndexSpec
        from cubelm.rag.snapshot import is_snapshot_root
        exists = is_snapshot_root(path_or_url)
        if exists and create is True:
            raise CubelmError(f"an index already exists at {path_or_url}")
        if exists or create is False or dim is None:
            store = FaissStore.open(path_or_url)
            if index is not None and store.spec.kind != index:
                raise CubelmError(f"the index at {path_or_url} is a {store.spec.kind!r} index, not {index!r}; "
                                  "rebuild it into a new directory to change its type")
        else:
            store = FaissStore.create(path_or_url, dim, IndexSpec(kind=index or "flat", **index_params), info=info)
    if dim is not None and store.dim != dim:
        raise CubelmError(f"the index at {path_or_url} holds {store.dim}-dim vectors, not {dim} "
                          "(it was built with another embedder)")
    return store
