"""Grounded prompts and citations for retrieval-augmented chat (book §6.1.7).

``grounded_messages(question, hits)`` builds the chat messages an LLM answers from: a system message that tells
the model to answer only from the numbered sources and to cite them as ``[1]``, ``[2]``..., followed by the
sources themselves, each under its number and citation label (``path:start-end`` for a chunk that records its
file and lines, else its chunk id), then any earlier turns (``history``) and the question as the last user
message. The messages are plain ``{"role", "content"}`` dicts: the caller renders them with the model's own
chat template (the serving path does, through the same code as ``/v1/chat/completions``).

``max_context_tokens`` bounds the total content of the messages (as counted by ``count_tokens(text) -> int``;
the model's tokenizer in serving; a words-and-punctuation estimate by default). The instruction, history and
question always stay (over the budget on their own, they are an error); sources are kept in rank order while
they fit, the first one that does not fit is cut at a line end (when at least a line fits) and the rest dropped -
so source [n] is always the n-th hit and citations stay aligned with ``citations(hits)`` for the hits kept
(``fit_hits`` says which). Chat-template tokens are not counted: leave a margin for them.

``citations(hits)`` is the list a response returns next to the answer (index, chunk id, file, lines, score,
text); ``cited(answer, cits)`` the ones the answer actually refers to by ``[n]`` (also ``[1, 3]``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cubelm.errors import CubelmError
from cubelm.rag.store import Hit

DEFAULT_SYSTEM = (
    "You answer questions using only the numbered sources below. Cite every source you use by its number in "
    "square brackets, like [1] or [2][3], right after the statement it supports. If the sources do not contain "
    "the answer, say that you do not know; do not make up facts or citations.")
NO_SOURCES = "(no sources were found for this question)"
_ROUGH_TOKEN = re.compile(r"\w+|[^\w\s]")
_CITE = re.compile(r"\[\s*(\d+(?:\s*[,;]\s*\d+)*)\s*\]")


def rough_token_count(text: str) -> int:
    """Words and punctuation marks: a tokenizer-free estimate (BPE tokenizers give about as many or more)."""
    return len(_ROUGH_TOKEN.findall(text))


def label(hit: Hit) -> str:
    """``path:start-end`` when the chunk records its file and lines (``cubelm rag ingest`` does), else its id."""
    meta = hit.metadata or {}
    source, start, end = meta.get("source"), meta.get("start_line"), meta.get("end_line")
    if source and isinstance(start, int) and isinstance(end, int):
        return f"{source}:{start}-{end}"
    return hit.id


def _source_block(n: int, hit: Hit, text: str) -> str:
    return f"[{n}] {label(hit)}\n{text.rstrip()}"


def _system_content(system: str | None, blocks: list[str]) -> str:
    head = DEFAULT_SYSTEM if system is None else system
    body = "\n\n".join(blocks) if blocks else NO_SOURCES
    return f"{head}\n\nSources:\n\n{body}"


def _cut_to_fit(n: int, hit: Hit, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest prefix of whole lines of ``hit.text`` whose source block fits ``budget`` tokens, or None."""
    lines = hit.text.splitlines(keepends=True)
    lo, hi = 0, len(lines)  # binary search: the count of a prefix grows with its length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(_source_block(n, hit, "".join(lines[:mid]))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return "".join(lines[:lo]) if lo else None


def fit_hits(hits: list[Hit], *, system: str | None = None, history: list[dict] | None = None,
             question: str = "", max_context_tokens: int | None = None,
             count_tokens: Callable[[str], int] | None = None) -> list[tuple[Hit, str]]:
    """(hit, text shown) of the hits that fit ``max_context_tokens``, in rank order (see the module docstring)."""
    if max_context_tokens is None:
        return [(h, h.text) for h in hits]
    if max_context_tokens < 1:
        raise CubelmError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
    count = count_tokens or rough_token_count
    # the no-sources note counts too (a few tokens of slack when sources replace it): the result always fits
    fixed = count(_system_content(system, [])) + count(question)
    fixed += sum(count(str(m.get("content") or "")) for m in history or [])
    if fixed > max_context_tokens:
        raise CubelmError(f"the instruction, history and question take {fixed} tokens, over max_context_tokens "
                          f"{max_context_tokens}: no room for any source")
    budget = max_context_tokens - fixed
    kept: list[tuple[Hit, str]] = []
    for n, hit in enumerate(hits, 1):
        sep = count("\n\n") if kept else 0
        need = count(_source_block(n, hit, hit.text)) + sep
        if need <= budget:
            kept.append((hit, hit.text))
            budget -= need
            continue
        part = _cut_to_fit(n, hit, budget - sep, count)
        if part is not None:
            kept.append((hit, part))
        break
    return kept


def grounded_messages(question: str, hits: list[Hit], *, system: str | None = None,
                      history: list[dict] | None = None, max_context_tokens: int | None = None,
                      count_tokens=None) -> list[dict]:
    """Chat messages grounding the answer to ``question`` in ``hits`` (module docstring)."""
    if not isinstance(question, str) or not question.strip():
        raise CubelmError("the question is empty")
    for m in history or []:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise CubelmError(f"history: each message is a dict with role user|assistant|system, got {m!r}")
    kept = fit_hits(hits, system=system, history=history, question=question,
                    max_context_tokens=max_context_tokens, count_tokens=count_tokens)
    blocks = [_source_block(n, hit, text) for n, (hit, text) in enumerate(kept, 1)]
    return ([{"role": "system", "content": _system_content(system, blocks)}]
            + [{"role": m["role"], "content": m.get("content") or ""} for m in history or []]
            + [{"role": "user", "content": question}])


def citations(hits: list[Hit]) -> list[dict]:
    """One dict per source, numbered as in the grounded prompt."""
    out = []
    for n, h in enumerate(hits, 1):
        meta = h.metadata or {}
        out.append({"index": n, "id": h.id, "label": label(h), "source": meta.get("source"),
                    "start_line": meta.get("start_line"), "end_line": meta.get("end_line"),
                    "score": float(h.score), "text": h.text})
    return out


def cited_indices(answer: str) -> set[int]:
    """The numbers the answer cites: ``[2]``, ``[1][3]``, ``[1, 3]``."""
    return {int(n) for m in _CITE.finditer(answer or "") for n in re.split(r"[,;]", m.group(1))}


def cited(answer: str, cits: list[dict]) -> list[dict]:
    """The citations ``answer`` refers to by ``[n]``, in source order (numbers with no source are ignored)."""
    used = cited_indices(answer)
    return [c for c in cits if c["index"] in used]
