"""``cubelm eval bpb`` (bits per byte vs gzip -9 and a unigram baseline) and ``cubelm eval retrieval``
(``cubelm.eval.retrieval``: embedders x vector-index types on a labeled set built from the stdlib)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from cubelm.cli import opt


@dataclass(slots=True, kw_only=True)
class BpbOptions:
    model: str | None = opt(None, help="model directory; default: the default model")
    source: str = opt("package:tqdm", help="held-out text: package:NAME (an installed package's .py files) or a path")
    max_bytes: int = opt(200_000, help="stop adding documents after this many bytes")
    train_data: str | None = opt(None, help="packed training data for the unigram baseline (default: from the "
                                            "model's training_summary.json when present)")
    context: int = opt(256, help="tokens per scoring window")
    json: bool = opt(False, help="print JSON")


def run_bpb(o: BpbOptions) -> int:
    from pathlib import Path

    from cubelm.engine.commands import resolve_model_dir
    from cubelm.eval.bpb import evaluate_bpb, held_out_package, held_out_path
    model_dir = resolve_model_dir(o.model)
    held = (held_out_package(o.source.removeprefix("package:"), o.max_bytes) if o.source.startswith("package:")
            else held_out_path(o.source, o.max_bytes))
    train_data = o.train_data
    summary = Path(model_dir) / "training_summary.json"
    if train_data is None and summary.is_file():
        candidate = json.loads(summary.read_text()).get("data")
        train_data = candidate if candidate and Path(candidate, "meta.json").is_file() else None
    result = evaluate_bpb(model_dir, held, train_data=train_data, context=o.context)
    if o.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"held-out: {result['held_out']}: {result['num_documents']} documents, {result['num_bytes']:,} bytes")
    print(f"  model      {result['model_bpb']:.4f} bits/byte")
    print(f"  gzip -9    {result['gzip9_bpb']:.4f} bits/byte")
    if "unigram_bpb" in result:
        print(f"  unigram    {result['unigram_bpb']:.4f} bits/byte")
    print(f"  model beats gzip -9: {'yes' if result['beats_gzip'] else 'no'}")
    return 0


@dataclass(slots=True, kw_only=True)
class RetrievalOptions:
    embedder: str = opt("all-minilm-l6-v2", help="comma-separated embedders: all-minilm-l6-v2, a model directory, "
                                                  "'default' (the default model); NAME:POOLING overrides pooling")
    index: str = opt("flat,hnsw,ivfpq,sq8,binary", help="comma-separated faiss index types to compare")
    source: str = opt("stdlib", help="Python sources of the labeled set: 'stdlib' or a directory")
    questions: int = opt(500, help="questions sampled (seeded) from the usable docstrings")
    max_chunks: int = opt(2000, help="corpus size: whole files (seeded sample) are added until this many chunks")
    seed: int = opt(0, help="seed of the file order and the question sample")
    chunk_tokenizer: str = opt("all-minilm-l6-v2", help="embedder whose tokenizer cuts the chunks (one chunking, "
                                                         "so one set of labels, for every embedder)")
    max_tokens: int = opt(254, help="tokens per chunk (254 + [CLS]/[SEP] = MiniLM's 256)")
    overlap: int = opt(32, help="tokens repeated from one chunk into the next (as rag ingest)")
    rounds: int = opt(3, help="interleaved rounds of batch-1 searches timed per index type")
    hnsw_m: int = opt(32, help="HNSW: neighbours per node (M)")
    ef_construction: int = opt(200, help="HNSW: beam width while building (efConstruction)")
    ef_search: str = opt("128", help="HNSW: beam width while searching (efSearch); comma-separated values build "
                                      "one HNSW index each (a sweep)")
    nprobe: int = opt(0, help="IVF-PQ: lists visited per query (0 = nlist/4, at least 8)")
    device: str = opt("cpu", help="device for the embedders (cpu, cuda)")
    threads: int = opt(0, help="torch and faiss CPU threads (0 = their defaults; 1 is faster on a busy host)")
    out: str | None = opt(None, help="directory for retrieval.json, questions.jsonl and table.md")


def run_retrieval(o: RetrievalOptions) -> int:
    import torch

    from cubelm.errors import CubelmError
    try:
        import faiss
    except ImportError:
        raise CubelmError("cubelm eval retrieval needs faiss: pip install -e '.[rag]'") from None

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    if o.threads > 0:
        torch.set_num_threads(o.threads)
        faiss.omp_set_num_threads(o.threads)
    try:
        return _run_retrieval(o)
    finally:  # the thread counts are process-wide: give them back (the verb also runs in-process, in tests)
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def _run_retrieval(o: RetrievalOptions) -> int:
    from pathlib import Path

    from cubelm.data.tokenizer import load_tokenizer
    from cubelm.errors import CubelmError
    from cubelm.eval.retrieval import (embedder_lines, evaluate_embedder, index_variants, load_eval_embedder,
                                       markdown_table)
    from cubelm.eval.retrieval_set import build_retrieval_set
    from cubelm.rag.embedder import resolve_embedder
    from cubelm.rag.ingest import source_root
    from cubelm.systems.host import describe_host, host_info

    try:
        efs = [int(v) for v in o.ef_search.split(",") if v.strip()]
    except ValueError:
        raise CubelmError(f"--ef-search {o.ef_search!r}: give integers, e.g. 16,64,128") from None
    params = {"hnsw_m": o.hnsw_m, "ef_construction": o.ef_construction, "nprobe": o.nprobe}
    variants = index_variants([k.strip() for k in o.index.split(",") if k.strip()], params, efs)
    specs = [e.strip() for e in o.embedder.split(",") if e.strip()]
    if not specs or o.questions < 1 or o.max_chunks < 1 or o.rounds < 1:
        raise CubelmError("--embedder needs a name; --questions, --max-chunks and --rounds must be >= 1")
    source_root(o.source)
    tokenizer = load_tokenizer(resolve_embedder(o.chunk_tokenizer)[1])
    rset = build_retrieval_set(o.source, tokenizer, max_tokens=o.max_tokens, overlap=o.overlap,
                               num_questions=o.questions, max_chunks=o.max_chunks, seed=o.seed)
    print(f"host: {describe_host(host_info())}")
    print(f"set: {len(rset.questions)} questions, {len(rset.chunk_ids):,} chunks from {len(rset.files)} files of "
          f"{o.source} (seed {o.seed})", flush=True)
    results = []
    for spec in specs:
        emb = load_eval_embedder(spec, o.device)
        results.append(evaluate_embedder(emb, rset, variants, rounds=o.rounds))
        print(embedder_lines(results[-1:]), flush=True)
    table = markdown_table(results)
    print(table)
    if o.out:
        out = Path(o.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"host": host_info(), "options": {f: getattr(o, f) for f in o.__slots__},
                   "set": {"questions": len(rset.questions), "chunks": len(rset.chunk_ids), "files": rset.files},
                   "results": [r.to_dict() for r in results]}
        (out / "retrieval.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rset.to_jsonl_rows()))
        (out / "table.md").write_text(embedder_lines(results) + "\n\n" + table + "\n")
        print(f"wrote {out}/retrieval.json, questions.jsonl, table.md")
    return 0
