"""Token-aware chunking with overlap, and code-aware chunking of Python by ``ast``.

``chunk_text`` cuts text into chunks of at most ``max_tokens`` tokens of the embedder's tokenizer, each next
chunk repeating at most ``overlap`` tokens of the previous one, cutting where the text allows: after a blank
line, else after a line end, else after a sentence end, else between words (a cut at a lower level is taken
only when the higher one would leave the chunk less than half full); only a run of text with no whitespace over
``max_tokens`` is cut between tokens. Every limit is checked by tokenizing the chunk alone (BPE can tokenize a
substring differently than in context), so ``count(chunk.text) <= max_tokens`` always holds.

``chunk_python`` makes one chunk per top-level function or class (decorators and the comment lines right above
it included), one per run of other top-level statements (module docstring, imports, constants, ``if
__name__``...). A class over ``max_tokens`` becomes a chunk for its header (the ``class`` line, docstring and
attributes) and one per method; a function (or run) over ``max_tokens`` is cut between lines, preferring blank
lines, with ``overlap``. A chunk's text is exactly lines ``start_line..end_line`` of the file (1-based,
inclusive), for ``file:line`` citations - except the pieces of a single line longer than ``max_tokens``. A file
``ast`` cannot parse is chunked as text. Ids are stable: ``path:start-end`` (``#2``... when one line range
holds several pieces).
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import dataclass

from cubelm.errors import CubelmError
from cubelm.rag.tokens import TokenCounter

_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")
_SPACE = re.compile(r"\s+")
# cut priorities: what precedes the cut position
_BLANK_LINE, _LINE, _SENTENCE, _WORD = 4, 3, 2, 1
_TEXT_MIN_FILL = {_BLANK_LINE: 0.5, _LINE: 0.5, _SENTENCE: 0.5, _WORD: 0.0}
_CODE_MIN_FILL = {_BLANK_LINE: 0.5, _LINE: 0.0, _WORD: 0.0}  # any line start beats cutting inside a line


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    text: str
    source: str | None
    start_line: int  # 1-based, inclusive
    end_line: int
    n_tokens: int
    kind: str = "text"  # text | module (top-level statements) | function | class
    name: str | None = None  # qualified name of a function / class / method ("Point.move")

    @property
    def citation(self) -> str:
        return f"{self.source or '<text>'}:{self.start_line}-{self.end_line}"


def _check_limits(max_tokens: int, overlap: int) -> None:
    if max_tokens < 1:
        raise CubelmError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise CubelmError(f"overlap must be in [0, max_tokens), got {overlap} with max_tokens={max_tokens}")


def split_lines(text: str) -> list[str]:
    """Lines with their endings, split where ``ast`` counts lines (\\n, \\r\\n, \\r; not str.splitlines' \\f...)."""
    return _LINES.findall(text)


def _text_cuts(text: str) -> dict[int, int]:
    """Cut position (start of a word) -> priority, from the whitespace run before it."""
    cuts = {}
    for m in _SPACE.finditer(text):
        if m.end() >= len(text):
            continue
        ws = m.group()
        before = text[m.start() - 1] if m.start() else ""
        newlines = ws.count("\n") + ws.count("\r") - ws.count("\r\n")
        cuts[m.end()] = (_BLANK_LINE if newlines >= 2 else _LINE if newlines else
                         _SENTENCE if before in ".!?" else _WORD)
    return cuts


def _code_cuts(lines: list[str]) -> dict[int, int]:
    """Line starts (after a blank line: higher), then spaces inside lines for lines too long to keep whole."""
    cuts, pos = {}, 0
    for i, line in enumerate(lines):
        for m in _SPACE.finditer(line.rstrip("\r\n")):
            if m.start() > 0 and m.end() < len(line):
                cuts[pos + m.end()] = _WORD
        pos += len(line)
        if i + 1 < len(lines):
            cuts[pos] = _BLANK_LINE if not line.strip() else _LINE
    return cuts


def _windows(text: str, counter: TokenCounter, max_tokens: int, overlap: int, cuts: dict[int, int],
             min_fill: dict[int, float], strip: bool, starts: list[int] | None = None) -> list[tuple[int, int, int]]:
    """Greedy (start, end, n_tokens) character windows of ``text`` (see the module docstring). ``strip``
    (prose): windows neither start nor end with whitespace; otherwise (code) they tile whole lines and an
    overlap starts at a line start. ``starts``: token start positions, when the caller has them already."""
    starts = [s for s, _ in counter.spans(text)] if starts is None else starts
    positions = sorted(cuts)
    start_level = _WORD if strip else _LINE
    start_positions = [c for c in positions if cuts[c] >= start_level]  # where a next window may begin
    pos = len(text) - len(text.lstrip()) if strip else 0
    out = []
    while pos < len(text):
        first = bisect.bisect_left(starts, pos)
        if len(starts) - first <= max_tokens:
            end = len(text)
        else:
            limit = starts[first + max_tokens]  # [pos, limit) holds max_tokens tokens in context
            end = _best_cut(positions, cuts, min_fill, pos, limit, starts, first, max_tokens) or limit
        end, n = _fit(text, counter, max_tokens, pos, end, positions, cuts, start_level, starts, strip)
        out.append((pos, end, n))
        if end >= (len(text.rstrip()) if strip else len(text)):
            break
        pos = _next_start(text, counter, overlap, pos, end, start_positions, starts, strip)
    return out


def _best_cut(positions, cuts, min_fill, pos, limit, starts, first, max_tokens) -> int | None:
    lo, hi = bisect.bisect_right(positions, pos), bisect.bisect_right(positions, limit)
    candidates = positions[lo:hi]
    for level in sorted(min_fill, reverse=True):
        best = next((c for c in reversed(candidates) if cuts[c] >= level), None)
        if best is not None and bisect.bisect_left(starts, best) - first >= min_fill[level] * max_tokens:
            return best
    return candidates[-1] if candidates else None


def _fit(text, counter, max_tokens, pos, end, positions, cuts, fit_level, starts, strip) -> tuple[int, int]:
    """Move ``end`` back (to earlier cuts, then token starts) until the chunk alone has <= max_tokens tokens."""
    while True:
        stop = pos + len(text[pos:end].rstrip()) if strip else end
        n = counter.count(text[pos:stop])
        if n <= max_tokens or end - pos <= 1:
            return stop, n
        earlier = positions[bisect.bisect_right(positions, pos):bisect.bisect_left(positions, end)]
        preferred = [c for c in earlier if cuts[c] >= fit_level]  # code: stay on line starts
        inner = [s for s in starts[bisect.bisect_right(starts, pos):bisect.bisect_left(starts, end)] if s > pos]
        end = (preferred or earlier or inner or [end - 1])[-1]


def _next_start(text, counter, overlap, pos, end, positions, starts, strip) -> int:
    """The start of the next window: the earliest cut after pos whose stretch up to ``end`` is <= overlap tokens."""
    if overlap == 0:
        nxt = end
    else:
        j = bisect.bisect_left(starts, end)
        target = starts[max(j - overlap, 0)]
        lo = bisect.bisect_left(positions, max(target, pos + 1))
        hi = bisect.bisect_left(positions, end)
        nxt = next((c for c in positions[lo:hi] if counter.count(text[c:end]) <= overlap), end)
    while strip and nxt < len(text) and text[nxt].isspace():
        nxt += 1
    return nxt


def chunk_text(text: str, tokenizer, max_tokens: int, overlap: int = 0, *, source: str | None = None,
               first_line: int = 1) -> list[Chunk]:
    _check_limits(max_tokens, overlap)
    counter = TokenCounter.of(tokenizer)
    windows = _windows(text, counter, max_tokens, overlap, _text_cuts(text), _TEXT_MIN_FILL, strip=True)
    chunks = [_chunk(text, a, b, n, first_line, source, "text", None) for a, b, n in windows]
    return _unique_ids(chunks)


def _chunk(text, a, b, n, first_line, source, kind, name) -> Chunk:
    start = first_line + text.count("\n", 0, a)
    end = first_line + text.count("\n", 0, max(b - 1, a))
    return Chunk(id=f"{source or '<text>'}:{start}-{end}", text=text[a:b], source=source, start_line=start,
                 end_line=end, n_tokens=n, kind=kind, name=name)


def _unique_ids(chunks: list[Chunk]) -> list[Chunk]:
    seen: dict[str, int] = {}
    out = []
    for c in chunks:
        seen[c.id] = seen.get(c.id, 0) + 1
        if seen[c.id] > 1:
            c = Chunk(**{**{f: getattr(c, f) for f in Chunk.__slots__}, "id": f"{c.id}#{seen[c.id]}"})
        out.append(c)
    return out


# ---- Python ---------------------------------------------------------------------------------------------------

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(slots=True)
class _Segment:
    start: int  # 1-based inclusive lines
    end: int
    kind: str
    name: str | None
    node: ast.AST | None = None


def _segments(body: list[ast.stmt], lines: list[str], floor: int, prefix: str, run_kind: str) -> list[_Segment]:
    """One segment per def/class (with decorators and the comment lines just above), one per run of others."""
    out: list[_Segment] = []
    prev_end = floor - 1
    for stmt in body:
        if isinstance(stmt, _DEFS):
            start = min([stmt.lineno] + [d.lineno for d in stmt.decorator_list])
            while start - 1 > prev_end and lines[start - 2].lstrip().startswith("#"):
                start -= 1
            kind = "class" if isinstance(stmt, ast.ClassDef) else "function"
            out.append(_Segment(start, stmt.end_lineno, kind, prefix + stmt.name, stmt))
        elif out and out[-1].node is None:
            out[-1].end = stmt.end_lineno
        else:
            out.append(_Segment(stmt.lineno, stmt.end_lineno, run_kind, prefix.rstrip(".") or "<module>"))
        prev_end = out[-1].end
    return out


def chunk_python(source_text: str, tokenizer, max_tokens: int, overlap: int = 0, *, path: str) -> list[Chunk]:
    _check_limits(max_tokens, overlap)
    try:
        tree = ast.parse(source_text)
    except (SyntaxError, ValueError):  # not Python 3 (old test data, templates): still searchable as text
        return chunk_text(source_text, tokenizer, max_tokens, overlap, source=path)
    counter = TokenCounter.of(tokenizer)
    f = _File(split_lines(source_text), counter, source_text)
    chunks: list[Chunk] = []
    for seg in _segments(tree.body, f.lines, 1, "", "module"):
        chunks += _emit(seg, f, max_tokens, overlap, path)
    return _unique_ids(chunks)


class _File:
    """A file's lines and the token starts of the whole file (tokenized once): a segment's tokens in context
    tell whether it can possibly fit, and where to cut, without tokenizing each segment again."""

    def __init__(self, lines: list[str], counter: TokenCounter, text: str) -> None:
        self.lines, self.counter = lines, counter
        self.line_offsets = [0]
        for line in lines:
            self.line_offsets.append(self.line_offsets[-1] + len(line))
        self.starts = [s for s, _ in counter.spans(text)]

    def token_starts(self, seg: _Segment) -> list[int]:
        a, b = self.line_offsets[seg.start - 1], self.line_offsets[seg.end]
        return [s - a for s in self.starts[bisect.bisect_left(self.starts, a):bisect.bisect_left(self.starts, b)]]


def _emit(seg: _Segment, f: _File, max_tokens, overlap, path) -> list[Chunk]:
    lines, counter = f.lines, f.counter
    text = "".join(lines[seg.start - 1:seg.end])
    starts = f.token_starts(seg)
    # in context a segment's token count differs from its own only at its two ends: far over the limit in
    # context means over it alone, with no need to tokenize it again
    if len(starts) <= max_tokens + 16:
        n = counter.count(text)
        if n <= max_tokens:
            return [Chunk(id=f"{path}:{seg.start}-{seg.end}", text=text, source=path, start_line=seg.start,
                          end_line=seg.end, n_tokens=n, kind=seg.kind, name=seg.name)]
    if isinstance(seg.node, ast.ClassDef) and seg.node.body:
        parts = _segments(seg.node.body, lines, seg.node.lineno + 1, seg.name + ".", "class")
        if parts[0].node is None:  # the class line(s) join the docstring/attributes run
            parts[0].start = seg.start
        else:
            parts.insert(0, _Segment(seg.start, parts[0].start - 1, "class", seg.name))
        return [c for part in parts for c in _emit(part, f, max_tokens, overlap, path)]
    seg_lines = lines[seg.start - 1:seg.end]
    windows = _windows(text, counter, max_tokens, overlap, _code_cuts(seg_lines), _CODE_MIN_FILL, strip=False,
                       starts=starts)
    return [_chunk(text, a, b, k, seg.start, path, seg.kind, seg.name) for a, b, k in windows]
