"""Packing: tokenize cleaned documents and append them to the train/val shards (format: ``cubelm.data.packed``).

Documents are tokenized in batches (the Rust tokenizer uses both cores) and streamed to disk, so memory holds one
batch, never the corpus. The split is decided per document from its content hash (``split_by_hash``), which is
deterministic and keeps every copy of a text on one side. Each document's ids are followed by EOS; for instruct
documents the prompt's tokens get mask 0 and the response's tokens (and its EOS) mask 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cubelm.data.packed import SPLITS, shard_path, token_dtype
from cubelm.data.sources import Document
from cubelm.data.tokenizer import Tokenizer

BATCH_DOCS = 256


def hash_fraction(sha256_hex: str) -> float:
    return int(sha256_hex[:13], 16) / 16**13


def split_by_hash(digests: Sequence[str], val_fraction: float) -> set[str]:
    """The validation digests: those whose hash falls below ``val_fraction``. With at least two documents and a
    positive fraction, val gets at least one document and train keeps at least one (smallest / largest hash)."""
    val = {d for d in digests if hash_fraction(d) < val_fraction}
    unique = sorted(set(digests))
    if val_fraction > 0 and len(unique) >= 2:
        if not val:
            val = {unique[0]}
        if len(val) == len(unique):
            val.discard(unique[-1])
    return val


@dataclass(slots=True)
class SplitWriter:
    """Appends documents to one split's token (and mask) shard."""

    path: Path
    dtype: np.dtype
    masked: bool
    num_tokens: int = 0
    num_documents: int = 0
    _files: list = field(default_factory=list)

    def __enter__(self) -> SplitWriter:
        self._files = [open(self.path, "wb")]
        if self.masked:
            self._files.append(open(self.path.with_suffix(".mask.bin"), "wb"))
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files:
            f.close()

    def write(self, ids: list[int], mask: list[int] | None) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self._files[0])
        if self.masked:
            np.asarray(mask, dtype=np.uint8).tofile(self._files[1])
        self.num_tokens += len(ids)
        self.num_documents += 1


@dataclass(slots=True)
class PackResult:
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    tokens_per_document: list[int]  # text tokens, without the EOS, for statistics
    num_chars: int


def _encode(batch: list[tuple[Document, str]], tokenizer: Tokenizer, masked: bool):
    texts = tokenizer.encode_batch([doc.text for doc, _ in batch])
    prompts = tokenizer.encode_batch([doc.prompt for doc, _ in batch]) if masked else [[] for _ in batch]
    eos = tokenizer.eos_token_id
    for (doc, digest), prompt_ids, text_ids in zip(batch, prompts, texts):
        ids = prompt_ids + text_ids + [eos]
        mask = [0] * len(prompt_ids) + [1] * (len(text_ids) + 1) if masked else None
        yield digest, ids, mask, len(doc.prompt) + len(doc.text)


def pack(docs: Iterable[tuple[Document, str]], tokenizer: Tokenizer, out_dir: Path, *,
         val_digests: set[str], masked: bool) -> PackResult:
    """Write ``train.bin``/``val.bin`` (and masks) into ``out_dir`` from ``(document, sha256 hex)`` pairs."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: SplitWriter(shard_path(out_dir, s), dtype, masked) for s in SPLITS}
    result = PackResult({}, {}, [], 0)
    with writers["train"], writers["val"]:
        batch: list[tuple[Document, str]] = []
        for item in docs:
            batch.append(item)
            if len(batch) == BATCH_DOCS:
                _write_batch(batch, tokenizer, masked, writers, val_digests, result)
                batch = []
        _write_batch(batch, tokenizer, masked, writers, val_digests, result)
    result.num_tokens = {s: w.num_tokens for s, w in writers.items()}
    result.num_documents = {s: w.num_documents for s, w in writers.items()}
    return result


def _write_batch(batch, tokenizer, masked, writers, val_digests, result: PackResult) -> None:
    for digest, ids, mask, num_chars in _encode(batch, tokenizer, masked):
        writers["val" if digest in val_digests else "train"].write(ids, mask)
        result.tokens_per_document.append(len(ids) - 1)
        result.num_chars += num_chars
