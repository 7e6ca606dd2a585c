"""Grounded prompts (``cubelm.rag.prompt``): numbered sources with file:line labels, citations, and the token budget
that drops the lowest-ranked sources first and never renumbers the kept ones."""

import pytest

from cubelm.errors import CubelmError
from cubelm.rag.prompt import citations, cited, cited_indices, fit_hits, grounded_messages, label, rough_token_count
from cubelm.rag.store import Hit


def _hit(i: int, text: str, score: float = 0.5, lines: bool = True) -> Hit:
    meta = {"source": f"pkg/mod{i}.py", "start_line": 10 * i, "end_line": 10 * i + 4} if lines else {}
    return Hit(id=f"chunk-{i}", score=score, text=text, metadata=meta)


HITS = [_hit(1, "The secret code of project Zanzibar is 4417.", 0.9),
        _hit(2, "def area(r):\n    return 3.14159 * r * r\n", 0.4),
        _hit(3, "no lines recorded here", 0.2, lines=False)]


def test_messages_number_sources_with_labels_and_end_with_the_question():
    msgs = grounded_messages("What is Zanzibar's code?", HITS,
                             history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    system = msgs[0]["content"]
    assert "[1]" in system and "cite" in system.lower()
    for n, h in enumerate(HITS, 1):
        assert f"[{n}] {label(h)}\n{h.text.rstrip()}" in system
    assert system.index("[1] pkg/mod1.py:10-14") < system.index("[2] pkg/mod2.py:20-24") < system.index("[3] chunk-3")
    assert msgs[-1] == {"role": "user", "content": "What is Zanzibar's code?"}


def test_custom_system_replaces_the_instruction_but_keeps_the_sources():
    system = grounded_messages("q?", HITS[:1], system="Be terse.")[0]["content"]
    assert system.startswith("Be terse.") and "Zanzibar is 4417" in system and "square brackets" not in system


def test_no_hits_says_so():
    assert "no sources" in grounded_messages("q?", [])[0]["content"]


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_question_is_a_clean_error(bad):
    with pytest.raises(CubelmError, match="question is empty"):
        grounded_messages(bad, HITS)


def test_bad_history_is_a_clean_error():
    with pytest.raises(CubelmError, match="history"):
        grounded_messages("q?", HITS, history=[{"role": "tool"}])


def test_citations_and_cited():
    cits = citations(HITS)
    assert [c["index"] for c in cits] == [1, 2, 3]
    assert cits[0] == {"index": 1, "id": "chunk-1", "label": "pkg/mod1.py:10-14", "source": "pkg/mod1.py",
                       "start_line": 10, "end_line": 14, "score": 0.9, "text": HITS[0].text}
    assert cits[2]["source"] is None and cits[2]["label"] == "chunk-3"
    assert cited_indices("It is 4417 [1]. See also [2, 3] and [7]; not 1] or [x].") == {1, 2, 3, 7}
    assert [c["index"] for c in cited("Per [3][1], yes.", cits)] == [1, 3]
    assert cited("no citation", cits) == []


def _content_tokens(msgs, count) -> int:
    return sum(count(m["content"]) for m in msgs)


@pytest.mark.parametrize("extra", [0, 5, 20, 60, 400])
def test_budget_keeps_sources_in_rank_order_and_fits(extra):
    long = "\n".join(f"line {i} of a long chunk about geometry" for i in range(30))
    hits = [_hit(1, "short first source", 0.9), _hit(2, long, 0.5), _hit(3, "third source", 0.1)]
    q = "Which source talks about geometry?"
    budget = _content_tokens(grounded_messages(q, []), rough_token_count) + extra  # room for `extra` source tokens
    msgs = grounded_messages(q, hits, max_context_tokens=budget)
    kept = fit_hits(hits, question=q, max_context_tokens=budget)
    system = msgs[0]["content"]
    assert _content_tokens(msgs, rough_token_count) <= budget
    assert [h.id for h, _ in kept] == [h.id for h in hits[:len(kept)]]  # a prefix of the ranking: numbers hold
    for n, (h, shown) in enumerate(kept, 1):
        assert f"[{n}] {label(h)}" in system and h.text.startswith(shown)
    for h in hits[len(kept):]:
        assert label(h) not in system
    if extra == 0:
        assert kept == [] and "no sources" in system
    if extra == 400:
        assert [h for h, _ in kept] == hits and all(s == h.text for h, s in kept)
    if extra == 60:  # the long chunk is cut at a line end, the third one dropped
        assert len(kept) == 2 and 0 < len(kept[1][1]) < len(long) and kept[1][1].endswith("\n")
    with pytest.raises(CubelmError, match="no room for any source"):
        grounded_messages(q, hits, max_context_tokens=budget - extra - 10)
    assert msgs[-1]["content"] == q  # the question always stays


def test_budget_uses_the_given_token_counter():
    from cubelm.rag.prompt import NO_SOURCES
    chars = len  # one "token" per character
    hits = HITS[:2] + [_hit(3, "x" * 200, lines=False)]
    two = sum(len(m["content"]) for m in grounded_messages("q?", hits[:2]))
    msgs = grounded_messages("q?", hits, max_context_tokens=two + len(NO_SOURCES), count_tokens=chars)
    assert "[2] pkg/mod2.py" in msgs[0]["content"] and "[3] chunk-3" not in msgs[0]["content"]
    with pytest.raises(CubelmError, match="max_context_tokens"):
        grounded_messages("q?", HITS, max_context_tokens=0)
