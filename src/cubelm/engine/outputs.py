"""What the engine returns, shaped like vLLM's ``RequestOutput`` / ``CompletionOutput``.

``SamplingParams.output_kind`` chooses between vLLM's DELTA and FINAL_ONLY: a "delta" request gets one output per
step holding only the new text, token ids and logprobs (what a stream sends); a "final" request gets one output
when it finishes, with everything, built once. There is no cumulative-per-step mode: copying the whole output at
every step makes a request O(T^2). ``OutputAccumulator`` joins deltas into the final shape. ``Request`` is the
engine's record of one request (its sequences, metrics and error) and builds its outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cubelm.engine.params import SamplingParams
from cubelm.engine.sequence import Sequence, TokenLogprob


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


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        """The new text/ids/logprobs since the last output ("delta"), or all of them ("final")."""
        delta = self.params.output_kind == "delta"
        outs = []
        for seq in self.seqs:
            want_lp = seq.params.logprobs is not None
            if delta:
                text = "".join(seq.text_chunks[seq.num_emitted_chunks:])
                start = seq.num_emitted_tokens
                seq.num_emitted_chunks, seq.num_emitted_tokens = len(seq.text_chunks), seq.num_output_tokens
            else:
                text, start = "".join(seq.text_chunks), 0
            ids = seq.token_ids[seq.num_prompt_tokens + start:]
            outs.append(CompletionOutput(seq.index, text, ids, seq.cumulative_logprob if want_lp else None,
                                         seq.logprobs[start:] if want_lp else None, seq.finish_reason,
                                         seq.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished,
                             self.seqs[0].num_cached_tokens, self.metrics, self.error)


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
