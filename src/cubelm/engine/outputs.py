"""What the engine returns, shaped like vLLM's ``RequestOutput`` / ``CompletionOutput``.

``SamplingParams.output_kind`` chooses between vLLM's DELTA and FINAL_ONLY: a "delta" request gets one output per
step holding only the new text, token ids and logprobs (what a stream sends); a "final" request gets one output
when it finishes, with everything, built once. There is no cumulative-per-step mode: copying the whole output at
every step makes a request O(T^2). ``OutputAccumulator`` joins deltas into the final shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cubelm.engine.sequence import TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed this request (finish_reason "error")


class OutputAccumulator:
    """Joins one request's delta outputs into the final ``RequestOutput`` (lists, joined once: O(T))."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}
        self.ids: dict[int, list[int]] = {}
        self.logprobs: dict[int, list | None] = {}
        self.last: dict[int, CompletionOutput] = {}
        self.latest: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.latest = out
        for c in out.outputs:
            self.texts.setdefault(c.index, []).append(c.text)
            self.ids.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                self.logprobs.setdefault(c.index, []).extend(c.logprobs)
            self.last[c.index] = c

    def build(self) -> RequestOutput:
        out = self.latest
        outputs = [CompletionOutput(i, "".join(self.texts[i]), self.ids[i], c.cumulative_logprob,
                                    self.logprobs.get(i), c.finish_reason, c.stop_reason)
                   for i, c in sorted(self.last.items())]
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, outputs, out.finished,
                             out.num_cached_tokens, out.metrics, out.error)
