"""``ServerState``: what the routes share: the engine (once loaded), keys, limits, metrics, and the lifecycle.

Lifecycle: loading (``/ready`` 503) -> ready -> draining (SIGTERM: ``/ready`` 503, new work 503, in-flight work
finishes) -> exit 0. If the engine loop dies, ``/health`` and ``/ready`` answer 503 at once, new requests get 503,
and the server drains and exits non-zero so that its supervisor (Kubernetes, systemd) restarts it.

Models: the base model under its served name, plus the adapters the engine has registered (``--lora-modules``,
the runtime load route); ``resolve_model`` maps a request's ``model`` to one of them or answers 404.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cubelm.serve.auth import KeyChecker, load_api_keys
from cubelm.serve.errors import APIError
from cubelm.serve.metrics import ServerMetrics
from cubelm.serve.ratelimit import RateLimitConfig, RateLimiter

log = logging.getLogger("cubelm.serve")


class ServerState:
    def __init__(self, options, *, engine=None):
        self.options = options
        self.model_name = options.served_model_name
        self.keys = KeyChecker(load_api_keys(options.api_key, options.api_key_file))
        rl = RateLimitConfig(strategy=options.rate_limit_strategy, requests_per_minute=options.rate_limit_rpm,
                             tokens_per_minute=options.rate_limit_tpm, burst_seconds=options.rate_limit_burst_seconds,
                             storage_uri=options.rate_limit_storage)
        self.limiter = RateLimiter(rl) if rl.enabled else None
        self.limiter_blocks = not rl.storage_uri.startswith("memory")  # network storage: call it off the loop
        self.metrics = ServerMetrics(self.model_name)
        self.engine, self.llm, self.tokenizer = engine, None, None
        self.max_prompt_chars = 0  # no prompt longer than this can fit the context (set once loaded)
        self.load_error: BaseException | None = None
        self.draining = False
        self.num_delayed = 0  # admitted, waiting out a leaky-bucket delay before reaching the engine
        self.live: set = set()  # serving.EngineRequest objects in flight
        self.embedding = None  # cubelm.serve.embeddings.EmbeddingService (--task embed, --embed-model)
        self.loaded = False  # every model this server serves is loaded
        self.feature_store = None
        self.rag = None  # cubelm.serve.rag_chat.RagService (--rag-index)
        if getattr(options, "feature_store", None):  # imported only here: the server without the extra is unchanged
            from cubelm.rag.features import open_store
            self.feature_store = open_store(options.feature_store)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            if self.options.task != "embed":
                self._load_engine()
            if self.options.task == "embed" or self.options.embed_model:
                from cubelm.serve.embeddings import EmbeddingService
                self.embedding = EmbeddingService.load(self.options, self.metrics.registry)
            if getattr(self.options, "rag_index", None):
                from cubelm.serve.rag_chat import RagService
                self.rag = RagService.load(self.options, self.embedding, self.metrics.registry)
            self.loaded = True
        except BaseException as e:  # noqa: BLE001 - reported by `cubelm serve`, which then exits non-zero
            self.load_error = e

    def _load_engine(self) -> None:
        from cubelm.engine.async_engine import AsyncLLM
        if self.engine is None:
            from cubelm.engine.config import EngineConfig
            from cubelm.engine.llm_engine import LLMEngine
            o = self.options
            cfg = EngineConfig(kv_cache_memory=o.kv_cache_memory, max_num_seqs=o.max_num_seqs,
                               max_model_len=o.max_model_len, num_blocks=o.num_blocks,
                               kv_cache_dtype=o.kv_cache_dtype,
                               enable_lora=o.enable_lora, max_loras=o.max_loras, max_lora_rank=o.max_lora_rank,
                               max_cpu_loras=o.max_cpu_loras, quantization=o.quantization,
                               quantization_group_size=o.quantization_group_size)
            self.engine = LLMEngine.from_model_dir(o.model, cfg, device=o.device, dtype=o.dtype)
            self._register_lora_modules()
        self.tokenizer = self.engine.tokenizer
        self.max_prompt_chars = 4 * self.engine.max_model_len * _max_token_chars(self.tokenizer)
        self.metrics.attach(self.engine)
        self.llm = AsyncLLM(self.engine, max_batch_delay_ms=self.options.max_batch_delay_ms,
                            max_waiting=self.options.max_pending_requests)

    @property
    def engine_error(self) -> BaseException | None:
        """Why the engine loop died, if it did."""
        return self.llm.error if self.llm is not None else None

    @property
    def in_flight(self) -> int:
        return ((self.llm.num_unfinished if self.llm is not None else 0) + self.num_delayed
                + (self.embedding.in_flight if self.embedding is not None else 0))

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
        if self.embedding is not None:
            self.embedding.close()
        if self.rag is not None:
            self.rag.close()

    def check_available(self) -> None:
        if self.engine_error is not None:
            raise APIError(503, f"the engine failed ({type(self.engine_error).__name__}); this server is restarting, "
                                f"retry on another replica", type="server_error", code="engine_dead",
                           headers={"Retry-After": "1"})
        if self.draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; retry on another replica",
                           type="server_unavailable", code="draining", headers={"Retry-After": "1"})
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error", code="not_ready")
        if not self.loaded:
            raise APIError(503, "the model is still loading; retry when GET /ready answers 200",
                           type="server_unavailable", code="not_ready", headers={"Retry-After": "1"})

    def _register_lora_modules(self) -> None:
        from cubelm.serve.lora import parse_lora_modules
        for name, path in parse_lora_modules(self.options.lora_modules).items():
            self.engine.lora_manager.register(name, path)

    def adapters(self) -> list:
        manager = self.engine.lora_manager if self.engine is not None else None
        return manager.adapters() if manager is not None else []

    def resolve_model(self, model: str | None):
        """The adapter a request's ``model`` names, or None for the base model; 404 for any other name."""
        if model is None or model == self.model_name:
            return None
        manager = self.engine.lora_manager if self.engine is not None else None
        adapter = manager.get(model) if manager is not None else None
        if adapter is None:
            names = [self.model_name] + [a.name for a in self.adapters()]
            shown = ", ".join(f"'{n}'" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise APIError(404, f"the model '{model}' does not exist; this server serves {shown} (see GET "
                                f"/v1/models)", param="model", code="model_not_found")
        return adapter

    def resolve_embedding_model(self, model: str | None):
        """The embedding service a /v1/embeddings request's ``model`` names (None: the one there is)."""
        service = self.embedding
        if service is not None and (model is None or model == service.name):
            return service
        if model is not None and model != self.model_name and not any(a.name == model for a in self.adapters()):
            self.resolve_model(model)  # 404 naming the served models
        where = (f"; the embedding model here is '{service.name}'" if service is not None else
                 "; start the server with --embed-model NAME, or --task embed")
        raise APIError(400, f"the model '{model}' does not support embeddings{where}", param="model",
                       code="model_not_supported")

    async def wait_for_turn(self, client: str, num_tokens: int) -> None:
        """Charge the rate limits; a leaky bucket's delay is waited out here (counted as in flight)."""
        delay = await self.rate_limit(client, num_tokens)
        if delay > 0:
            self.num_delayed += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.num_delayed -= 1
            self.check_available()
    async def personalize(self, user: str, messages: list[dict]) -> list[dict]:
        """The chat messages with the user's online features as a system preamble (``--feature-store``). The
        lookup (SQLite) runs off the event loop; a failing store degrades to the plain messages: the features
        improve an answer, they are not needed for one."""
        from cubelm.rag.features import personalize_messages
        try:
            out = await asyncio.to_thread(personalize_messages, self.feature_store, user, messages)
        except Exception as e:  # noqa: BLE001 - logged; the request goes on without features
            self.metrics.feature_lookup("error")
            log.warning("feature store lookup for user %r failed (%s: %s); answering without features", user,
                        type(e).__name__, e)
            return messages
        self.metrics.feature_lookup("personalized" if out != messages else "unknown_user")
        return out

    async def precheck_rate_limit(self, client: str) -> None:
        """429 now if ``client`` is already over a limit (nothing spent; ``rate_limit`` charges later)."""
        if self.limiter is None:
            return
        try:
            if self.limiter_blocks:
                await asyncio.to_thread(self.limiter.precheck, client)
            else:
                self.limiter.precheck(client)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - as rate_limit: the storage's problem, not the client's
            raise APIError(503, f"the rate-limit storage is unavailable ({type(e).__name__}); retry shortly",
                           type="server_error", code="rate_limit_storage") from None

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


def _max_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry. A token covers at most that many characters of text, or a few
    times more where a normalizer composes characters (NFKC: e + U+0301 -> é), hence the caller's factor 4: a text
    longer than 4 x context x this cannot fit the context and is refused before any time goes into tokenizing it."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return max(8, max((len(t) for t in vocab), default=1))
