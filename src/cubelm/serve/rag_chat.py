"""``POST /v1/rag/chat``: retrieval-augmented chat on ``cubelm serve --rag-index PATH`` (book §6.1.7).

    cubelm serve --model DIR --rag-index idx/                    # the embedder the index was built with
    cubelm serve --model DIR --rag-index idx/ --rag-embed-model all-minilm-l6-v2

``/v1/rag/chat/completions`` is the same route, so an OpenAI client with ``base_url=".../v1/rag"`` calls it with
``client.chat.completions.create(..., extra_body={"rag": {"k": 4}})``. The body is an OpenAI chat request plus
``rag`` options (``k``, ``fetch_k``, ``mmr_lambda``, ``where``). The last message (the user's) is embedded and
searched; the hits become numbered sources in a grounded prompt (``cubelm.rag.chat.ground``) rendered with the
served model's chat template; then the request runs exactly as ``/v1/chat/completions`` does (same checks,
admission, rate limits, sampling, ``Responder``). The response is the chat completion plus ``citations``: one entry
per source in the prompt (index, id, label ``path:start-end``, source, lines, score, text) with ``cited`` /
``cited_by`` (the choices whose text cites it as ``[n]``).

Streaming: the FIRST chunk (``choices: []``) carries ``citations`` (the sources, before any token, so a client can
show them at once); after the last choice's finish chunk, a chunk with ``choices: []`` carries them again with
``cited`` / ``cited_by`` filled in from the streamed text; then the usage chunk (if asked) and ``[DONE]``.

Retrieval runs on one dedicated thread: the embedded store's SQLite connection belongs to the thread that opened
it, and queries are short. A bad ``rag`` option is a 400 naming ``rag.<field>``. (FastAPI's ``Request`` is
imported at the top: the route's annotations are strings, resolved in this module's globals.)
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import Field

from cubelm.errors import CubelmError
from cubelm.rag.retrieve import MAX_FETCH_K, MAX_K
from cubelm.serve.errors import APIError
from cubelm.serve.protocol import ChatCompletionRequest, _Strict
from cubelm.serve.streaming import DONE, sse


class RagOptions(_Strict):
    k: int = Field(4, ge=1, le=MAX_K, description="chunks retrieved into the prompt")
    fetch_k: int | None = Field(None, ge=1, le=MAX_FETCH_K, description="MMR: candidates reranked, at least k "
                                "(default max(4k, 20))")
    mmr_lambda: float | None = Field(None, ge=0, le=1, description="rerank by maximal marginal relevance: 1 = "
                                     "relevance only, 0 = diversity only; null = no reranking")
    where: dict[str, Any] | None = Field(None, description="metadata filter in Chroma's syntax, e.g. "
                                         "{\"source\": \"json/decoder.py\"} or {\"start_line\": {\"$gte\": 100}}")


class RagChatRequest(ChatCompletionRequest):
    rag: RagOptions = Field(default_factory=RagOptions, description="retrieval options")


def check_rag_index(index: str, embed_model: str | None) -> str:
    """At startup: the index opens (else a one-line error) and names an embedder that resolves; that name."""
    from cubelm.rag.embedder import resolve_embedder
    from cubelm.rag.store import open_store
    try:
        store = open_store(index, create=False)
    except CubelmError as e:
        raise CubelmError(f"--rag-index {index}: {e}") from None
    name = embed_model or store.info.get("embedder")
    getattr(store, "close", lambda: None)()
    if not name:
        raise CubelmError(f"--rag-index {index} does not record its embedder; pass --rag-embed-model")
    try:
        resolve_embedder(name)
    except CubelmError as e:
        raise CubelmError(f"--rag-index {index} was built with embedder {name!r}, which does not load here ({e}); "
                          f"pass --rag-embed-model") from None
    return name


def _same_model(a: str | None, b: str) -> bool:
    from cubelm.rag.embedder import resolve_embedder
    return a is not None and resolve_embedder(a)[1].resolve() == resolve_embedder(b)[1].resolve()


class RagMetrics:
    def __init__(self, registry, model_name: str) -> None:
        from prometheus_client import Counter, Histogram
        self.name = model_name
        self.retrieval = Histogram("cubelm:rag_retrieval_seconds", "Time to embed a question and search the index.",
                                   ["model_name"], registry=registry,
                                   buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
        self.sources = Counter("cubelm:rag_sources", "Sources put into grounded prompts, by whether the answer "
                               "cited them ([n]).", ["model_name", "cited"], registry=registry)

    def answered(self, cits: list[dict]) -> None:
        for c in cits:
            self.sources.labels(self.name, "true" if c["cited"] else "false").inc()


class RagService:
    """The retriever, on its own thread, and its metrics."""

    def __init__(self, executor: ThreadPoolExecutor, retriever, metrics: RagMetrics | None = None) -> None:
        self.executor, self.retriever, self.metrics = executor, retriever, metrics

    @classmethod
    def load(cls, options, embedding=None, registry=None) -> RagService:
        from cubelm.rag.retrieve import Retriever
        from cubelm.rag.store import open_store

        name = check_rag_index(options.rag_index, options.rag_embed_model)

        def open_retriever():
            if embedding is not None and _same_model(options.embed_model, name):  # /v1/embeddings' one: share it
                return Retriever(open_store(options.rag_index, create=False), embedding.embedder)
            return Retriever.open(options.rag_index, embedder=name, device=options.device)

        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cubelm-rag")
        try:
            metrics = RagMetrics(registry, options.served_model_name) if registry is not None else None
            return cls(executor, executor.submit(open_retriever).result(), metrics)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    async def retrieve(self, question: str, o: RagOptions):
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        hits = await loop.run_in_executor(self.executor, lambda: self.retriever.retrieve(
            question, o.k, fetch_k=o.fetch_k, mmr_lambda=o.mmr_lambda, where=o.where))
        if self.metrics is not None:
            self.metrics.retrieval.labels(self.metrics.name).observe(time.perf_counter() - start)
        return hits

    def answered(self, cits: list[dict]) -> list[dict]:
        if self.metrics is not None:
            self.metrics.answered(cits)
        return cits

    def close(self) -> None:
        try:
            self.executor.submit(self.retriever.close).result()
        finally:
            self.executor.shutdown(wait=True)


def _check_rag_options(o: RagOptions) -> None:
    from cubelm.rag.filters import parse_where
    if o.fetch_k is not None and o.fetch_k < o.k:
        raise APIError(400, f"rag.fetch_k ({o.fetch_k}) must be at least rag.k ({o.k})", param="rag.fetch_k")
    try:
        parse_where(o.where)
    except CubelmError as e:
        raise APIError(400, f"rag.{e}", param="rag.where") from None


def add_rag_routes(app, state, client_id, responses) -> None:
    from cubelm.rag.chat import annotated_citations, ground, split_conversation
    from cubelm.rag.prompt import citations
    from cubelm.serve.app import _check_request, _render_chat
    from cubelm.serve.serving import Responder, admit, encode_prompt
    from cubelm.serve.streaming import SSEResponse, until_disconnect

    summary = ("Retrieval-augmented chat: the OpenAI chat request plus `rag` options; the answer with `citations` "
               "(file:line) of the retrieved sources")

    @app.post("/v1/rag/chat", summary=summary, responses=responses)
    @app.post("/v1/rag/chat/completions", summary=summary + " (the same route, for OpenAI clients with base_url "
              "/v1/rag)", responses=responses)
    async def rag_chat(req: RagChatRequest, request: Request, client: str = Depends(client_id)):
        adapter = _check_request(state, req)
        _check_rag_options(req.rag)
        messages = req.chat_messages()
        try:
            _, _, question = split_conversation(messages)  # the user's own words are what is retrieved for
        except CubelmError as e:
            raise APIError(400, str(e), param="messages") from None
        if state.feature_store is not None and req.user:  # as /v1/chat/completions: the user's features too
            messages = await state.personalize(req.user, messages)  # a system preamble: the question stays last
        await state.precheck_rate_limit(client)  # a client over its limit costs no embedding or search
        try:
            hits = await state.rag.retrieve(question, req.rag)
        except CubelmError as e:  # the options were checked above: this is the store's side (a server down, ...)
            raise APIError(503, f"retrieval failed: {e}", type="server_error", code="retrieval_failed") from None
        state.check_available()  # a drain that began during the retrieval refuses the request now, not the engine
        max_tokens = req.requested_max_tokens()
        try:
            prompt = ground(state.tokenizer, messages, hits, max_model_len=state.engine.max_model_len,
                            max_tokens=max_tokens)
        except CubelmError as e:
            raise APIError(400, str(e), param="max_tokens" if max_tokens else "messages",
                           code="context_length_exceeded") from None
        ids = encode_prompt(state, _render_chat(state, prompt.messages), add_special_tokens=False)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job, reqs = await admit(state, req, client, [ids], chat=True, max_tokens=max_tokens, logprobs=logprobs,
                                adapter=adapter)
        responder = Responder(job, state.tokenizer, state.metrics, state.options.request_timeout)
        if job.stream:
            return SSEResponse(_stream_with_citations(responder, reqs, prompt.hits, citations(prompt.hits),
                                                      state.rag.answered))
        body = await until_disconnect(responder.collect(reqs), request.receive)
        if body is None:  # the client went away; nobody reads this
            state.metrics.rejected("disconnect")
            return Response(status_code=499)
        answers = [""] * len(body["choices"])
        for c in body["choices"]:
            answers[c["index"]] = c["message"]["content"] or ""
        return body | {"citations": state.rag.answered(annotated_citations(prompt.hits, answers))}


async def _stream_with_citations(responder, reqs, hits, cits: list[dict], answered):
    """The chat stream of ``responder`` with the sources first and, before the usage chunk, what the text cited."""
    from cubelm.rag.chat import annotated_citations

    envelope = responder._envelope() | ({"usage": None} if responder.job.include_usage else {})
    yield sse(envelope | {"choices": [], "citations": cits})
    texts = [""] * responder.job.num_choices
    final_sent = failed = False

    def final() -> str:
        return sse(envelope | {"choices": [], "citations": answered(annotated_citations(hits, texts))})

    async for event in responder.stream(reqs):
        if event == DONE:
            if not (final_sent or failed):
                yield final()
            yield event
            continue
        chunk = json.loads(event[len("data: "):])
        if "error" in chunk:
            failed = True
        elif not chunk.get("choices") and chunk.get("usage") and not final_sent:
            final_sent = True
            yield final()  # before the usage chunk, which OpenAI's clients expect last
        for c in chunk.get("choices") or []:
            texts[c["index"]] += (c.get("delta") or {}).get("content") or ""
        yield event
