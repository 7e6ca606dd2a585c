"""The faiss indexes of the embedded store behind one small class: build (train), add, remove, search.

Vectors are L2-normalized float32, so the inner product is the cosine similarity; every float index uses
``METRIC_INNER_PRODUCT``. Kinds (``IndexSpec.kind``):

- ``flat``: exact (``IndexFlatIP``). - ``hnsw``: graph (``IndexHNSWFlat``: M, efConstruction, efSearch).
- ``ivfpq``: inverted lists + product quantization (nlist, m sub-quantizers of nbits); trained on the vectors
  present at build; candidates rescored with the float vectors (``rescore``x k of them) since PQ scores are
  coarse. - ``sq8``: 8-bit scalar quantization per dimension (trained: per-dim ranges).
- ``binary``: the sign bit of each dimension (``IndexBinaryFlat``, Hamming distance, dim/8 bytes a vector, 32x
  smaller than float32), always followed by a float rescoring of the top ``rescore`` x k candidates - the
  "binary quantization + rescoring" recipe of sentence-transformers' ``quantize_embeddings`` docs.

Keys are the store's int64 SQLite keys: ``IndexIDMap2``/``IndexBinaryIDMap2`` around flat, HNSW, SQ8 and binary;
IVF keeps ids in its inverted lists natively (wrapping it in an IDMap would break ``remove_ids``, which for
IDMap assumes the sub-index renumbers like a flat one). HNSW cannot remove vectors: the store tombstones them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import numpy as np

from cubelm.errors import CubelmError

KINDS = ("flat", "hnsw", "ivfpq", "sq8", "binary")
# NOTE: a search of fewer queries than this runs on one OpenMP thread. faiss splits even a single query across
# threads, which buys at most the core count on an idle host but costs 10-100x on a busy one (threads spin
# waiting for each other: 20k x 384 flat, one query: 4.6 ms on 1 thread, 52 ms on 2 busy cores). OpenMP's
# thread count is per calling thread, so this does not touch searches running in other Python threads.
SMALL_BATCH = 16


@contextmanager
def _omp_threads(n: int):
    import faiss
    before = faiss.omp_get_max_threads()
    if n and n != before:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        if n and n != before:
            faiss.omp_set_num_threads(before)


@dataclass(slots=True, kw_only=True)
class IndexSpec:
    """Index type and parameters; 0 / -1 mean "choose from the data at build" (see ``resolved``)."""
    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0  # IVF lists; auto: 4*sqrt(n), at most n/39 (faiss' points-per-centroid floor)
    pq_m: int = 0  # PQ sub-quantizers (must divide dim); auto: dim/8 (8 dimensions per byte code)
    nbits: int = 8  # bits per PQ code
    nprobe: int = 0  # IVF lists visited per query; auto: nlist/4, at least 8
    rescore: int = -1  # candidates rescored with float vectors = rescore * k; auto: binary and ivfpq 10, else 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CubelmError(f"index type {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "nbits"):
            if getattr(self, name) < 1:
                raise CubelmError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nlist", "pq_m", "nprobe"):
            if getattr(self, name) < 0:
                raise CubelmError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if not 1 <= self.nbits <= 16:
            raise CubelmError(f"nbits must be in 1..16, got {self.nbits}")
        if self.rescore < -1:
            raise CubelmError(f"rescore must be >= 0, or -1 for automatic, got {self.rescore}")

    @property
    def effective_rescore(self) -> int:
        if self.rescore >= 0:
            return max(self.rescore, 1) if self.kind == "binary" else self.rescore  # Hamming alone is too coarse
        return {"binary": 10, "ivfpq": 10}.get(self.kind, 0)

    def resolved(self, dim: int, n: int) -> IndexSpec:
        """Automatic values filled in for ``n`` training vectors of ``dim``; checks the data can train it."""
        if self.kind == "binary" and dim % 8:
            raise CubelmError(f"a binary index needs a dimension divisible by 8, got {dim}; use another index type")
        if self.kind != "ivfpq":
            return replace(self)
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
        pq_m = self.pq_m or max(d for d in range(1, max(dim // 8, 1) + 1) if dim % d == 0)
        if dim % pq_m:
            raise CubelmError(f"pq_m={pq_m} must divide the dimension {dim}")
        need = max(nlist, 2 ** self.nbits)
        if n < need:
            raise CubelmError(f"IVF-PQ needs at least {need} vectors to train (nlist={nlist}, nbits={self.nbits}), "
                              f"got {n}; add more vectors, lower --nlist/--nbits, or use the flat or hnsw index")
        return replace(self, nlist=nlist, pq_m=pq_m, nprobe=min(nlist, self.nprobe or max(8, nlist // 4)))

    def to_dict(self) -> dict:
        return asdict(self)


class FaissIndex:
    """One faiss index over int64 keys (``build`` first for a trained kind; every kind builds the same way)."""

    def __init__(self, spec: IndexSpec, dim: int, index=None) -> None:
        self.spec, self.dim, self.index = spec, dim, index

    @property
    def built(self) -> bool:
        return self.index is not None

    @property
    def needs_training(self) -> bool:
        return self.spec.kind in ("ivfpq", "sq8")

    @property
    def can_remove(self) -> bool:
        return self.spec.kind != "hnsw"

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """A fresh index over exactly these vectors (trained on them when the kind trains)."""
        import faiss

        self.spec = self.spec.resolved(self.dim, len(vectors))
        s, d, ip = self.spec, self.dim, faiss.METRIC_INNER_PRODUCT
        if s.kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        elif s.kind == "hnsw":
            base = faiss.IndexHNSWFlat(d, s.hnsw_m, ip)
            base.hnsw.efConstruction = s.ef_construction
            index = faiss.IndexIDMap2(base)
        elif s.kind == "sq8":
            base = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
            base.train(vectors)
            index = faiss.IndexIDMap2(base)
        elif s.kind == "ivfpq":
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, s.nlist, s.pq_m, s.nbits, ip)
            index.train(vectors)
        else:
            index = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(d))
        self.index = index
        if len(vectors):
            self.add(keys, vectors)

    def _codes(self, vectors: np.ndarray) -> np.ndarray:
        return np.packbits(vectors > 0, axis=1) if self.spec.kind == "binary" else vectors

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(self._codes(vectors), keys.astype(np.int64))

    def remove(self, keys: np.ndarray) -> None:
        import faiss
        self.index.remove_ids(faiss.IDSelectorBatch(keys.astype(np.int64)))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys), each (nq, k), best first; key -1 pads. Binary scores are minus Hamming distances.

        ``allowed`` / ``excluded`` restrict the search inside faiss through an ``IDSelector`` (a filter's
        matches / HNSW's tombstones), so k results come back whenever k items pass.
        """
        import faiss

        s = self.spec
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(allowed.astype(np.int64))
        elif excluded is not None and len(excluded):
            inner = faiss.IDSelectorBatch(excluded.astype(np.int64))
            sel = faiss.IDSelectorNot(inner)
            sel.referenced_inner = inner  # keep the wrapped selector alive as long as sel
        if s.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            # a walk that skips non-passing nodes meets a passing one every ntotal/len(allowed) nodes: widen
            # the beam by that factor so a selective filter still finds k neighbours
            widen = 1 if allowed is None else self.ntotal / max(len(allowed), 1)
            params.efSearch = int(min(max(s.ef_search, k) * widen, max(self.ntotal, s.ef_search)))
        elif s.kind == "ivfpq":
            params = faiss.SearchParametersIVF()
            params.nprobe = s.nprobe
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        with _omp_threads(1 if len(queries) < SMALL_BATCH else 0):
            dist, keys = self.index.search(self._codes(queries), k, params=params)
        if s.kind == "binary":
            dist = -dist.astype(np.float32)
        return dist, keys

    def to_bytes(self) -> bytes:
        import faiss
        fn = faiss.serialize_index_binary if self.spec.kind == "binary" else faiss.serialize_index
        return fn(self.index).tobytes()

    @classmethod
    def from_bytes(cls, spec: IndexSpec, dim: int, data: bytes, where: str) -> FaissIndex:
        import faiss
        fn = faiss.deserialize_index_binary if spec.kind == "binary" else faiss.deserialize_index
        try:
            index = fn(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise CubelmError(f"{where} is not a readable faiss index ({str(e).splitlines()[0][-80:]}); "
                              "rebuild the index") from None
        if index.d != dim:
            raise CubelmError(f"{where} holds {index.d}-dim vectors but the manifest says {dim}; rebuild the index")
        return cls(spec, dim, index)
