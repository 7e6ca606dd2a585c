"""A ``Sequence``: one generation stream (a request with ``n`` > 1 has ``n``), its tokens and KV bookkeeping.

vLLM vocabulary: ``num_computed_tokens`` have their K/V in the cache; ``block_table`` lists the cache blocks that
hold them; ``num_cached_tokens`` of them came from the prefix cache at admission.

Output text lives in two parts so that no step copies the whole text: ``text_chunks`` is released text (it can no
longer be cut by a stop string) and ``pending_text`` the short tail still held back. ``num_emitted_*`` count what
delta outputs have already handed out. ``lora`` is the adapter the sequence runs with (None = the base model);
``lora_id`` its engine id (0 = base), which the scheduler counts and the prefix cache salts its hashes with.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from cubelm.engine.params import SamplingParams

class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-k alternatives (token id -> logprob)


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    parent: "Sequence | None" = None  # n > 1: siblings wait for the first one's prompt, then share its blocks
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks committed so far
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    text_chunks: list[str] = field(default_factory=list)  # released output text
    pending_text: str = ""  # decoded output text held back: it could still grow into a stop string
    num_emitted_chunks: int = 0  # delta outputs: text chunks, tokens and logprobs already handed out
    num_emitted_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    detok: object = None  # the incremental detokenizer, set by the engine
    lora: object = None  # cubelm.engine.lora.manager.Adapter, or None for the base model

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def lora_id(self) -> int:
        return 0 if self.lora is None else self.lora.lora_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def text(self) -> str:
        """The whole output text so far (joined on demand: call it once, at the end)."""
        return "".join(self.text_chunks) + self.pending_text

    def release_text(self, hold: int) -> None:
        """Move all but the last ``hold`` characters of the pending text to the released chunks."""
        cut = len(self.pending_text) - hold
        if cut > 0:
            self.text_chunks.append(self.pending_text[:cut])
            self.pending_text = self.pending_text[cut:]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def ready(self) -> bool:
        """Siblings of an n > 1 request wait until the first sequence has its prompt in the cache."""
        return self.parent is None or self.parent.num_computed_tokens >= self.parent.num_prompt_tokens or \
            self.parent.is_finished
