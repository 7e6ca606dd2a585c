"""Chunking (cubelm.rag.chunking): token limits by the tokenizer itself, overlap, cut points, Python by ast with
exact line numbers, stable ids; with a byte-level BPE (cubelm's) and a WordPiece (BERT-style) tokenizer."""

import ast
import inspect
import textwrap

import pytest

from cubelm.errors import CubelmError
from cubelm.rag.chunking import chunk_python, chunk_text, split_lines

PROSE = " ".join(
    f"Paragraph {p} sentence {s} talks about retrieval, chunking and vector search number {p * 10 + s}."
    + ("\n" if s % 3 == 2 else "") for p in range(12) for s in range(6)).replace(".\n ", ".\n\n")


@pytest.fixture(scope="module", params=["bpe", "wordpiece"])
def tok(request):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    corpus = [PROSE, inspect.getsource(textwrap), inspect.getsource(ast)] * 3
    if request.param == "bpe":
        from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
        return train_tokenizer(corpus, TokenizerConfig(vocab_size=400)).backend
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                     special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    t.enable_truncation(64)  # as sentence-transformers' tokenizer.json does: the chunker must not be fooled by it
    return t


def count(tok, text):
    from cubelm.rag.tokens import TokenCounter
    return TokenCounter(tok).count(text)


@pytest.mark.parametrize("max_tokens,overlap", [(40, 0), (40, 10), (97, 30), (300, 50)])
def test_text_chunks_respect_limits_and_overlap(tok, max_tokens, overlap):
    chunks = chunk_text(PROSE, tok, max_tokens, overlap, source="doc.md")
    assert len(chunks) > 1 and all(c.n_tokens == count(tok, c.text) <= max_tokens for c in chunks)
    pos = 0
    for prev, c in zip([None] + chunks, chunks):
        start = PROSE.index(c.text, max(pos - len(c.text), 0))  # each chunk is a slice of the text, in order
        assert c.text == c.text.strip() and (start == 0 or PROSE[start - 1].isspace())  # starts at a word
        end = start + len(c.text)
        assert end == len(PROSE) or PROSE[end].isspace()  # and ends at one
        if prev is not None:
            if overlap:
                assert start < pos, "consecutive chunks must overlap"
                assert count(tok, PROSE[start:pos]) <= overlap
            else:
                assert start >= pos
        assert c.start_line == PROSE.count("\n", 0, start) + 1 and c.end_line == PROSE.count("\n", 0, end) + 1
        pos = end
    assert pos == len(PROSE.rstrip())  # everything is covered
    # prefer blank lines / line ends / sentence ends: most chunks end a sentence when the budget allows
    if max_tokens >= 97:
        assert sum(c.text.endswith(".") for c in chunks[:-1]) >= 0.8 * (len(chunks) - 1)
    assert len({c.id for c in chunks}) == len(chunks)
    assert [c.id for c in chunk_text(PROSE, tok, max_tokens, overlap, source="doc.md")] == [c.id for c in chunks]


def test_text_without_spaces_is_cut_between_tokens(tok):
    text = "x" * 3000
    chunks = chunk_text(text, tok, 16, 0)
    assert "".join(c.text for c in chunks) == text and all(c.n_tokens <= 16 for c in chunks)
    assert len({c.id for c in chunks}) == len(chunks)  # one line, several pieces: ids stay unique


def test_bad_limits(tok):
    with pytest.raises(CubelmError, match="overlap"):
        chunk_text("a b c", tok, 10, 10)
    with pytest.raises(CubelmError, match="max_tokens"):
        chunk_python("x = 1\n", tok, 0, 0, path="m.py")


SOURCE = '''\
"""Module docstring: what this module does."""

import os
import sys

CONSTANT = 3


# helps with things
@decorator
def small(a, b):
    """Add."""
    return a + b


async def other(x):
    return await x


class Small:
    """A small class."""

    def method(self):
        return 1


class Big:
    """A big class whose methods are split."""

    attribute = 1

''' + "".join(f'''
    def method_{i}(self, value):
        """Method number {i} of the big class."""
        total = value
        for step in range({i}):
            total = total * 2 + step
        return total
''' for i in range(12)) + '''

def long_function(items):
''' + "".join(f"    value_{i} = items[{i}] * {i} + len(items)\n" + ("\n" if i % 7 == 6 else "")
              for i in range(80)) + '''\
    return items


if __name__ == "__main__":
    small(1, 2)
'''


def test_python_chunks_follow_functions_and_lines(tok):
    lines = split_lines(SOURCE)
    chunks = chunk_python(SOURCE, tok, 120, 20, path="pkg/mod.py")
    for c in chunks:  # the text is exactly the cited lines; within the limit
        assert c.text == "".join(lines[c.start_line - 1:c.end_line]), c.id
        assert c.n_tokens == count(tok, c.text) <= 120 and c.source == "pkg/mod.py"
        assert c.id == f"pkg/mod.py:{c.start_line}-{c.end_line}"
    by_name = {}
    for c in chunks:
        by_name.setdefault(c.name, []).append(c)
    tree = ast.parse(SOURCE)
    # every function / class that fits is one chunk: decorators and the comment above included
    small = next(n for n in tree.body if getattr(n, "name", "") == "small")
    assert [(c.start_line, c.end_line, c.kind) for c in by_name["small"]] == \
        [(small.lineno - 2, small.end_lineno, "function")]
    assert by_name["small"][0].text.startswith("# helps with things\n@decorator\ndef small")
    assert len(by_name["other"]) == 1 and len(by_name["Small"]) == 1 and by_name["Small"][0].kind == "class"
    # module docstring + imports + constant: one module chunk; the __main__ block another
    mod = by_name["<module>"]
    assert mod[0].start_line == 1 and "import sys" in mod[0].text and "CONSTANT = 3" in mod[0].text
    assert mod[-1].text.startswith('if __name__ == "__main__":')
    # the big class: a header chunk (class line, docstring, attribute) and one chunk per method
    big = next(n for n in tree.body if getattr(n, "name", "") == "Big")
    assert count(tok, ast.get_source_segment(SOURCE, big)) > 120
    assert by_name["Big"][0].text.startswith("class Big:") and "attribute = 1" in by_name["Big"][0].text
    for i in range(12):
        (m,) = by_name[f"Big.method_{i}"]
        assert m.text.lstrip().startswith(f"def method_{i}(self, value):") and m.text.rstrip().endswith("return total")
    # the long function: several line-aligned pieces with overlap, covering all its lines
    parts = by_name["long_function"]
    node = next(n for n in tree.body if getattr(n, "name", "") == "long_function")
    assert len(parts) > 1 and parts[0].start_line == node.lineno and parts[-1].end_line == node.end_lineno
    for a, b in zip(parts, parts[1:]):
        assert a.start_line < b.start_line <= a.end_line + 1
        if b.start_line <= a.end_line:
            assert count(tok, "".join(lines[b.start_line - 1:a.end_line])) <= 20
    assert any(b.start_line <= a.end_line for a, b in zip(parts, parts[1:]))  # overlap happened


def test_python_stdlib_module(tok):
    """A real module: every top-level function that fits is exactly one chunk, starting at its def/decorator."""
    src = inspect.getsource(textwrap)
    chunks = chunk_python(src, tok, 200, 20, path="textwrap.py")
    lines = split_lines(src)
    assert all(c.text == "".join(lines[c.start_line - 1:c.end_line]) and c.n_tokens <= 200 for c in chunks)
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and count(tok, ast.get_source_segment(src, node)) <= 180:
            (c,) = [c for c in chunks if c.name == node.name]
            assert c.start_line <= node.lineno and c.end_line == node.end_lineno
            assert ast.get_source_segment(src, node) in c.text


def test_python_syntax_error_falls_back_to_text(tok):
    chunks = chunk_python("def broken(:\n    pass\n" * 30, tok, 30, 5, path="bad.py")
    assert chunks and all(c.kind == "text" and c.n_tokens <= 30 for c in chunks)


def test_line_endings_as_ast_counts_them(tok):
    src = "x = 1\r\ny = '\x0c'\r\n\x0c\ndef f():\r\n    return 2\r\n"
    (f,) = [c for c in chunk_python(src, tok, 50, 0, path="m.py") if c.name == "f"]
    assert (f.start_line, f.end_line) == (4, 5) and f.text == "def f():\r\n    return 2\r\n"
