"""A labeled retrieval set built offline from Python sources (the interpreter's stdlib by default).

Corpus: the chunks ``cubelm rag ingest`` would index (``cubelm.rag.chunking.chunk_python``: one per top-level
function / class, methods of a class too big for one chunk apart; ids ``path:start-end``) of a seeded sample of
the source's ``.py`` files, added file by file until ``max_chunks``.

Questions: for each public top-level function and each public method of a public top-level class that has a
docstring, the docstring's first sentence. The answer (its relevant chunks) is the chunk(s) holding the ``def``
line. Three choices keep the task from being a lexical lookup, so the set measures matching a description to code:

- **Docstrings are stripped from the indexed text** (every docstring: module, class, function, nested), so the
  question is never a substring of its answer. Chunk ids and line ranges stay those of the original file: the
  chunking is exactly ingest's, only the text that is embedded loses its docstrings. Comments stay (code has them).
- **The function's name is removed from the question**, with any qualification (``Class.name``, ``mod.name``),
  call parentheses and backquotes, case-insensitively (``open`` goes from "Open a file" too: the word would
  otherwise point straight at ``def open``). The class name of a method stays: it is context a user would give.
- **Trivial and ambiguous questions are skipped**: a first line that is a signature (``name(args)``, ``->``), fewer
  than ``min_words`` words left after the name is removed, and every question whose normalized text (lowercase
  words) occurs more than once in the pool ("Return a copy."), since no chunk is its single right answer.

A sample of ``num_questions`` is drawn with ``random.Random(seed)`` from the pool, sorted first, so a set is a
function of (source files, chunking, seed) alone.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.rag.chunking import chunk_python, split_lines
from cubelm.rag.tokens import TokenCounter

_SIGNATURE = re.compile(r"^\s*[\w.]+\s*\(.*\)|->")
_WORD = re.compile(r"[A-Za-z]{2,}")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")


@dataclass(frozen=True, slots=True)
class Question:
    id: str  # path:qualified_name
    text: str
    relevant: tuple[str, ...]  # chunk ids
    source: str
    name: str  # qualified name, e.g. "Deque.rotate"
    def_line: int


@dataclass(slots=True)
class RetrievalSet:
    chunk_ids: list[str]
    chunk_texts: list[str]  # docstrings stripped (what gets embedded)
    questions: list[Question]
    files: list[str]

    def to_jsonl_rows(self) -> list[dict]:
        return [asdict(q) | {"relevant": list(q.relevant)} for q in self.questions]


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whitespace collapsed."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        if not text[:m.end()].lower().endswith(_ABBREVIATIONS):
            return text[:m.end()]
    return text


def strip_name(sentence: str, name: str) -> str:
    """``sentence`` without ``name`` (qualified or not, with ``()``, quotes), whitespace and stray commas tidied."""
    pattern = rf"[`'\"]*(?<![\w.])(?:\w+\.)*{re.escape(name)}\b(?:\(\))?[`'\"]*"
    out = re.sub(pattern, " ", sentence, flags=re.IGNORECASE)
    out = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(out.split()))
    return out.lstrip(",;: ")


def normalized(text: str) -> str:
    return " ".join(w.lower() for w in _WORD.findall(text))


def _public(name: str) -> bool:
    return not name.startswith("_")


def _defs(tree: ast.Module):
    """(qualified name, def node) of public top-level functions and public methods of public top-level classes."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and _public(node.name):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            for item in node.body:
                if isinstance(item, funcs) and _public(item.name):
                    yield f"{node.name}.{item.name}", item


def candidate_questions(tree: ast.Module, min_words: int) -> list[tuple[str, int, str]]:
    """(qualified name, def line, question) of each definition whose docstring gives a usable question."""
    out = []
    for qualname, node in _defs(tree):
        doc = ast.get_docstring(node)
        if not doc:
            continue
        sentence = first_sentence(doc)
        if _SIGNATURE.search(sentence):
            continue
        question = strip_name(sentence, node.name)
        if len(_WORD.findall(question)) >= min_words:
            out.append((qualname, node.lineno, question))
    return out


def _docstring_nodes(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                yield first


def strip_docstrings(lines: list[str], tree: ast.Module) -> list[str]:
    """``lines`` (with their endings) with every docstring cut out; a line left blank by the cut becomes "" so
    the result still has one entry per original line (line ``i`` of a chunk stays entry ``i - 1``)."""
    out = list(lines)
    spans = sorted(((n.lineno, n.col_offset, n.end_lineno, n.end_col_offset) for n in _docstring_nodes(tree)),
                   reverse=True)  # last first: a cut never shifts the offsets of one still to make
    for a, col_a, b, col_b in spans:
        # ast offsets are UTF-8 byte offsets
        prefix = out[a - 1].encode()[:col_a].decode(errors="ignore")
        suffix = out[b - 1].encode()[col_b:].decode(errors="ignore")
        joined = prefix + suffix
        for i in range(a - 1, b):
            out[i] = ""
        out[a - 1] = joined if joined.strip() else ""
    return out


def python_files(source: str) -> list[tuple[str, Path]]:
    from cubelm.rag.ingest import source_files
    return [(rel, path) for rel, path in source_files(source) if rel.endswith(".py")]


def build_retrieval_set(source: str, tokenizer, *, max_tokens: int, overlap: int = 32, num_questions: int = 500,
                        max_chunks: int = 3000, min_words: int = 4, seed: int = 0) -> RetrievalSet:
    """The corpus and labeled questions of ``source`` (a directory or 'stdlib'); see the module docstring."""
    files = python_files(source)
    random.Random(seed).shuffle(files)
    counter = TokenCounter.of(tokenizer)
    ids, texts, used, pool = [], [], [], []
    for rel, path in files:
        if len(ids) >= max_chunks:
            break
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, OSError, SyntaxError, ValueError):
            continue  # unreadable or not Python 3: no definitions to ask about
        masked = strip_docstrings(split_lines(text), tree)
        chunks = chunk_python(text, counter, max_tokens, overlap, path=rel)
        kept = []
        for c in chunks:
            body = "".join(masked[c.start_line - 1:c.end_line])
            if body.strip():
                kept.append(c)
                ids.append(c.id)
                texts.append(body)
        if not kept:
            continue
        used.append(rel)
        for qualname, line, question in candidate_questions(tree, min_words):
            relevant = tuple(c.id for c in kept if c.start_line <= line <= c.end_line)
            if relevant:
                pool.append(Question(id=f"{rel}:{qualname}", text=question, relevant=relevant, source=rel,
                                     name=qualname, def_line=line))
    if not ids:
        raise CubelmError(f"--source {source}: no Python file to build a retrieval set from")
    counts = Counter(normalized(q.text) for q in pool)
    pool = sorted((q for q in pool if counts[normalized(q.text)] == 1), key=lambda q: q.id)
    if not pool:
        raise CubelmError(f"--source {source}: no public function with a usable docstring in {len(used)} files")
    questions = random.Random(seed).sample(pool, min(num_questions, len(pool)))
    return RetrievalSet(chunk_ids=ids, chunk_texts=texts, questions=questions, files=used)
