"""The FastAPI application: routes, request validation into OpenAI errors, and the server's lifecycle state.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``,
``POST /detokenize``, ``GET /health`` (liveness), ``GET /ready`` (503 while loading or draining), ``GET /metrics``
(Prometheus), OpenAPI docs at ``/docs``. The model loads in a background thread so that ``/health`` and ``/ready``
answer from the first second. Build one with ``create_app(ServerState(options))``; ``cubelm serve`` runs it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cubelm.errors import CubelmError
from cubelm.serve.auth import KeyChecker, key_id, load_api_keys
from cubelm.serve.errors import APIError, error_body
from cubelm.serve.metrics import ServerMetrics
from cubelm.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                   new_id, now_s)
from cubelm.serve.ratelimit import RateLimitConfig, RateLimiter
from cubelm.serve.serving import EngineRequest, Job, Responder, submit_all
from cubelm.serve.streaming import SSEResponse, until_disconnect

_REJECT_REASONS = {400: "invalid", 401: "auth", 404: "invalid", 429: "rate_limit", 504: "timeout"}


class ServerState:
    """Everything the routes share: the engine (once loaded), keys, limits, metrics, and the draining flag."""

    def __init__(self, options, *, engine=None):
        self.o = options
        self.model_name = options.served_model_name
        self.keys = KeyChecker(load_api_keys(options.api_key, options.api_key_file))
        rl = RateLimitConfig(strategy=options.rate_limit_strategy, requests_per_minute=options.rate_limit_rpm,
                             tokens_per_minute=options.rate_limit_tpm, burst_seconds=options.rate_limit_burst_seconds,
                             storage_uri=options.rate_limit_storage)
        self.limiter = RateLimiter(rl) if rl.enabled else None
        self.limiter_blocks = not rl.storage_uri.startswith("memory")  # network storage: call it off the loop
        self.metrics = ServerMetrics(self.model_name)
        self.engine, self.llm, self.tokenizer = engine, None, None
        self.load_error: BaseException | None = None
        self.draining = False
        self.num_delayed = 0  # admitted, waiting out a leaky-bucket delay before reaching the engine
        self.live: set[EngineRequest] = set()

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def load(self) -> None:
        from cubelm.engine.async_engine import AsyncLLM
        try:
            if self.engine is None:
                from cubelm.engine.config import EngineConfig
                from cubelm.engine.llm_engine import LLMEngine
                cfg = EngineConfig(kv_cache_memory=self.o.kv_cache_memory, max_num_seqs=self.o.max_num_seqs,
                                   max_model_len=self.o.max_model_len, num_blocks=self.o.num_blocks)
                self.engine = LLMEngine.from_model_dir(self.o.model, cfg)
            self.tokenizer = self.engine.tokenizer
            self.metrics.attach(self.engine)
            self.llm = AsyncLLM(self.engine, max_batch_delay_ms=self.o.max_batch_delay_ms,
                                max_waiting=self.o.max_pending_requests)
        except BaseException as e:  # noqa: BLE001 - reported by `cubelm serve`, which then exits non-zero
            self.load_error = e

    @property
    def in_flight(self) -> int:
        return (self.llm.num_unfinished if self.llm is not None else 0) + self.num_delayed

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish for up to ``timeout`` seconds, then fail the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for r in list(self.live):
            r.fail(APIError(503, f"the server shut down before this request finished (--shutdown-timeout "
                                 f"{timeout:g} s); retry", type="server_error", code="shutdown"))

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()

    def check_available(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; retry on another replica",
                           type="server_unavailable", code="draining", headers={"Retry-After": "1"})
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error", code="not_ready")
        if self.llm is None:
            raise APIError(503, "the model is still loading; retry when GET /ready answers 200",
                           type="server_unavailable", code="not_ready", headers={"Retry-After": "1"})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    async def rate_limit(self, client: str, num_tokens: int) -> float:
        if self.limiter is None:
            return 0.0
        try:
            if self.limiter_blocks:
                return await asyncio.to_thread(self.limiter.admit, client, num_tokens)
            return self.limiter.admit(client, num_tokens)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - storage down is the server's problem, not the client's
            raise APIError(503, f"the rate-limit storage is unavailable ({type(e).__name__}); retry shortly",
                           type="server_error", code="rate_limit_storage") from None


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, name="cubelm-load", daemon=True)
        loader.start()
        yield
        # A SIGTERM while the model loads must wait for the load: the interpreter exiting under a thread that is
        # inside torch's C++ code aborts the process ("terminate called without an active exception", exit 134).
        await asyncio.to_thread(loader.join)
        state.close()

    app = FastAPI(title="cubelm", summary="OpenAI-compatible API for cubelm models", lifespan=lifespan)
    app.state.cubelm = state
    _add_error_handlers(app, state)

    def client_id(request: Request) -> str:
        key = state.keys.check(request.headers)
        return key_id(key) if key else "ip:" + (request.client.host if request.client else "unknown")

    @app.get("/health", summary="Liveness: the process answers and the engine loop is alive")
    async def health():
        if state.llm is not None and state.llm.error is not None:
            return JSONResponse({"status": "engine failed", "error": str(state.llm.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 while loading or draining")
    async def ready():
        if state.draining or state.llm is None:
            status = "draining" if state.draining else ("failed" if state.load_error else "loading")
            return JSONResponse({"status": status}, status_code=503)
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics", summary="Prometheus metrics (cubelm:*)")
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        if state.o.metrics_require_key:
            state.keys.check(request.headers)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", summary="The served model")
    async def models(_: str = Depends(client_id)):
        state.check_available()
        card = {"id": state.model_name, "object": "model", "created": now_s(), "owned_by": "cubelm",
                "root": str(state.o.model), "max_model_len": state.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", summary="Text completion (OpenAI)")
    async def completions(req: CompletionRequest, request: Request, client: str = Depends(client_id)):
        state.check_available()
        state.check_model(req.model)
        req.check_unsupported()
        prompts = [state.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
                   for p in req.prompts()]
        return await _generate(state, req, request, client, prompts, chat=False,
                               max_tokens=req.max_tokens, logprobs=req.logprobs)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI), with the tokenizer's chat template")
    async def chat_completions(req: ChatCompletionRequest, request: Request, client: str = Depends(client_id)):
        state.check_available()
        state.check_model(req.model)
        req.check_unsupported()
        ids = state.tokenizer.encode(_render_chat(state, req.chat_messages()), add_special_tokens=False)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await _generate(state, req, request, client, [ids], chat=True,
                               max_tokens=req.requested_max_tokens(), logprobs=logprobs)

    @app.post("/tokenize", summary="Token ids of a prompt or of chat messages (after the chat template)")
    async def tokenize(req: TokenizeRequest, _: str = Depends(client_id)):
        state.check_available()
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:  # as a completion prompt: with the tokenizer's special tokens
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:  # the template writes the special tokens itself
            ids = state.tokenizer.encode(_render_chat(
                state, [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages], req.add_generation_prompt), add_special_tokens=False)
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", summary="Text of token ids")
    async def detokenize(req: DetokenizeRequest, _: str = Depends(client_id)):
        state.check_available()
        state.check_model(req.model)
        vocab = state.engine.model.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    return app


def _render_chat(state: ServerState, messages: list[dict], add_generation_prompt: bool = True) -> str:
    try:
        return state.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except CubelmError as e:
        raise APIError(400, str(e), param="messages") from None


async def _generate(state: ServerState, req, request: Request, client: str, prompts: list[list[int]], *,
                    chat: bool, max_tokens: int | None, logprobs: int | None):
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
    timeout = state.o.request_timeout
    job = Job(chat=chat, request_id=new_id("chatcmpl" if chat else "cmpl"), model=state.model_name,
              prompts=prompts, params=params, stream=req.stream, include_usage=req.include_usage,
              received=received, deadline=received + timeout if timeout else None)
    delay = await state.rate_limit(client, sum(map(len, prompts)) + len(prompts) * params.n * max_tokens)
    if delay > 0:  # leaky bucket: wait for our turn in the queue
        state.num_delayed += 1
        try:
            await asyncio.sleep(delay)
        finally:
            state.num_delayed -= 1
        state.check_available()
    reqs = submit_all(state.llm, job, state.live)
    responder = Responder(job, state.tokenizer, state.metrics, timeout)
    if job.stream:
        return SSEResponse(responder.stream(reqs))
    body = await until_disconnect(responder.collect(reqs), request.receive)
    if body is None:  # the client went away; nobody reads this
        state.metrics.rejected("disconnect")
        return Response(status_code=499)
    return body


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        state.metrics.rejected(_REJECT_REASONS.get(e.status) or e.code or str(e.status))
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        state.metrics.rejected("invalid")
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({err.get('msg')})",
                                           "invalid_request_error"), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        where = f"{param}: " if param else ""
        return JSONResponse(error_body(f"invalid request: {where}{err.get('msg')}", "invalid_request_error", param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal server error ({type(e).__name__}); this is a bug, please report it",
                                       "server_error"), status_code=500)
