"""Token counts and token spans of text under any tokenizer the chunker is handed.

Accepts a ``tokenizers.Tokenizer``, anything holding one (cubelm's ``Tokenizer.backend``, transformers' fast
tokenizers' ``backend_tokenizer``) or, as a last resort, any object with ``encode(text) -> ids``. Counts never
include special tokens (the caller leaves room for [CLS]/[SEP]). A tokenizer.json that enables truncation or
padding (sentence-transformers' MiniLM truncates at 128) would make counts lie, so those are switched off on a
private copy, never on the caller's object.
"""

from __future__ import annotations

import re

_WORDS = re.compile(r"\S+\s*|\s+")


def _backend(tokenizer):
    try:
        from tokenizers import Tokenizer as Backend
    except ImportError:  # pragma: no cover - tokenizers is a core dependency
        return None
    for candidate in (tokenizer, getattr(tokenizer, "backend", None), getattr(tokenizer, "backend_tokenizer", None)):
        if isinstance(candidate, Backend):
            if candidate.truncation is not None or candidate.padding is not None:
                candidate = Backend.from_str(candidate.to_str())
                candidate.no_truncation()
                candidate.no_padding()
            return candidate
    return None


class TokenCounter:
    def __init__(self, tokenizer) -> None:
        self.backend = _backend(tokenizer)
        if self.backend is None and not callable(getattr(tokenizer, "encode", None)):
            from cubelm.errors import CubelmError
            raise CubelmError(f"cannot count tokens with {type(tokenizer).__name__}: pass a tokenizers.Tokenizer "
                              "or an object with encode(text) -> ids")
        self.tokenizer = tokenizer

    @classmethod
    def of(cls, tokenizer) -> TokenCounter:
        """``tokenizer`` itself when it is already a TokenCounter (callers chunking many files make one)."""
        return tokenizer if isinstance(tokenizer, cls) else cls(tokenizer)

    def _encode_ids(self, text: str) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            return self.tokenizer.encode(text)

    def count(self, text: str) -> int:
        if self.backend is not None:
            return len(self.backend.encode(text, add_special_tokens=False).ids)
        return len(self._encode_ids(text))

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character span of each token, in order. Without offsets from the tokenizer, each word's
        tokens share out the word's characters evenly (positions are then estimates; the chunker re-counts)."""
        if self.backend is not None:
            return [tuple(o) for o in self.backend.encode(text, add_special_tokens=False).offsets]
        out = []
        for m in _WORDS.finditer(text):
            n = max(len(self._encode_ids(m.group())), 0)
            width = (m.end() - m.start()) / max(n, 1)
            out += [(m.start() + int(i * width), m.start() + int((i + 1) * width)) for i in range(n)]
        return out
