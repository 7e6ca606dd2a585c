"""Incremental detokenization for streaming: emit text as tokens arrive, exactly the text a full decode gives.

The target is ``decode(prompt + output) - decode(prompt)`` (a string difference), reached by concatenating the
deltas. Decoding only the new tokens would not give it: a decoder's output depends on context. SentencePiece-style
decoders (Metaspace, ``Strip``) drop the leading space of the *first* token decoded, byte-level BPE splits
characters across tokens, and byte fallback spells unknown characters as ``<0xE2><0x82><0xAC>`` pieces, a run of
which becomes one U+FFFD per byte if it is not valid UTF-8 as a whole (so later pieces can change earlier text).

So each step decodes a short window: it starts at a token boundary where decoding is independent of what came
before, holds some already-emitted text as a reference, and the delta is what the window adds beyond that
reference (the prefix_offset/read_offset scheme of vLLM). The window is seeded with the prompt's tail, so the
first generated token is decoded after real context (its leading space survives). Text is held back while it
ends in U+FFFD (an incomplete UTF-8 sequence) or while the last token that produces text is a byte-fallback
piece (its run may still turn invalid); ``flush`` releases what is held when the sequence ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

CONTEXT_TOKENS = 4  # text-producing prompt tokens the first window starts with
MAX_SEED_TOKENS = 32  # bound on how far back into the prompt the first window may reach


class IncrementalDetokenizer:
    """``add(token_id)`` returns the new text (possibly empty); ``flush()`` returns what is still held back.

    ``silent_ids`` are tokens that decode to nothing (the special tokens ``skip_special_tokens`` drops);
    ``byte_ids`` are byte-fallback pieces; ``vocab_size`` bounds the ids that decode to something.
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = (), *,
                 silent_ids: frozenset[int] = frozenset(), byte_ids: frozenset[int] = frozenset(),
                 vocab_size: int | None = None):
        self.decode = decode
        self.silent_ids, self.byte_ids, self.vocab_size = silent_ids, byte_ids, vocab_size
        start = self._seed_start(prompt_ids)
        self.ids: list[int] = [int(t) for t in prompt_ids[start:]]
        self.prefix = 0  # window start: decoding from here on does not depend on earlier tokens
        self.read = len(self.ids)  # the text of ids[:read] has been emitted (or is prompt)

    @classmethod
    def for_tokenizer(cls, tokenizer, prompt_ids: Sequence[int] = (), *,
                      skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        """A detokenizer for a ``cubelm.data.tokenizer.Tokenizer`` continuing ``prompt_ids``."""
        decode = partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        return cls(decode, prompt_ids, silent_ids=tokenizer.special_ids if skip_special_tokens else frozenset(),
                   byte_ids=tokenizer.byte_fallback_ids, vocab_size=tokenizer.vocab_size)

    def _silent(self, token_id: int) -> bool:
        return token_id in self.silent_ids or (self.vocab_size is not None and not 0 <= token_id < self.vocab_size)

    def _seed_start(self, prompt_ids: Sequence[int]) -> int:
        """Where the first window starts: some text-producing tokens back, at a token that starts a piece of text
        on its own (not silent, not inside a byte-fallback run), or at the prompt's start."""
        seen = 0
        lowest = max(0, len(prompt_ids) - MAX_SEED_TOKENS)
        for k in range(len(prompt_ids) - 1, lowest - 1, -1):
            token = int(prompt_ids[k])
            if self._silent(token):
                continue
            seen += 1
            if seen >= CONTEXT_TOKENS and token not in self.byte_ids:
                return k
        return lowest if lowest == 0 else self._fallback_start(prompt_ids, lowest)

    def _fallback_start(self, prompt_ids: Sequence[int], lowest: int) -> int:
        # a long stretch of silent or byte tokens: any text-producing, non-byte token will do
        for k in range(len(prompt_ids) - 1, lowest - 1, -1):
            token = int(prompt_ids[k])
            if not self._silent(token) and token not in self.byte_ids:
                return k
        return lowest

    def _held(self) -> bool:
        """Whether the last text-producing token is a byte-fallback piece (its run is not complete)."""
        for token in reversed(self.ids[self.read:]):
            if not self._silent(token):
                return token in self.byte_ids
        return False

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._held():
            return ""
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return _after(text, emitted)

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete byte sequence, a byte-fallback run)."""
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return _after(text, emitted)


def _after(text: str, emitted: str) -> str:
    """``text`` minus the reference ``emitted``. The reference is a prefix unless the prompt itself ended inside a
    character the output completes; then the completed character is part of the new text."""
    if text.startswith(emitted):
        return text[len(emitted):]
    common = 0
    for a, b in zip(text, emitted):
        if a != b:
            break
        common += 1
    return text[common:]
