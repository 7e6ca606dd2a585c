"""Instruct rows → token ids and a loss mask, rendered the way the base model will be prompted.

Row shapes (the three peft/trl users have), one JSON object each:

- chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with an assistant message;
- Alpaca ``{"instruction", "input"?, "output"}``: a user message ``instruction\\n\\ninput``, the assistant's
  ``output`` (``cubelm.data.instruct.to_messages``);
- ``{"prompt", "completion"}``: strings are plain text, no template (as trl treats this shape): prompt (with the
  tokenizer's prompt specials, e.g. Llama's ``<s>``) + completion + EOS; lists of messages are a conversation.

Conversations are rendered with the base tokenizer's own chat template; the loss covers the assistant answers only.
An answer's span is found by rendering the conversation before it with the generation prompt (where the answer
starts) and with it (where its turn ends); both must be text prefixes of the whole rendering, else the template
rewrites history (e.g. drops earlier reasoning) and only the final answer is learned. Tokens whose character span
starts inside an answer are labelled, up to and including the first special token after the answer's text (its
end-of-turn: ``<|eos|>``, ``<|im_end|>``, ``<|eot_id|>``), so the model learns to stop; what a template writes after
that token (Qwen's newline) is not learned. A template that closes a turn with no special token gets the
tokenizer's EOS appended to the final answer. ``mask[i] == 1`` means token ``i`` is a target (``WindowSampler``'s
convention): the model learns to predict it from the tokens before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cubelm.errors import CubelmError

class RowError(Exception):
    """A row that cannot be used; ``reason`` is what the data report counts it under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Conversation:
    """Either ``messages`` (rendered with the chat template) or a plain ``prompt`` + ``completion``."""

    messages: tuple[Mapping, ...] | None = None
    prompt: str = ""
    completion: str = ""

    @property
    def needs_template(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class Example:
    ids: np.ndarray  # (L,) int64 token ids
    mask: np.ndarray  # (L,) uint8: 1 where the token is a target (an answer token)

    @property
    def num_answer_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def prompt_len(self) -> int:
        """Tokens before the first answer token: the prompt a generation would start from."""
        return int(np.argmax(self.mask)) if self.mask.any() else len(self.ids)


def parse_row(record) -> Conversation:
    """One JSON record → a ``Conversation``; raises ``RowError`` for a row of no known shape or an empty answer."""
    if not isinstance(record, Mapping):
        raise RowError("not_an_object")
    if "messages" in record:
        return Conversation(messages=_messages(record["messages"]))
    if "instruction" in record and "output" in record:
        from cubelm.data.instruct import InstructExample, to_messages
        fields = (record["instruction"], record.get("input") or "", record["output"])
        if not all(isinstance(f, str) for f in fields) or not fields[0].strip():
            raise RowError("bad_fields")
        _check_answer(fields[2])
        return Conversation(messages=tuple(to_messages(InstructExample(instruction=fields[0], input=fields[1],
                                                                       output=fields[2]))))
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion (trl)
            return Conversation(messages=_messages(prompt + completion))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RowError("bad_fields")
        _check_answer(completion)
        return Conversation(prompt=prompt, completion=completion)
    raise RowError("unknown_shape")


def _messages(value) -> tuple[Mapping, ...]:
    if not isinstance(value, list) or not value:
        raise RowError("bad_messages")
    for m in value:  # which roles exist is the template's business (it raises for one it does not know)
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("bad_messages")
    if value[-1]["role"] != "assistant" or len(value) < 2:
        raise RowError("no_final_answer")  # nothing to learn: the last message must be the assistant's answer
    _check_answer(value[-1]["content"])
    return tuple(value)


def _check_answer(text: str) -> None:
    if not text.strip():
        raise RowError("empty_answer")


def tokenize(conv: Conversation, tokenizer) -> Example:
    if conv.messages is None:
        return _tokenize_plain(conv, tokenizer)
    return _tokenize_chat(list(conv.messages), tokenizer)


def _tokenize_plain(conv: Conversation, tokenizer) -> Example:
    prompt_ids = tokenizer.encode(conv.prompt, add_special_tokens=True) if conv.prompt else []
    answer_ids = tokenizer.encode(conv.completion)
    if tokenizer.eos_token_id is not None:
        answer_ids.append(tokenizer.eos_token_id)
    return _example(prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids))


def _tokenize_chat(messages: list[Mapping], tokenizer) -> Example:
    if tokenizer.chat_template is None:  # checked for the whole data set before; this guards direct callers
        raise CubelmError(f"{tokenizer.name} has no chat template, which chat and Alpaca rows need")
    render = tokenizer.apply_chat_template
    try:
        full = render(messages, add_generation_prompt=False)
        spans = [span for k in range(1, len(messages)) if messages[k]["role"] == "assistant"
                 for span in [_answer_span(render, messages, k, full)] if span is not None]
    except CubelmError:  # the template refused this conversation (roles out of order, ...)
        raise RowError("template_error") from None
    if not spans or spans[-1][2] != len(full):  # the final answer must be found: it is what a prompt asks for
        raise RowError("template_mismatch")
    ids, offsets = tokenizer.encode_with_offsets(full)
    mask = [0] * len(ids)
    end = len(ids)
    for start, content_end, turn_end in spans:
        end = _label_span(ids, offsets, mask, start, content_end, turn_end, tokenizer.special_ids)
    ids, mask = ids[:end], mask[:end]  # what follows the final answer's end-of-turn is never a target
    if not _closes_with_special(ids, mask, tokenizer) and tokenizer.eos_token_id is not None:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [1]
    return _example(ids, mask)


def _answer_span(render, messages, k: int, full: str) -> tuple[int, int, int] | None:
    """(answer start, end of the answer's text, end of its turn) as character offsets in ``full``, or None when
    the template renders this turn differently once later messages follow it."""
    prefix = render(messages[:k], add_generation_prompt=True)
    upto = render(messages[:k + 1], add_generation_prompt=False)
    if not (upto.startswith(prefix) and full.startswith(upto)):
        return None
    start, content = len(prefix), messages[k]["content"]
    found = upto.find(content, start)
    if found < 0:  # the template altered the text (stripped it, ...): search for the stripped text
        content = content.strip()
        found = upto.find(content, start)
    content_end = found + len(content) if found >= 0 else start
    return start, content_end, len(upto)


def _label_span(ids, offsets, mask, start: int, content_end: int, turn_end: int, special_ids) -> int:
    """Mark the answer's tokens; return the index just after the last one marked."""
    last = None
    for i, (tok_start, _) in enumerate(offsets):
        if tok_start < start:
            continue
        if tok_start >= turn_end:
            break
        mask[i], last = 1, i
        if tok_start >= content_end and ids[i] in special_ids:
            break  # the end-of-turn token: learned, and the end of this answer
    return len(ids) if last is None else last + 1


def _closes_with_special(ids, mask, tokenizer) -> bool:
    return bool(ids) and mask[-1] == 1 and (ids[-1] in tokenizer.special_ids or ids[-1] == tokenizer.eos_token_id)


def _example(ids: list[int], mask: list[int]) -> Example:
    if not any(mask[1:]):  # the first token is never a target: nothing before it to predict it from
        raise RowError("empty_answer")
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8))


def fit(example: Example, max_len: int, *, truncate: bool) -> Example:
    """``example`` if it has at most ``max_len`` tokens; else cut (``truncate``) or ``RowError("too_long")``; a
    prompt that leaves no answer token within ``max_len`` is ``RowError("prompt_too_long")`` either way."""
    if len(example.ids) <= max_len:
        return example
    if not truncate:
        raise RowError("too_long")
    if not example.mask[1:max_len].any():
        raise RowError("prompt_too_long")
    return Example(example.ids[:max_len], example.mask[:max_len])
