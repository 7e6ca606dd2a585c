"""The inference graph's router (§6.2.4): retrieval, then generation, over two services it reaches by HTTP.

For ``POST /v1/chat/completions`` (OpenAI's shape, streaming or not) the router

1. embeds the last user message with the encoder service (``POST {embed_url}/v1/embeddings``),
2. searches its own index (``--index``: the embedded faiss store, or a Chroma server) for the top k chunks,
3. builds the grounded messages (``cubelm.rag.prompt``: numbered sources, the client's system message and earlier
   turns kept), fitted to the LLM's context as the LLM's own tokenizer counts it (``POST {llm_url}/tokenize``:
   lowest-ranked sources dropped until prompt + max_tokens fits), and sends the request, every other field
   unchanged, to the LLM service (``POST {llm_url}/v1/chat/completions``); a stream is relayed event by event,
4. answers with the LLM's response plus ``citations`` (a stream carries them on its first chunk).

Why three processes rather than one: the encoder is small and fast, the LLM big and slow, so each scales and
rolls out on its own; the prompt logic (this router) changes most often and redeploys without reloading a model;
and the encoder service is also there for ingestion. The cost is two network hops per request, which
``/metrics`` makes visible per hop (``cubelm:router_hop_latency_seconds{hop="embed|search|tokenize|llm"}``).

Errors: bad input is a 400 before any upstream is called; an upstream down is a 502 (unreachable, or a 5xx),
its 503 (loading, draining, full) a 503, its time limit a 504 - always in OpenAI's error shape
(``cubelm.serve.upstream``). ``/ready`` is 200 only while both services' ``/ready`` are; ``/health`` is the
router's own liveness (a restart of the router would not bring an upstream back).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from cubelm.errors import CubelmError
from cubelm.rag.prompt import DEFAULT_SYSTEM, citations, fit_hits, grounded_messages
from cubelm.serve.auth import KeyChecker, load_api_keys
from cubelm.serve.body_limit import BodyLimit
from cubelm.serve.errors import APIError, error_body
from cubelm.serve.streaming import DONE, SSEResponse, sse
from cubelm.serve.upstream import Upstream

HOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
               300.0, 600.0)
MAX_K = 100
ROLES = ("system", "developer", "user", "assistant")


class RouterMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.hop_latency = Histogram("cubelm:router_hop_latency_seconds", "Time of one hop of the graph: embed "
                                     "(encoder service), search (the index), tokenize (the LLM service counting "
                                     "the prompt), llm (LLM service; a stream until its last event).", ["hop"],
                                     buckets=HOP_BUCKETS, registry=r)
        self.hop_requests = Counter("cubelm:router_hop_requests", "Calls of each hop, by outcome (ok, error, "
                                    "unreachable, timeout, disconnect).", ["hop", "outcome"], registry=r)
        self.retries = Counter("cubelm:router_hop_retries", "Calls retried after a connection failure.", ["hop"],
                               registry=r)
        self.ttft = Histogram("cubelm:router_time_to_first_token_seconds", "Streams: from the request's arrival to "
                              "the first chunk relayed (retrieval included).", buckets=HOP_BUCKETS, registry=r)
        self.e2e = Histogram("cubelm:router_request_latency_seconds", "Chat requests answered, end to end.",
                             buckets=HOP_BUCKETS, registry=r)

    def hop_done(self, hop: str, outcome: str, seconds: float) -> None:
        self.hop_requests.labels(hop, outcome).inc()
        if outcome == "ok":
            self.hop_latency.labels(hop).observe(seconds)

    def retry(self, hop: str) -> None:
        self.retries.labels(hop).inc()


class Retriever:
    """The index, opened and searched on one thread of its own: the embedded store's SQLite connection belongs to
    the thread that opened it, and faiss parallelizes each search itself."""

    def __init__(self, path: str):
        from cubelm.rag.store import open_store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cubelm-index")
        self.store = self._pool.submit(open_store, path, create=False).result()
        self.count = self._pool.submit(self.store.count).result()

    async def search(self, vector: list[float], k: int):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: self.store.search([vector], k)[0])

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class Router:
    def __init__(self, options):
        self.options, self.metrics = options, RouterMetrics()
        self.keys = KeyChecker(load_api_keys(options.api_key, options.api_key_file))
        self.retriever = Retriever(options.index)
        self.embed_model = options.embed_model or self.retriever.store.info.get("embedder")
        common = dict(connect_timeout=options.connect_timeout, retries=options.retries, metrics=self.metrics)
        self.encoder = Upstream("encoder", options.embed_url, api_key=options.embed_api_key,
                                timeout=options.embed_timeout, **common)
        self.llm = Upstream("LLM", options.llm_url, api_key=options.llm_api_key, timeout=options.timeout, **common)

    async def aclose(self) -> None:
        await asyncio.gather(self.encoder.aclose(), self.llm.aclose())
        self.retriever.close()

    def authorize(self, request: Request) -> str | None:
        """Check the router's own keys; return the Authorization header to pass on (when no key is configured
        for an upstream, the client's own)."""
        self.keys.check(request.headers)
        return request.headers.get("authorization")

    async def retrieve(self, question: str, k: int, auth: str | None):
        body = {"input": [question], "encoding_format": "float"}
        if self.embed_model:
            body["model"] = self.embed_model
        if self.options.query_prompt_name:
            body["prompt_name"] = self.options.query_prompt_name
        try:
            r = await self.encoder.send("POST", "/v1/embeddings", hop="embed", json_body=body, auth=auth)
        except APIError as e:
            if e.status in (400, 413):  # the question itself (too long for the embedder): the client's to fix
                raise
            if e.status == 404:  # another model: the graph is misconfigured, not the request
                raise APIError(502, f"{e.message} (the index was built with {self.embed_model!r}; deploy that "
                                    "embedder or pass --embed-model)", type="server_error",
                               code="upstream_error") from None
            raise APIError(e.status if e.status >= 500 else 502, e.message, type="server_error", code=e.code,
                           headers=e.headers) from None
        vector = _embedding(r)
        dim = self.retriever.store.dim
        if vector is None or len(vector) != dim:
            got = "no embedding" if vector is None else f"a {len(vector)}-dim vector"
            raise APIError(502, f"the encoder service returned {got}; the index holds {dim}-dim vectors",
                           type="server_error", code="upstream_error")
        started = time.monotonic()
        hits = await self.retriever.search(vector, k)
        self.metrics.hop_done("search", "ok", time.monotonic() - started)
        return hits

    async def chat(self, body: dict, auth: str | None, received: float):
        question, system, history = split_messages(body.get("messages"))
        k = rag_k(body.pop("rag", None), self.options.k)
        hits = await self.retrieve(question, k, auth)
        body["messages"], kept = await self.ground(body, question, hits, system, history, auth)
        cits = citations(kept)
        if body.get("stream") is True:
            r = await self.llm.send("POST", "/v1/chat/completions", hop="llm", json_body=body, auth=auth,
                                    stream=True)
            return SSEResponse(_Relayed(self.relay(r, cits, received), r))
        r = await self.llm.send("POST", "/v1/chat/completions", hop="llm", json_body=body, auth=auth)
        try:
            answer = r.json()
        except ValueError:
            raise APIError(502, "the LLM service answered with a body that is not JSON", type="server_error",
                           code="upstream_error") from None
        answer["citations"] = cits
        self.metrics.e2e.observe(time.monotonic() - received)
        return JSONResponse(answer)

    async def ground(self, body: dict, question: str, hits, system, history, auth):
        """(grounded messages, hits kept). With --fit-context the LLM service counts the prompt with its own
        tokenizer and chat template (``POST /tokenize``); while prompt + the request's max tokens is over its
        context, the lowest-ranked source goes (citations follow). Without sources still too long: the LLM's 400."""
        reserve = body.get("max_completion_tokens") or body.get("max_tokens") or 1
        reserve = reserve if isinstance(reserve, int) and not isinstance(reserve, bool) else 1
        n = len(hits)
        while True:
            try:
                kept = [h for h, _ in fit_hits(hits[:n], system=system, history=history, question=question,
                                                max_context_tokens=self.options.max_context_tokens)]
                messages = grounded_messages(question, kept, system=system, history=history,
                                             max_context_tokens=self.options.max_context_tokens)
            except CubelmError as e:
                raise APIError(400, str(e), param="messages") from None
            if not self.options.fit_context or not kept:
                return messages, kept
            counted = await self.count_prompt(messages, body.get("model"), auth)
            if counted is None or counted[0] + reserve <= counted[1]:
                return messages, kept
            n = len(kept) - 1

    async def count_prompt(self, messages: list[dict], model, auth) -> tuple[int, int] | None:
        """(prompt tokens, the LLM's context length), or None when the service has no /tokenize (another server)."""
        body = {"messages": messages} | ({"model": model} if isinstance(model, str) else {})
        try:
            r = await self.llm.send("POST", "/tokenize", hop="tokenize", json_body=body, auth=auth)
        except APIError as e:
            if e.status in (404, 405):
                return None
            raise
        try:
            data = r.json()
            return int(data["count"]), int(data["max_model_len"])
        except (ValueError, KeyError, TypeError):
            return None

    async def relay(self, r: httpx.Response, cits: list[dict], received: float):
        """The LLM's server-sent events as they come; the first chunk gains ``citations``. A stream that breaks
        ends with an error event and ``[DONE]``, as the LLM service's own errors after the headers do."""
        started, outcome, first = time.monotonic(), "disconnect", True
        try:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": keep-alive"), other SSE fields
                data = line[5:].strip()
                if first and data != "[DONE]":
                    data, first = _with_citations(data, cits), False
                    self.metrics.ttft.observe(time.monotonic() - received)
                yield f"data: {data}\n\n"
                if data == "[DONE]":
                    outcome = "ok"
                    return
            outcome = "error"
            yield sse(error_body("the LLM service ended the stream without [DONE]", "server_error",
                                 code="upstream_error"))
            yield DONE
        except httpx.HTTPError as e:
            outcome = "error"
            yield sse(error_body(f"the LLM service's stream broke ({type(e).__name__})", "server_error",
                                 code="upstream_error"))
            yield DONE
        finally:
            await r.aclose()
            self.metrics.hop_done("llm", outcome, time.monotonic() - started)
            if outcome == "ok":
                self.metrics.e2e.observe(time.monotonic() - received)


class _Relayed:
    """The relay generator, plus the upstream response closed with it even when the generator never started (the
    client gone before the first byte): an unstarted generator's ``aclose`` does not run its ``finally``."""

    def __init__(self, events, response: httpx.Response):
        self.events, self.response = events, response

    def __aiter__(self):
        return self.events.__aiter__()

    async def aclose(self) -> None:
        try:
            await self.events.aclose()
        finally:
            await self.response.aclose()


def _embedding(r: httpx.Response) -> list[float] | None:
    try:
        vector = r.json()["data"][0]["embedding"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return vector if isinstance(vector, list) and all(isinstance(x, (int, float)) for x in vector) else None


def _with_citations(data: str, cits: list[dict]) -> str:
    try:
        chunk = json.loads(data)
    except ValueError:
        return data
    if not isinstance(chunk, dict) or "error" in chunk:
        return data
    chunk["citations"] = cits
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))


def _text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"messages.{i}.content must be a string or a list of text parts", param=f"messages.{i}")


def split_messages(messages) -> tuple[str, str, list[dict]]:
    """(question, system instruction, earlier turns): the question is the last message, which must be the user's;
    the client's system messages follow the grounding instruction, so they refine it without dropping it."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    turns, extra_system = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages.{i}: each message needs a role among {', '.join(ROLES)}",
                           param=f"messages.{i}")
        text = _text(m.get("content"), i)
        if m["role"] in ("system", "developer"):
            extra_system.append(text)
        else:
            turns.append({"role": m["role"], "content": text})
    if not turns or messages[-1].get("role") != "user" or not turns[-1]["content"].strip():
        raise APIError(400, "the last message must be the user's question, with text", param="messages")
    system = "\n\n".join([DEFAULT_SYSTEM, *filter(None, extra_system)]) if extra_system else None
    return turns[-1]["content"], system, turns[:-1]


def rag_k(rag, default: int) -> int:
    if rag is None:
        return default
    k = rag.get("k", default) if isinstance(rag, dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise APIError(400, f"rag.k must be an integer in 1..{MAX_K}", param="rag.k")
    return k


def create_router_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await router.aclose()

    app = FastAPI(title="cubelm router", summary="Inference graph: encoder service -> index -> LLM service",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=router.options.max_request_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal server error ({type(e).__name__}); this is a bug, please report "
                                       "it", "server_error"), status_code=500)

    @app.get("/health", summary="Liveness of the router itself")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="200 while both upstream services are ready, else 503 naming the one that is not")
    async def ready():
        encoder, llm = await asyncio.gather(router.encoder.ready(), router.llm.ready())
        body = {"status": "ready" if encoder == llm == "ready" else "waiting",
                "upstreams": {"encoder": encoder, "llm": llm}, "index_chunks": router.retriever.count}
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics (cubelm:router_*)", response_class=Response)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The LLM service's models (the router answers for them, with retrieval)")
    async def models(request: Request):
        r = await router.llm.send("GET", "/v1/models", hop="llm_models", auth=router.authorize(request))
        return JSONResponse(r.json())

    @app.post("/v1/chat/completions", summary="Retrieval-augmented chat (OpenAI shape) with citations")
    async def chat_completions(request: Request):
        received = time.monotonic()
        auth = router.authorize(request)
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return await router.chat(body, auth, received)

    return app
