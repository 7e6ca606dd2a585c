"""Retrieval quality and cost on the labeled stdlib set: MiniLM vs cubelm's default model x every index type.

    CUBELM_HOME=/work/demo-home python benchmarks/retrieval.py                 # ~8 min on a busy 2-core host
    python benchmarks/retrieval.py --max-chunks 300 --questions 50            # a quick look
    python benchmarks/retrieval.py -- --ef-search 16                          # extra flags for the verb

The docs/benchmarks.md table is this script's output: ``cubelm eval retrieval`` (``cubelm.eval.retrieval``) with
the settings below. The embedders run one after the other; inside one, searches of the index types are timed in
interleaved rounds (flat, hnsw, ivfpq, sq8, binary, flat, ...), so latency ratios between index types are fair
on a shared host. One torch/faiss thread by default: on a loaded 2-core machine two threads spin waiting for each
other (a batch-1 MiniLM query: 25 ms on 1 thread, 400-1200 ms on 2 here).
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedders", default="all-minilm-l6-v2,default,default:mean")
    ap.add_argument("--index", default="flat,hnsw,ivfpq,sq8,binary")
    ap.add_argument("--max-chunks", type=int, default=3000)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/cubelm-retrieval")
    ap.add_argument("extra", nargs="*", help="more `cubelm eval retrieval` flags, after --")
    a = ap.parse_args()

    from cubelm.cli import main as cubelm_main
    return cubelm_main(["eval", "retrieval", "--embedder", a.embedders, "--index", a.index,
                        "--max-chunks", str(a.max_chunks), "--questions", str(a.questions),
                        "--rounds", str(a.rounds), "--threads", str(a.threads), "--out", a.out, *a.extra])


if __name__ == "__main__":
    sys.exit(main())
