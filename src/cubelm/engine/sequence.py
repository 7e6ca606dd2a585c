"""A ``Sequence``: one generation stream (a request with ``n`` > 1 has ``n``), its tokens and KV bookkeeping.

vLLM vocabulary: ``num_computed_tokens`` have their K/V in the cache; ``block_table`` lists the cache blocks that
hold them; ``num_cached_tokens`` of them came from the prefix cache at admission.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from cubelm.engine.params import SamplingParams

_arrival = itertools.count()


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
    arrival: int = field(default_factory=lambda: next(_arrival))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks committed so far
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    detok: object = None  # the incremental detokenizer, set by the engine

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

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
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def ready(self) -> bool:
        """Siblings of an n > 1 request wait until the first sequence has its prompt in the cache."""
        return self.parent is None or self.parent.num_computed_tokens >= self.parent.num_prompt_tokens or \
            self.parent.is_finished
