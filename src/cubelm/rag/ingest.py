"""Ingest: files -> chunks (``cubelm.rag.chunking``) -> vectors (an embedder) -> a vector store.

Sources: a directory (``.py`` by ``ast``, ``.md``/``.rst``/``.txt`` as text) or ``stdlib`` (this interpreter's
standard library ``.py`` files, tests excluded). A chunk's metadata carries its file (``source``, relative to
the source root), lines and kind/name, so an answer can cite ``file:line``. Re-ingesting a file first deletes
its old chunks (``where={"source": file}``), so edited files leave no stale chunk behind.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.rag.chunking import Chunk, chunk_python, chunk_text
from cubelm.rag.tokens import TokenCounter

TEXT_SUFFIXES = (".md", ".rst", ".txt")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", ".git", ".venv"}


def source_root(source: str) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"]) if source == "stdlib" else Path(source)
    if not root.is_dir():
        raise CubelmError(f"--source {source}: not a directory (give a directory or 'stdlib')")
    return root


def source_files(source: str) -> Iterator[tuple[str, Path]]:
    """(path relative to the source root, path) of each file to ingest, sorted (stable ids, stable order)."""
    root = source_root(source)
    suffixes = (".py",) if source == "stdlib" else (".py", *TEXT_SUFFIXES)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix in suffixes and path.is_file() and not _SKIP_DIRS & set(rel.parts[:-1]):
            yield rel.as_posix(), path


def chunk_file(rel: str, text: str, tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    if rel.endswith(".py"):
        return chunk_python(text, tokenizer, max_tokens, overlap, path=rel)
    return chunk_text(text, tokenizer, max_tokens, overlap, source=rel)


def chunk_metadata(c: Chunk) -> dict:
    meta = {"source": c.source or "", "start_line": c.start_line, "end_line": c.end_line, "kind": c.kind}
    return meta | ({"name": c.name} if c.name else {})


@dataclass(slots=True)
class IngestStats:
    files: int = 0
    chunks: int = 0
    tokens: int = 0


def ingest(source: str, store, encode: Callable[[list[str]], object], tokenizer, *, max_tokens: int,
           overlap: int, batch_size: int = 64, max_files: int = 0,
           progress: Callable[[IngestStats], None] | None = None) -> IngestStats:
    """Chunk every file of ``source``, embed with ``encode(texts) -> (n, dim)`` and upsert into ``store``."""
    stats = IngestStats()
    pending: list[Chunk] = []
    tokenizer = TokenCounter.of(tokenizer)  # one private copy of a truncating tokenizer, not one per file

    def flush() -> None:
        if pending:
            store.upsert([c.id for c in pending], encode([c.text for c in pending]), [c.text for c in pending],
                         [chunk_metadata(c) for c in pending])
            pending.clear()

    for rel, path in source_files(source):
        if max_files and stats.files >= max_files:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: nothing to retrieve
        store.delete(where={"source": rel})
        for c in chunk_file(rel, text, tokenizer, max_tokens, overlap):
            if c.text.strip():
                pending.append(c)
                stats.chunks += 1
                stats.tokens += c.n_tokens
                if len(pending) >= batch_size:
                    flush()
        stats.files += 1
        if progress:
            progress(stats)
    flush()
    if stats.files == 0:
        raise CubelmError(f"--source {source}: no .py{'' if source == 'stdlib' else '/.md/.rst/.txt'} files found")
    return stats
