"""The FastAPI application: routes and request validation into OpenAI errors.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``,
``POST /detokenize``, ``POST /v1/embeddings`` (``cubelm.serve.embeddings``; with ``--task embed`` the only model
route), ``GET /health`` (liveness), ``GET /ready`` (503 while loading or draining), ``GET /metrics``
(Prometheus), OpenAPI docs at ``/docs``; with ``--enable-runtime-lora`` also ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` (``cubelm.serve.lora``); KServe V2 under ``/v2`` (``cubelm.serve.v2``, also over
gRPC with ``--grpc-port``); with ``--feature-store`` a chat request's ``user`` pulls that user's online
features into the prompt (``cubelm.rag.features``); with ``--rag-index`` ``POST /v1/rag/chat``
(retrieval-augmented chat with citations, ``cubelm.serve.rag_chat``). A request's ``model`` is the base model or
an adapter. The model loads in a background thread so that ``/health`` and ``/ready`` answer from the first
second. Build one with ``create_app(ServerState(options))``; ``cubelm serve`` runs it.
Every error a route can return is in the OpenAPI document with OpenAI's error body (``cubelm.serve.openapi``).
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cubelm.errors import CubelmError
from cubelm.serve.auth import key_id
from cubelm.serve.body_limit import BodyLimit
from cubelm.serve.errors import APIError, error_body
from cubelm.serve.lora import add_lora_routes, model_card
from cubelm.serve.openapi import errors, install_openapi, ok
from cubelm.serve.embeddings import add_embedding_routes
from cubelm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                                   TokenizeRequest, chat_messages, now_s)
from cubelm.serve.serving import Responder, admit, encode_prompt
from cubelm.serve.state import ServerState
from cubelm.serve.streaming import SSEResponse, until_disconnect

_REJECT_REASONS = {400: "invalid", 401: "auth", 404: "invalid", 413: "invalid", 429: "rate_limit", 504: "timeout"}
GENERATE_RESPONSES = ok("application/json", "text/event-stream",
                        description="The completion (JSON), or with stream=true its server-sent events") | errors(
    400, 401, 404, 413, 429, 500, 503, 504)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, name="cubelm-load", daemon=True)
        loader.start()
        grpc_server = None
        if state.options.grpc_port:  # KServe V2 over gRPC, on this event loop, sharing the engine
            from cubelm.serve.v2.grpc_server import start_grpc_server
            grpc_server = await start_grpc_server(state, state.options.host, state.options.grpc_port)
        yield
        if grpc_server is not None:  # the drain is over: finish what is still running for a moment, then stop
            await grpc_server.stop(grace=5)
        # A SIGTERM while the model loads must wait for the load: the interpreter exiting under a thread that is
        # inside torch's C++ code aborts the process ("terminate called without an active exception", exit 134).
        await asyncio.to_thread(loader.join)
        state.close()

    app = FastAPI(title="cubelm", summary="OpenAI-compatible API for cubelm models", lifespan=lifespan)
    app.state.cubelm = state
    app.add_middleware(BodyLimit, max_bytes=state.options.max_request_bytes)
    _add_error_handlers(app, state)
    install_openapi(app, state)

    def client_id(request: Request) -> str:
        key = state.keys.check(request.headers)
        return key_id(key) if key else "ip:" + (request.client.host if request.client else "unknown")

    @app.get("/health", summary="Liveness: the process answers and the engine loop is alive", responses=errors(503))
    async def health():
        if state.engine_error is not None:
            return JSONResponse({"status": "engine failed", "error": str(state.engine_error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded; 503 while loading, draining or failed",
             responses=errors(503))
    async def ready():
        if state.engine_error is not None or state.draining or not state.loaded:
            status = ("failed" if state.engine_error is not None or state.load_error is not None
                      else "draining" if state.draining else "loading")
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics", summary="Prometheus metrics (cubelm:*)", response_class=Response,
             responses=ok("text/plain", description="Prometheus text exposition format") | errors(401))
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        if state.options.metrics_require_key:
            state.keys.check(request.headers)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The served model and its adapters (each with the base as its parent)",
             response_model=ModelList, responses=errors(401, 503))
    async def models(_: str = Depends(client_id)):
        state.check_available()
        cards = [model_card(state)] + [model_card(state, a) for a in state.adapters()] if state.llm else []
        if state.embedding is not None and state.embedding.name not in {c.id for c in cards}:
            cards.append(ModelCard(id=state.embedding.name, created=now_s(), root=state.embedding.name,
                                   max_model_len=state.embedding.embedder.max_tokens))
        return ModelList(data=cards)

    if state.options.task == "embed" or state.options.embed_model:
        add_embedding_routes(app, state, client_id, errors(400, 401, 404, 413, 429, 503, 504))
    if state.options.task == "embed":  # no generation, tokenizer or adapter routes: there is no LLM
        return app

    _add_generation_routes(app, state, client_id)
    if getattr(state.options, "rag_index", None):
        from cubelm.serve.rag_chat import add_rag_routes
        add_rag_routes(app, state, client_id, GENERATE_RESPONSES)
    if state.options.enable_runtime_lora:
        add_lora_routes(app, state, client_id)
    from cubelm.serve.v2.rest import add_v2_routes
    add_v2_routes(app, state, client_id)
    return app


def _add_generation_routes(app: FastAPI, state: ServerState, client_id) -> None:
    @app.post("/v1/completions", summary="Text completion (OpenAI)", responses=GENERATE_RESPONSES)
    async def completions(req: CompletionRequest, request: Request, client: str = Depends(client_id)):
        adapter = _check_request(state, req)
        prompts = [encode_prompt(state, p, add_special_tokens=True) if isinstance(p, str) else list(p)
                   for p in req.prompts()]
        return await _generate(state, req, request, client, prompts, chat=False,
                               max_tokens=req.max_tokens, logprobs=req.logprobs, adapter=adapter)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI), with the model's chat template",
              responses=GENERATE_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request, client: str = Depends(client_id)):
        adapter = _check_request(state, req)
        messages = req.chat_messages()
        if state.feature_store is not None and req.user:
            messages = await state.personalize(req.user, messages)
        ids = encode_prompt(state, _render_chat(state, messages), add_special_tokens=False)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await _generate(state, req, request, client, [ids], chat=True,
                               max_tokens=req.requested_max_tokens(), logprobs=logprobs, adapter=adapter)

    @app.post("/tokenize", summary="Token ids of a prompt or of chat messages (after the chat template)",
              responses=errors(400, 401, 404, 413, 503))
    async def tokenize(req: TokenizeRequest, _: str = Depends(client_id)):
        state.check_available()
        state.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            ids = encode_prompt(state, req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = encode_prompt(state, _render_chat(state, chat_messages(req.messages), req.add_generation_prompt),
                          add_special_tokens=False)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", summary="Text of token ids", responses=errors(400, 401, 404, 413, 503))
    async def detokenize(req: DetokenizeRequest, _: str = Depends(client_id)):
        state.check_available()
        state.resolve_model(req.model)
        _check_token_ids(state, req.tokens, "tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}


def _check_request(state: ServerState, req):
    """What the schema cannot say: server limits and cross-field rules (each a 400 naming the field), and the
    model (404). Returns the adapter the request runs on (None: the base model)."""
    state.check_available()
    adapter = state.resolve_model(req.model)
    req.check_cross_field()
    if req.n > state.options.max_n:
        raise APIError(400, f"n must be at most {state.options.max_n} on this server (--max-n), got {req.n}",
                       param="n")
    _check_token_ids(state, req.stop_token_ids or [], "stop_token_ids")
    if isinstance(req, CompletionRequest):
        for p in req.prompts():
            if not isinstance(p, str):
                _check_token_ids(state, p, "prompt")
    return adapter


def _check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.engine.model.config.vocab_size
    bad = [t for t in ids if t >= vocab]
    if bad:
        raise APIError(400, f"{param}: token ids must be in [0, {vocab}), got {bad[:5]}", param=param)


def _render_chat(state: ServerState, messages: list[dict], add_generation_prompt: bool = True) -> str:
    if sum(len(m["content"]) for m in messages) > state.max_prompt_chars:
        raise APIError(400, f"the messages are longer than any {state.engine.max_model_len:,}-token context can "
                            f"hold; shorten them", param="messages", code="context_length_exceeded")
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except CubelmError as e:
        raise APIError(400, str(e), param="messages") from None


async def _generate(state: ServerState, req, request: Request, client: str, prompts: list[list[int]], *,
                    chat: bool, max_tokens: int | None, logprobs: int | None, adapter=None):
    job, reqs = await admit(state, req, client, prompts, chat=chat, max_tokens=max_tokens, logprobs=logprobs,
                            adapter=adapter)
    responder = Responder(job, state.tokenizer, state.metrics, state.options.request_timeout)
    if job.stream:
        return SSEResponse(responder.stream(reqs))
    body = await until_disconnect(responder.collect(reqs), request.receive)
    if body is None:  # the client went away; nobody reads this
        state.metrics.rejected("disconnect")
        return Response(status_code=499)
    return body


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    def reply(request: Request, body: dict, status: int, headers=None) -> JSONResponse:
        """OpenAI's error shape, or on a KServe V2 path the protocol's ``{"error": "..."}``."""
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            from cubelm.serve.v2.core import http_endpoint, v2_metrics
            v2_metrics(state).count("http", http_endpoint(path), status)
            body = {"error": body["error"]["message"]}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state.metrics.rejected(_REJECT_REASONS.get(e.status) or e.code or str(e.status))
        return reply(request, e.body(), e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        state.metrics.rejected("invalid")
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return reply(request, error_body(f"the request body is not valid JSON ({err.get('msg')})",
                                             "invalid_request_error"), 400)
        # keep field names and list indices; drop pydantic's union-branch labels ("function-after[...]", "str")
        loc = [str(x) for x in err.get("loc", ()) if isinstance(x, int) or (
            str(x).isidentifier() and x not in ("body", "str", "int", "float", "bool", "list", "dict"))]
        param = ".".join(loc) or None
        where = f"{param}: " if param else ""
        return reply(request, error_body(f"invalid request: {where}{err.get('msg')}", "invalid_request_error", param),
                     400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return reply(request, error_body(str(e.detail), "invalid_request_error"), e.status_code,
                     getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return reply(request, error_body(f"internal server error ({type(e).__name__}); this is a bug, please report "
                                         f"it", "server_error"), 500)
