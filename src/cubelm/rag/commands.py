"""``cubelm rag ingest`` and ``cubelm rag query``.

The embedder comes from ``cubelm.rag.embedder.load_embedder`` (imported when a verb runs). The index records the
embedder's name and dimension (``store.info``); a query embeds with the same embedder and refuses one of another
dimension. ``--index`` is a directory (embedded faiss store) or ``http://HOST:PORT/COLLECTION`` (Chroma server).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


@dataclass(slots=True, kw_only=True)
class IngestOptions:
    source: str = opt(help="a directory (.py by ast, .md/.rst/.txt as text) or 'stdlib' (the standard library)")
    index: str = opt(help="index directory (created, or updated when it exists) or http://HOST:PORT/COLLECTION "
                          "(a Chroma server)")
    embedder: str = opt(DEFAULT_EMBEDDER, help="embedder name or model directory (cubelm.rag.embedder)")
    index_type: str | None = opt(None, help="faiss index type of a new embedded index (default: flat); an existing "
                                            "index keeps its own", choices=["flat", "hnsw", "ivfpq", "sq8", "binary"])
    hnsw_m: int = opt(32, help="HNSW: neighbours per node (M)")
    ef_construction: int = opt(200, help="HNSW: beam width while building (efConstruction)")
    ef_search: int = opt(128, help="HNSW: beam width while searching (efSearch)")
    nlist: int = opt(0, help="IVF-PQ: inverted lists (0 = 4*sqrt(n), at most n/39)")
    pq_m: int = opt(0, help="IVF-PQ: sub-quantizers, must divide the dimension (0 = dim/8)")
    nbits: int = opt(8, help="IVF-PQ: bits per sub-quantizer code")
    nprobe: int = opt(0, help="IVF-PQ: lists visited per query (0 = nlist/4, at least 8)")
    rescore: int = opt(-1, help="rescore rescore*k candidates with the float vectors (-1 = binary and ivfpq 10, "
                                "else 0)")
    max_tokens: int = opt(0, help="tokens per chunk (0 = the embedder's limit, special tokens excluded, "
                                  "at most 256)")
    overlap: int = opt(32, help="tokens repeated from one chunk into the next")
    batch_size: int = opt(64, help="chunks embedded per forward")
    max_files: int = opt(0, help="stop after this many files (0 = all)")
    device: str = opt("cpu", help="device for the embedder (cpu, cuda)")


@dataclass(slots=True, kw_only=True)
class QueryOptions:
    text: str = opt(help="the query", flag="TEXT")
    index: str = opt(help="index directory or http://HOST:PORT/COLLECTION")
    k: int = opt(5, flag="-k", help="number of chunks to return")
    where: list[str] = opt([], help="metadata filter KEY=VALUE (repeatable; all must hold), "
                                         "e.g. source=json/__init__.py")
    embedder: str | None = opt(None, help="embedder (default: the one the index was built with)")
    device: str = opt("cpu", help="device for the embedder (cpu, cuda)")
    json_output: bool = opt(False, flag="--json", help="print the hits as JSON")


def _load_embedder(name: str, device: str):
    try:
        from cubelm.rag.embedder import load_embedder
    except ImportError as e:
        raise CubelmError(f"no embedder support in this install ({e})") from None
    return load_embedder(name, device=device)


def _count(tokenizer, text: str) -> int:
    from cubelm.rag.tokens import TokenCounter
    return TokenCounter.of(tokenizer).count(text)


def _special_tokens(tokenizer) -> int:
    """Tokens the tokenizer adds around any text ([CLS] ... [SEP] = 2), so chunks leave room for them."""
    from cubelm.rag.tokens import TokenCounter
    backend = TokenCounter(tokenizer).backend
    return len(backend.encode("", add_special_tokens=True).ids) if backend is not None else 0


def run_ingest(o: IngestOptions) -> int:
    from cubelm.rag.ingest import ingest, source_root
    from cubelm.rag.store import open_store

    source_root(o.source)  # a bad --source fails before the embedder loads
    emb = _load_embedder(o.embedder, o.device)
    prompt = _prompt(emb, "passage", "document")  # e5/bge-style "passage: " prefixes when the model has them
    # room for [CLS]/[SEP] and the prompt (+1: a prompt and a chunk can tokenize one token longer joined)
    reserve = _special_tokens(emb.tokenizer) + (_count(emb.tokenizer, emb.prompts[prompt]) + 1 if prompt else 0)
    max_tokens = o.max_tokens or min(emb.max_tokens, 256) - reserve
    if max_tokens + reserve > emb.max_tokens:
        raise CubelmError(f"--max-tokens {max_tokens} + {reserve} special/prompt tokens is over the embedder's "
                          f"limit of {emb.max_tokens} tokens")
    info = {"embedder": emb.name, "dim": emb.dim, "max_tokens": max_tokens, "overlap": o.overlap,
            "source": o.source}
    params = dict(hnsw_m=o.hnsw_m, ef_construction=o.ef_construction, ef_search=o.ef_search, nlist=o.nlist,
                  pq_m=o.pq_m, nbits=o.nbits, nprobe=o.nprobe, rescore=o.rescore)
    store = open_store(o.index, dim=emb.dim, index=o.index_type, info=info, **params)
    built_with = store.info.get("embedder")
    if built_with not in (None, emb.name):
        raise CubelmError(f"{o.index} was built with embedder {built_with!r}; ingest with --embedder {built_with} "
                          "or into a new index")

    def progress(s):
        print(f"\r{s.files} files, {s.chunks} chunks, {s.tokens:,} tokens", end="", file=sys.stderr, flush=True)

    tty = sys.stderr.isatty()
    stats = ingest(o.source, store, lambda texts: emb.encode(texts, prompt_name=prompt), emb.tokenizer,
                   max_tokens=max_tokens, overlap=o.overlap, batch_size=o.batch_size, max_files=o.max_files,
                   progress=progress if tty else None)
    if tty:
        print(file=sys.stderr)
    store.save()
    print(f"indexed {stats.chunks} chunks ({stats.tokens:,} tokens) from {stats.files} files into {o.index} "
          f"({store.count()} items, {emb.name}, dim {emb.dim})")
    return 0


def _prompt(emb, *names: str) -> str | None:
    """The first of ``names`` the embedder has a prompt for (``config_sentence_transformers.json``), else None."""
    prompts = getattr(emb, "prompts", None) or {}
    return next((n for n in names if n in prompts), None)


def _parse_where(items: list[str]) -> dict | None:
    where = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CubelmError(f"--where {item!r}: expected KEY=VALUE")
        where[key] = int(value) if value.lstrip("-").isdigit() else value
    return where or None


def run_query(o: QueryOptions) -> int:
    from cubelm.rag.store import open_store

    store = open_store(o.index, create=False)  # a missing or corrupt index fails before the embedder loads
    name = o.embedder or store.info.get("embedder")
    if not name:
        raise CubelmError(f"{o.index} does not record its embedder; pass --embedder")
    emb = _load_embedder(name, o.device)
    if emb.dim != store.dim:
        raise CubelmError(f"embedder {emb.name} gives {emb.dim}-dim vectors but {o.index} holds {store.dim}-dim "
                          f"ones (built with {store.info.get('embedder')!r})")
    hits = store.search(emb.encode([o.text], prompt_name=_prompt(emb, "query")), o.k, where=_parse_where(o.where))[0]
    if o.json_output:
        print(json.dumps([{"id": h.id, "score": h.score, "text": h.text, "metadata": h.metadata} for h in hits],
                         indent=1, ensure_ascii=False))
        return 0
    for rank, h in enumerate(hits, 1):
        first = next((line for line in h.text.splitlines() if line.strip()), "").strip()
        print(f"{rank:2d}. {h.score:.4f}  {h.id}  {first[:90]}")
    return 0
