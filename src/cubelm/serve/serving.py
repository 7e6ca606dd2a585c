"""From a validated OpenAI request to engine requests and back: admission, deadlines, responses and streams.

One API request becomes one engine request per prompt (each with ``n`` sequences); choice ``i`` of prompt ``p`` is
OpenAI choice ``p * n + i``. Admission happens before any byte of the response is sent, so every refusal (bad
input 400, context overflow 400, rate limit 429, full queue 503) is a proper HTTP status, also for ``stream=true``.
A request that leaves early (client gone, deadline passed, server error) aborts its engine requests, which frees
their KV blocks at the engine's next step boundary.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cubelm.engine.async_engine import EngineDead, QueueFull, RequestFailed
from cubelm.serve.errors import APIError, error_body
from cubelm.serve.protocol import new_id, now_s, usage
from cubelm.serve.streaming import DONE, ChoiceProgress, sse


@dataclass(slots=True, kw_only=True)
class Job:
    chat: bool
    request_id: str
    model: str
    prompts: list[list[int]]
    params: object  # SamplingParams
    stream: bool
    include_usage: bool
    received: float  # time.monotonic() when the server got the request
    deadline: float | None
    lora_request: object = None  # the adapter (cubelm.engine.lora.manager.Adapter) the job runs on; None = base
    created: int = field(default_factory=now_s)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


class EngineRequest:
    """One submitted engine request; iterating ``outputs`` yields its ``RequestOutput``s (deltas when streaming,
    one final output otherwise)."""

    def __init__(self, llm, prompt_ids: list[int], params, request_id: str, deadline: float | None,
                 live: set | None = None, lora_request=None):
        self.llm, self.request_id, self.deadline = llm, request_id, deadline
        self.done = False
        # raises QueueFull / ValueError synchronously
        self.queue = llm.submit(prompt_ids, params, request_id, lora_request=lora_request)
        self.live = live if live is not None else set()
        self.live.add(self)

    async def outputs(self) -> AsyncIterator:
        try:
            while True:
                timeout = None if self.deadline is None else self.deadline - time.monotonic()
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    raise DeadlineExceeded() from None
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self.done = True
                    self.live.discard(self)
                yield item
                if item.finished:
                    return
        finally:
            self.abort()

    def abort(self) -> None:
        self.live.discard(self)
        if not self.done:
            self.done = True
            self.llm.abort(self.request_id)

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (delivered to whoever iterates ``outputs``), e.g. at shutdown."""
        self.abort()
        self.queue.put_nowait(error)


class DeadlineExceeded(Exception):
    pass


def submit_all(llm, job: Job, live: set | None = None) -> list[EngineRequest]:
    reqs = []
    try:
        for p, ids in enumerate(job.prompts):
            reqs.append(EngineRequest(llm, ids, job.params, f"{job.request_id}-{p}", job.deadline, live,
                                      lora_request=job.lora_request))
    except QueueFull as e:
        _abort(reqs)
        raise APIError(503, f"the server is at capacity ({e}); retry shortly", type="server_overloaded",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineDead as e:
        _abort(reqs)
        raise engine_error(e) from None
    except ValueError as e:
        _abort(reqs)
        raise APIError(400, str(e), param="prompt") from None
    return reqs


def encode_prompt(state, text: str, *, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt; a text too long for any context is refused before any time goes into tokenizing it."""
    if len(text) > state.max_prompt_chars:
        raise APIError(400, f"the prompt has {len(text):,} characters, more than any {state.engine.max_model_len:,}"
                            f"-token context can hold with this tokenizer; shorten it", param="prompt",
                       code="context_length_exceeded")
    return state.tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def admit(state, req, client: str, prompts: list[list[int]], *, chat: bool, max_tokens: int | None,
                logprobs: int | None, adapter=None) -> tuple[Job, list[EngineRequest]]:
    """Admission for any protocol (OpenAI, KServe V2): the context length, the sampling parameters of ``req`` (a
    validated ``CompletionRequest`` / ``ChatCompletionRequest``), the client's rate limit (a leaky bucket waits its
    turn here), then submission to the engine. Every refusal is an ``APIError`` raised before any response byte."""
    received = time.monotonic()
    max_len = state.engine.max_model_len
    longest = max(len(ids) for ids in prompts)
    if max_tokens is None:  # chat's default: whatever the context leaves
        max_tokens = max(1, max_len - longest)
    for ids in prompts:
        if len(ids) + max_tokens > max_len:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                f"completion); shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
    try:
        params = req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split()[0]) from None
    timeout = state.options.request_timeout
    job = Job(chat=chat, request_id=new_id("chatcmpl" if chat else "cmpl"),
              model=adapter.name if adapter is not None else state.model_name, prompts=prompts, params=params,
              stream=req.stream, include_usage=req.include_usage, received=received,
              deadline=received + timeout if timeout else None, lora_request=adapter)
    await state.wait_for_turn(client, sum(map(len, prompts)) + len(prompts) * params.n * max_tokens)
    return job, submit_all(state.llm, job, state.live)


def _abort(reqs: list[EngineRequest]) -> None:
    for r in reqs:
        r.abort()


async def merged(reqs: list[EngineRequest]) -> AsyncIterator[tuple[int, object]]:
    """(prompt index, output) from several engine requests, as they arrive."""
    if len(reqs) == 1:
        async for out in reqs[0].outputs():
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, r: EngineRequest) -> None:
        try:
            async for out in r.outputs():
                q.put_nowait((p, out))
        except Exception as e:  # noqa: BLE001 - re-raised by the consumer
            q.put_nowait((p, e))

    tasks = [asyncio.ensure_future(pump(p, r)) for p, r in enumerate(reqs)]
    try:
        remaining = len(reqs)
        while remaining:
            p, out = await q.get()
            if isinstance(out, BaseException):
                raise out
            yield p, out
            remaining -= out.finished
    finally:
        for t in tasks:
            t.cancel()
        _abort(reqs)


def engine_error(e: Exception) -> APIError:
    """A request the engine failed (500: a server bug, the request may be retried) or a dead engine (503)."""
    if isinstance(e, EngineDead):
        return APIError(503, f"{e}; retry on another replica", type="server_error", code="engine_dead",
                        headers={"Retry-After": "1"})
    return APIError(500, str(e), type="server_error", code="generation_failed")


def deadline_error(job: Job, timeout: float) -> APIError:
    return APIError(504, f"request {job.request_id} exceeded the server's time limit of {timeout:g} s "
                         f"(--request-timeout) and was aborted; lower max_tokens or retry later",
                    type="timeout_error", code="request_timeout")


class Responder:
    """Builds OpenAI responses and chunks for one job."""

    def __init__(self, job: Job, tokenizer, metrics, timeout: float | None):
        self.job, self.tok, self.metrics, self.timeout = job, tokenizer, metrics, timeout
        self.object = "chat.completion" if job.chat else "text_completion"

    # ---- non-streaming --------------------------------------------------------------------------------------
    async def collect(self, reqs: list[EngineRequest]) -> dict:
        """Non-streaming: the engine sends each request's output once, when it finishes (output_kind "final")."""
        finals: dict[int, object] = {}
        try:
            async for p, out in merged(reqs):
                if out.finished:
                    finals[p] = out
                    self.metrics.observe_finished(out, self.job.received, time.monotonic(),
                                                  sum(len(c.token_ids) for c in out.outputs))
        except DeadlineExceeded:
            self.metrics.rejected("timeout")
            raise deadline_error(self.job, self.timeout) from None
        except (RequestFailed, EngineDead) as e:
            raise engine_error(e) from None
        finally:
            _abort(reqs)  # NOTE: explicit, so a cancelled (disconnected) request frees its blocks now, not at GC
        choices, num_out = [], 0
        for p in range(len(self.job.prompts)):
            for c in finals[p].outputs:
                num_out += len(c.token_ids)
                choices.append(self._choice(p, c))
        num_prompt = sum(len(ids) for ids in self.job.prompts)
        return {"id": self.job.request_id, "object": self.object, "created": self.job.created,
                "model": self.job.model, "choices": choices, "usage": usage(num_prompt, num_out)}

    def _choice(self, p: int, c) -> dict:
        index = p * self.job.params.n + c.index
        reason = _finish_reason(c)
        lps = self._logprobs(c.logprobs or [], 0) if c.logprobs is not None else None
        if self.job.chat:
            return {"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": lps,
                    "finish_reason": reason}
        return {"index": index, "text": c.text, "logprobs": lps, "finish_reason": reason}

    # ---- streaming ------------------------------------------------------------------------------------------
    async def stream(self, reqs: list[EngineRequest]) -> AsyncIterator[str]:
        """Streaming: the engine sends deltas (output_kind "delta"), passed on as they come."""
        job = self.job
        sent = ChoiceProgress(job.num_choices)
        try:
            if job.chat:
                for i in range(job.num_choices):
                    yield sse(self._chunk(i, {"role": "assistant", "content": ""}))
            async for p, out in merged(reqs):
                for c in out.outputs:
                    i = p * job.params.n + c.index
                    if sent.finished[i]:
                        continue
                    if c.text or c.logprobs:
                        yield sse(self._chunk(i, c.text, lps=c.logprobs, offset=sent.text_len[i]))
                    sent.text_len[i] += len(c.text)
                    sent.num_tokens[i] += len(c.token_ids)
                    if c.finish_reason is not None:
                        sent.finished[i] = True
                        yield sse(self._chunk(i, None, finish_reason=_finish_reason(c)))
                if out.finished:
                    n = job.params.n
                    self.metrics.observe_finished(out, job.received, time.monotonic(),
                                                  sum(sent.num_tokens[p * n:(p + 1) * n]))
            if job.include_usage:
                yield sse({**self._envelope(), "choices": [],
                           "usage": usage(sum(len(ids) for ids in job.prompts), sum(sent.num_tokens))})
        except DeadlineExceeded:
            self.metrics.rejected("timeout")
            e = deadline_error(job, self.timeout)
            yield sse(error_body(e.message, e.type, code=e.code))
        except APIError as e:
            yield sse(e.body())
        except (RequestFailed, EngineDead) as e:
            yield sse(engine_error(e).body())
        except Exception as e:  # noqa: BLE001 - the headers are sent; tell the client in-band
            yield sse(error_body(f"generation failed: {e}", "server_error"))
        finally:
            _abort(reqs)  # NOTE: explicit, so a closed stream frees its blocks now, not at garbage collection
        yield DONE

    def _envelope(self) -> dict:
        obj = "chat.completion.chunk" if self.job.chat else "text_completion"
        return {"id": self.job.request_id, "object": obj, "created": self.job.created, "model": self.job.model}

    def _chunk(self, index: int, content, *, lps=None, offset: int = 0, finish_reason=None) -> dict:
        """``content`` is a text delta, a role dict (chat's first chunk) or None (the finish chunk)."""
        logprobs = self._logprobs(lps, offset) if lps else None
        if self.job.chat:
            delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content or "", "logprobs": logprobs, "finish_reason": finish_reason}
        chunk = {**self._envelope(), "choices": [choice]}
        if self.job.include_usage:
            chunk["usage"] = None
        return chunk

    # ---- logprobs -------------------------------------------------------------------------------------------
    def _logprobs(self, lps: list, offset: int) -> dict:
        decode = self._token_text
        if self.job.chat:
            return {"content": [
                {"token": decode(lp.token_id), "logprob": lp.logprob, "bytes": list(decode(lp.token_id).encode()),
                 "top_logprobs": [{"token": decode(t), "logprob": v, "bytes": list(decode(t).encode())}
                                  for t, v in lp.top.items()]} for lp in lps]}
        tokens = [decode(lp.token_id) for lp in lps]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{decode(t): v for t, v in lp.top.items()} for lp in lps], "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        return self.tok.token_text(token_id)


def _finish_reason(c) -> str:
    if c.finish_reason == "abort":
        raise APIError(503, "the request was aborted by the server (shutting down); retry", type="server_error",
                       code="aborted")
    return c.finish_reason
