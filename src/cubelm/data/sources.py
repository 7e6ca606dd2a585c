"""Corpus sources: where documents come from, one at a time.

A source spec (the ``--source`` flag of ``cubelm data prepare`` / ``cubelm tokenizer train``) is one of:

- ``stdlib``: the running interpreter's standard-library ``.py`` files (sorted, ``site-packages`` skipped);
- ``stdlib-instruct``: the docstring → function-source instruct set built from those files
  (``cubelm.data.stdlib_instruct``);
- a file, a directory (every regular file below it, sorted), or a glob (``'src/**/*.py'``);
- ``file.jsonl``: one JSON object per line, the text under ``--text-field`` (or, with ``--instruct``, the
  instruct schema ``{instruction, input, output}``);
- ``hf:NAME[:SPLIT]``: a Hugging Face ``datasets`` dataset, streamed (needs ``datasets`` and a network).

Every source streams: documents are read lazily, so a corpus never has to fit in memory. A document that cannot
be read (not UTF-8, bad JSON, missing field) is still yielded, with ``error`` set, so cleaning counts it as a
removal reason instead of the run crashing. Try it: ``python -m cubelm.data.sources stdlib | head``.
"""

from __future__ import annotations

import glob as globlib
import json
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cubelm.errors import CubelmError

TEMPLATES = ("alpaca", "chat")


@dataclass(slots=True)
class Document:
    id: str  # where it came from: a relative path, "file.jsonl:LINE", "path.py:Class.method"
    text: str  # the whole document; for instruct examples, the response the model learns to produce
    prompt: str = ""  # instruct only: the formatted prompt, masked out of the loss when packed
    error: str | None = None  # a read failure ("decode_error", "bad_json", ...): cleaning removes it


@dataclass(slots=True)
class Corpus:
    """A re-iterable source: every ``iter()`` reads it again from the start, in the same order."""

    spec: str
    kind: str  # "text" or "instruct"
    _factory: Callable[[], Iterable[Document]] = field(repr=False)

    def __iter__(self) -> Iterator[Document]:
        return iter(self._factory())


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path so every machine reads the same order."""
    root = stdlib_root()
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "__pycache__" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_file(path: Path, doc_id: str) -> Document:
    try:
        return Document(doc_id, path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        return Document(doc_id, "", error=f"decode_error: {e.reason} at byte {e.start}")
    except OSError as e:
        return Document(doc_id, "", error=f"read_error: {e.strerror}")


def iter_files(paths: Iterable[Path], root: Path | None = None) -> Iterator[Document]:
    for path in paths:
        doc_id = path.relative_to(root).as_posix() if root else path.as_posix()
        yield read_file(path, doc_id)


def iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    for line_no, record in _jsonl_records(path):
        doc_id = f"{path.name}:{line_no}"
        if isinstance(record, Document):
            yield Document(doc_id, "", error=record.error)
        elif not isinstance(record.get(text_field), str):
            yield Document(doc_id, "", error=f"missing_field: no string field {text_field!r}")
        else:
            yield Document(doc_id, record[text_field])


def iter_instruct_jsonl(path: Path, template: str) -> Iterator[Document]:
    from cubelm.data.instruct import InstructExample, to_document

    for line_no, record in _jsonl_records(path):
        doc_id = f"{path.name}:{line_no}"
        if isinstance(record, Document):
            yield Document(doc_id, "", error=record.error)
            continue
        try:
            example = InstructExample.from_dict(record)
        except CubelmError as e:
            yield Document(doc_id, "", error=f"missing_field: {e}")
            continue
        yield to_document(doc_id, example, template)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | Document]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield line_no, Document("", "", error=f"bad_json: {str(e)[:80]}")
                continue
            if not isinstance(record, dict):
                yield line_no, Document("", "", error="bad_json: a line is not a JSON object")
                continue
            yield line_no, record


def iter_hf(name: str, split: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets  # optional: only for hf: sources, which need a network
    except ImportError:
        raise CubelmError("hf: sources need the 'datasets' package; pip install datasets") from None
    for i, record in enumerate(datasets.load_dataset(name, split=split, streaming=True)):
        text = record.get(text_field)
        if isinstance(text, str):
            yield Document(f"{name}:{split}:{i}", text)
        else:
            yield Document(f"{name}:{split}:{i}", "", error=f"missing_field: no string field {text_field!r}")


def _expand_paths(spec: str) -> tuple[list[Path], Path | None]:
    if any(ch in spec for ch in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CubelmError(f"no files match {spec!r}; check the glob (quote it so the shell does not expand it)")
        return paths, None
    path = Path(spec)
    if not path.exists():
        raise CubelmError(f"corpus path {spec!r} does not exist; pass --source stdlib, a file, a directory, "
                          "a glob or a .jsonl file")
    if path.is_file():
        return [path], path.parent
    files = sorted((p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CubelmError(f"directory {spec!r} has no files; point --source at a directory with text files")
    return files, path


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


def resolve_source(spec: str, *, text_field: str = "text", instruct: bool = False,
                   template: str = "alpaca") -> Corpus:
    """Turn a ``--source`` spec into a re-iterable ``Corpus``; raises ``CubelmError`` for a missing path."""
    if template not in TEMPLATES:
        raise CubelmError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if spec == "stdlib":
        return Corpus(spec, "text", lambda: iter_files(stdlib_files(), stdlib_root()))
    if spec == "stdlib-instruct":
        from cubelm.data.stdlib_instruct import iter_stdlib_instruct

        return Corpus(spec, "instruct", lambda: iter_stdlib_instruct(template))
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return Corpus(spec, "text", lambda: iter_hf(name, split or "train", text_field))
    if spec.endswith(".jsonl") and not any(ch in spec for ch in "*?["):
        path = Path(spec)
        if not path.is_file():
            raise CubelmError(f"corpus file {spec!r} does not exist; check the path")
        if instruct:
            return Corpus(spec, "instruct", lambda: iter_instruct_jsonl(path, template))
        return Corpus(spec, "text", lambda: iter_jsonl(path, text_field))
    if instruct:
        raise CubelmError("--instruct needs a .jsonl source with instruction/input/output fields "
                          "(or use --source stdlib-instruct)")
    paths, root = _expand_paths(spec)
    return Corpus(spec, "text", lambda: iter_files(paths, root))


if __name__ == "__main__":
    for doc in resolve_source(sys.argv[1] if len(sys.argv) > 1 else "stdlib"):
        print(f"{doc.id}\t{len(doc.text)} chars\t{doc.error or ''}")
