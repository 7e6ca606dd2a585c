"""Cleaning: normalize, filter, and deduplicate a stream of documents, counting every removal.

Rules, applied in order (a document is removed by the first one it fails, so the report's counts add up):

1. read errors (not UTF-8, bad JSON line, missing field): reason = the error's kind;
2. Unicode NFC normalization and control-character stripping (``\\n`` and ``\\t`` kept; ``\\r`` dropped, which
   turns CRLF into LF); these change text but remove nothing;
3. length: ``empty``, ``too_short`` (< ``min_chars``), ``too_long`` (> ``max_chars``);
4. quality: ``low_alnum`` (alphanumeric share of the non-space characters below ``min_alnum_fraction``) and
   ``repeated_lines`` (share of non-blank lines that repeat an earlier line above ``max_repeated_line_fraction``);
5. ``exact_duplicate``: the SHA-256 of the normalized text was seen before;
6. ``near_duplicate``: MinHash LSH (``datasketch``, 128 permutations, fixed seed) finds an earlier kept document
   whose estimated Jaccard similarity of word (or line) shingles is at least ``near_dup_threshold``.

The defaults are tuned on the standard library (``python -m cubelm.data.clean stdlib`` prints the report): they
drop empty and near-empty files and copies, not normal code. Only hashes and MinHash signatures are held in
memory, never the texts, so a corpus streams through.
"""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from cubelm.data.report import CleanReport
from cubelm.data.sources import Document
from cubelm.errors import CubelmError

SHINGLES = ("words", "lines")
_WORD = re.compile(r"\w+")
# Cc = C0 and C1 control characters and DEL; tab and newline carry meaning in text and code.
_CONTROL = {c: None for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


@dataclass(slots=True, kw_only=True)
class CleanConfig:
    normalize: bool = True
    min_chars: int = 16
    max_chars: int = 2_000_000
    min_alnum_fraction: float = 0.25
    # NOTE: code repeats lines (`pass`, `else:`, asserts in tests): stdlib test files reach 0.88, so 0.9 only
    # catches degenerate spam; use ~0.3 (Gopher) for prose.
    max_repeated_line_fraction: float = 0.9
    near_dup_threshold: float = 0.8  # 0 disables near-duplicate removal
    shingle: str = "words"
    shingle_size: int = 5
    num_perm: int = 128
    seed: int = 1
    num_examples: int = 3

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < max(1, self.min_chars):
            raise CubelmError(f"need 0 <= min_chars <= max_chars, got {self.min_chars} and {self.max_chars}")
        for name in ("min_alnum_fraction", "max_repeated_line_fraction", "near_dup_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CubelmError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.shingle not in SHINGLES:
            raise CubelmError(f"shingle must be one of {', '.join(SHINGLES)}, got {self.shingle!r}")
        if self.shingle_size < 1 or self.num_perm < 16:
            raise CubelmError("shingle_size must be >= 1 and num_perm >= 16")


def normalize_text(text: str, nfc: bool = True) -> str:
    text = text.translate(_CONTROL)
    return unicodedata.normalize("NFC", text) if nfc else text


def alnum_fraction(text: str) -> float:
    visible = "".join(text.split())
    return sum(ch.isalnum() for ch in visible) / len(visible) if visible else 0.0


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def shingles(text: str, kind: str = "words", size: int = 5) -> list[bytes]:
    units = _WORD.findall(text) if kind == "words" else [s for s in (l.strip() for l in text.splitlines()) if s]
    if len(units) <= size:
        return [" ".join(units).encode()] if units else []
    grams = {" ".join(units[i:i + size]) for i in range(len(units) - size + 1)}
    return [g.encode() for g in sorted(grams)]


class NearDupIndex:
    """MinHash LSH over kept documents; ``find`` returns the earliest similar one, verified by signature."""

    def __init__(self, config: CleanConfig) -> None:
        from datasketch import MinHash, MinHashLSH  # optional dependency, the `data` extra

        self._minhash, self.config = MinHash, config
        proto = MinHash(num_perm=config.num_perm, seed=config.seed)
        self._permutations = proto.permutations  # shared: each MinHash would otherwise carry its own copy
        self._lsh = MinHashLSH(threshold=config.near_dup_threshold, num_perm=config.num_perm)
        self._signatures: list[np.ndarray] = []
        self._ids: list[str] = []

    def signature(self, text: str):
        m = self._minhash(num_perm=self.config.num_perm, seed=self.config.seed,
                          permutations=self._permutations, scheme="affine32")
        m.update_batch(shingles(text, self.config.shingle, self.config.shingle_size))
        return m

    def find(self, m) -> tuple[str, float] | None:
        best = None
        for key in sorted(self._lsh.query(m)):  # sorted: the earliest match wins, independent of set order
            similarity = float(np.mean(self._signatures[key] == m.hashvalues))
            if similarity >= self.config.near_dup_threshold:
                best = (self._ids[key], similarity)
                break
        return best

    def add(self, doc_id: str, m) -> None:
        self._lsh.insert(len(self._signatures), m)
        self._signatures.append(m.hashvalues)
        self._ids.append(doc_id)


class Cleaner:
    """Call it on an iterable of documents; it yields ``(document, sha256 hex)`` for the kept ones and fills
    ``self.report``. Single use: the dedup state spans the whole stream."""

    def __init__(self, config: CleanConfig, source: str = "") -> None:
        self.config = config
        self.report = CleanReport(source=source, config=asdict(config), num_examples=config.num_examples)
        self._seen: set[bytes] = set()
        self._near = NearDupIndex(config) if config.near_dup_threshold > 0 else None
        self._source_hash = hashlib.sha256()

    def __call__(self, docs: Iterable[Document]) -> Iterator[tuple[Document, str]]:
        for doc in docs:
            kept = self._process(doc)
            if kept is not None:
                yield kept
        self.report.source_sha256 = self._source_hash.hexdigest()
        self.report.check()

    def _process(self, doc: Document) -> tuple[Document, str] | None:
        self._hash_source(doc)
        self.report.add_read(len(doc.prompt) + len(doc.text))
        if doc.error:
            return self._remove(doc.error.split(":")[0], doc, doc.error)
        if self.config.normalize:
            doc = Document(doc.id, normalize_text(doc.text), prompt=normalize_text(doc.prompt))
        full = doc.prompt + doc.text
        failure = self._check_quality(full)
        if failure:
            return self._remove(failure[0], doc, failure[1], full)
        digest = hashlib.sha256(f"{doc.prompt}\x00{doc.text}".encode()).digest()
        if digest in self._seen:
            return self._remove("exact_duplicate", doc, "same sha256 as an earlier document", full)
        self._seen.add(digest)
        if self._near is not None:
            m = self._near.signature(full)
            match = self._near.find(m)
            if match:
                return self._remove("near_duplicate", doc, f"~{match[1]:.2f} Jaccard with {match[0]}", full)
            self._near.add(doc.id, m)
        self.report.add_kept(len(full))
        return doc, digest.hex()

    def _check_quality(self, text: str) -> tuple[str, str] | None:
        c = self.config
        if not text.strip():
            return "empty", ""
        if len(text) < c.min_chars:
            return "too_short", f"{len(text)} < {c.min_chars} chars"
        if len(text) > c.max_chars:
            return "too_long", f"{len(text)} > {c.max_chars} chars"
        if (frac := alnum_fraction(text)) < c.min_alnum_fraction:
            return "low_alnum", f"alphanumeric share {frac:.2f} < {c.min_alnum_fraction}"
        if (frac := repeated_line_fraction(text)) > c.max_repeated_line_fraction:
            return "repeated_lines", f"repeated-line share {frac:.2f} > {c.max_repeated_line_fraction}"
        return None

    def _remove(self, reason: str, doc: Document, detail: str = "", full: str | None = None) -> None:
        self.report.add_removed(reason, doc.id, doc.prompt + doc.text if full is None else full, detail)
        return None

    def _hash_source(self, doc: Document) -> None:
        # Length-prefixed fields, so ("ab", "c") and ("a", "bc") hash differently.
        for part in (doc.id, doc.prompt, doc.text, doc.error or ""):
            data = part.encode("utf-8", "surrogatepass")
            self._source_hash.update(len(data).to_bytes(8, "little") + data)


if __name__ == "__main__":
    from cubelm.data.sources import resolve_source

    spec = sys.argv[1] if len(sys.argv) > 1 else "stdlib"
    cleaner = Cleaner(CleanConfig(), spec)
    for _ in cleaner(resolve_source(spec)):
        pass
    print(cleaner.report.to_text())
