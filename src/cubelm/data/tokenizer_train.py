"""``cubelm tokenizer train``: clean a corpus, train a byte-level BPE tokenizer on it, save it, report statistics.

    cubelm tokenizer train --source stdlib --out /tmp/tok --vocab-size 4096

The cleaned documents go to a temporary JSONL file next to the output (deleted afterwards) so the corpus streams
twice, once for training and once for the statistics, without being held in memory. The statistics (characters
per token, tokens per document p50/p95/max, documents that fit ``--context``) are printed and saved as
``stats.json`` in the tokenizer directory. Training on the full standard library (31 MB) with a 4,096-token
vocabulary takes about 4 s on 2 cores, so no sampling is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from cubelm.data.clean import CleanConfig
from cubelm.data.prepare import clean_to_jsonl, iter_jsonl_documents
from cubelm.data.sources import Corpus
from cubelm.data.tokenizer import Tokenizer, TokenizerConfig, format_stats, token_stats, train_tokenizer
from cubelm.errors import CubelmError

BATCH_DOCS = 256


def corpus_stats(tokenizer: Tokenizer, docs_path: Path, context: int) -> dict:
    counts, num_chars, batch = [], 0, []
    for doc, _ in iter_jsonl_documents(docs_path):
        batch.append(doc.prompt + doc.text)
        num_chars += len(batch[-1])
        if len(batch) == BATCH_DOCS:
            counts += [len(ids) for ids in tokenizer.encode_batch(batch)]
            batch = []
    counts += [len(ids) for ids in tokenizer.encode_batch(batch)]
    return token_stats(counts, num_chars, context)


def train_from_source(corpus: Corpus, out_dir: Path, clean: CleanConfig, config: TokenizerConfig, *,
                      context: int = 1024, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_path = out_dir / ".documents.tmp.jsonl"
    try:
        report, _ = clean_to_jsonl(corpus, docs_path, clean)
        if report.kept == 0:
            raise CubelmError(f"no documents left after cleaning ({report.read} read); check --source or "
                              "relax the filters (--min-chars, --min-alnum-fraction)")
        tokenizer = train_tokenizer((d.prompt + d.text for d, _ in iter_jsonl_documents(docs_path)), config)
        tokenizer.save(out_dir)
        stats = {"vocab_size": tokenizer.vocab_size, **corpus_stats(tokenizer, docs_path, context)}
    finally:
        docs_path.unlink(missing_ok=True)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"trained on {report.kept:,} of {report.read:,} documents ({report.chars_kept:,} chars)")
    log(format_stats(stats))
    return stats
