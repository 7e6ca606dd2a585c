"""The data pipeline behind ``cubelm data prepare``: read → clean (+ report) → tokenizer → pack.

    cubelm data prepare --source stdlib --out data/stdlib --vocab-size 4096

Cleaned documents stream into ``OUT/documents.jsonl`` as they pass the filters; the tokenizer trains from that
file and the packer reads it again, so the corpus is never held in memory (only hashes and MinHash signatures
are). Everything is deterministic: the same input and options give byte-identical shards, tokenizer and
``meta.json`` (no timestamps in any output file).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cubelm.data.clean import CleanConfig, Cleaner
from cubelm.data.pack import pack, split_by_hash
from cubelm.data.packed import FORMAT, token_dtype, write_meta
from cubelm.data.report import CleanReport
from cubelm.data.sources import Corpus, Document
from cubelm.data.tokenizer import (SPECIAL_TOKENS, Tokenizer, TokenizerConfig, format_stats, load_tokenizer,
                                   token_stats, train_tokenizer)
from cubelm.errors import CubelmError

DOCUMENTS = "documents.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(slots=True, kw_only=True)
class PrepareConfig:
    clean: CleanConfig
    tokenizer: TokenizerConfig
    tokenizer_dir: str | None = None  # an existing tokenizer; None trains one into OUT/tokenizer
    val_fraction: float = 0.01
    context: int = 1024  # for the "documents that fit" statistic

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise CubelmError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.context < 1:
            raise CubelmError(f"context must be positive, got {self.context}")


def clean_to_jsonl(corpus: Corpus, path: Path, config: CleanConfig) -> tuple[CleanReport, list[str]]:
    """Stream the corpus through the cleaner into a JSONL file; returns the report and the kept digests."""
    cleaner = Cleaner(config, corpus.spec)
    digests = []
    with path.open("w", encoding="utf-8") as f:
        for doc, digest in cleaner(corpus):
            record = {"id": doc.id, "sha256": digest, "text": doc.text}
            if doc.prompt:
                record["prompt"] = doc.prompt
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            digests.append(digest)
    return cleaner.report, digests


def iter_jsonl_documents(path: Path) -> Iterator[tuple[Document, str]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            yield Document(r["id"], r["text"], prompt=r.get("prompt", "")), r["sha256"]


def get_tokenizer(docs_path: Path, out_dir: Path, config: PrepareConfig) -> Tokenizer:
    """Load ``--tokenizer`` (copied into OUT/tokenizer so OUT is self-contained) or train one on the documents."""
    target = out_dir / "tokenizer"
    if config.tokenizer_dir:
        tokenizer = load_tokenizer(config.tokenizer_dir)
        if tokenizer.eos_token_id is None:
            raise CubelmError(f"the tokenizer in {config.tokenizer_dir} has no EOS token (eos_token in "
                              "tokenizer_config.json), which separates packed documents; use one that has")
        source = Path(config.tokenizer_dir)
        if source.resolve() != target.resolve():
            target.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, target / name)
        return tokenizer
    texts = (doc.prompt + doc.text for doc, _ in iter_jsonl_documents(docs_path))
    tokenizer = train_tokenizer(texts, config.tokenizer)
    tokenizer.save(target)
    return tokenizer


def prepare(corpus: Corpus, out_dir: str | Path, config: PrepareConfig, log=print) -> dict:
    """Run the whole pipeline into ``out_dir``; returns the meta.json contents."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("meta.json", "train.mask.bin", "val.mask.bin"):  # a half-written directory must not look
        (out / stale).unlink(missing_ok=True)  # complete, nor keep masks from an earlier instruct run
    docs_path = out / DOCUMENTS
    report, digests = clean_to_jsonl(corpus, docs_path, config.clean)
    report.write(out)
    log(report.to_text().rstrip())
    if report.kept == 0:
        raise CubelmError(f"no documents left after cleaning ({report.read} read; see {out / 'report.txt'}); "
                          "check --source or relax the filters (--min-chars, --min-alnum-fraction)")
    tokenizer = get_tokenizer(docs_path, out, config)
    masked = corpus.kind == "instruct"
    result = pack(iter_jsonl_documents(docs_path), tokenizer, out,
                  val_digests=split_by_hash(digests, config.val_fraction), masked=masked)
    stats = token_stats(result.tokens_per_document, result.num_chars, config.context)
    log(format_stats(stats))
    meta = build_meta(corpus, report, tokenizer, result, config, stats)
    write_meta(out, meta)
    return meta


def build_meta(corpus: Corpus, report: CleanReport, tokenizer: Tokenizer, result, config: PrepareConfig,
               stats: dict) -> dict:
    return {
        "format": FORMAT, "dtype": token_dtype(tokenizer.vocab_size).name, "byte_order": "little",
        "vocab_size": tokenizer.vocab_size, "num_tokens": result.num_tokens,
        "num_documents": result.num_documents, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "special_tokens": {t: tokenizer.backend.token_to_id(t) for t in SPECIAL_TOKENS},
        "document_separator": "eos_after_each_document", "has_mask": corpus.kind == "instruct",
        "kind": corpus.kind, "source": corpus.spec, "source_sha256": report.source_sha256,
        "tokenizer_sha256": tokenizer.sha256, "tokenizer_dir": "tokenizer",
        "val_fraction": config.val_fraction, "clean": asdict(config.clean), "stats": stats,
    }


def main() -> None:
    from cubelm.data.sources import resolve_source

    out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/cubelm-data"
    prepare(resolve_source(sys.argv[1] if len(sys.argv) > 1 else "stdlib"), out,
            PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig()))


if __name__ == "__main__":
    main()
