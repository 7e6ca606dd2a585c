"""Incremental detokenization for streaming: emit text as tokens arrive, never a broken UTF-8 character.

Byte-level BPE splits multi-byte characters across tokens, and some tokenizers change a token's text depending
on its left neighbour. So each step decodes a short window (from ``prefix`` to the end) and emits only what
extends the previously decoded window, holding back while the text ends in U+FFFD (an incomplete byte sequence).
"""

from __future__ import annotations

from typing import Callable


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are already emitted and no longer affect new text
        self.read = 0  # tokens up to here have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(emitted):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (a genuinely invalid trailing byte sequence)."""
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(emitted):]
