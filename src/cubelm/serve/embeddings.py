"""``POST /v1/embeddings`` (OpenAI's shape, as vLLM serves it) over an adaptive batcher.

    cubelm serve --task embed --model all-minilm-l6-v2          # embeddings only
    cubelm serve --model DIR --embed-model all-minilm-l6-v2      # generation, plus /v1/embeddings

A request's inputs are tokenized in the request (a too-long input is a 400 before any queueing), queued on the
``AdaptiveBatcher`` with every other request's, embedded in shared forwards, then truncated to ``dimensions`` and
L2-normalized per request. ``encoding_format: base64`` sends each vector as its little-endian float32 bytes
(what the official client asks for by default, 4 bytes per dimension instead of ~20 characters of JSON).
Usage counts the tokens embedded, special tokens included. Metrics: batch sizes, queue time, forward time,
padded vs real tokens (``cubelm:embedding_*``).
"""

from __future__ import annotations

import asyncio
import time

from cubelm.errors import CubelmError
from cubelm.serve.errors import APIError
from cubelm.serve.protocol import EmbeddingRequest, EmbeddingResponse

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class EmbeddingMetrics:
    def __init__(self, registry, model_name: str):
        from prometheus_client import Counter, Histogram
        labels, r = ["model_name"], registry
        self.name = model_name
        self.batch_size = Histogram("cubelm:embedding_batch_size", "Inputs per embedding forward.", labels,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_time = Histogram("cubelm:embedding_queue_time_seconds", "Time an input waits for its batch.",
                                    labels, buckets=TIME_BUCKETS, registry=r)
        self.forward_time = Histogram("cubelm:embedding_forward_seconds", "Time of one batched forward.", labels,
                                      buckets=TIME_BUCKETS, registry=r)
        self.e2e = Histogram("cubelm:embedding_request_latency_seconds", "End-to-end embedding request latency.",
                             labels, buckets=TIME_BUCKETS, registry=r)
        self.tokens = Counter("cubelm:embedding_prompt_tokens", "Tokens embedded.", labels, registry=r)
        self.padded = Counter("cubelm:embedding_padded_tokens", "Token slots computed (real + padding).", labels,
                              registry=r)

    def on_batch(self, info) -> None:  # called by the batcher's worker thread; prometheus_client is thread-safe
        n = self.name
        self.batch_size.labels(n).observe(info.size)
        self.forward_time.labels(n).observe(info.forward_seconds)
        self.padded.labels(n).inc(info.padded_tokens)
        for q in info.queue_seconds:
            self.queue_time.labels(n).observe(q)


class EmbeddingService:
    """An embedder, its batcher and its served name."""

    def __init__(self, embedder, options, registry):
        from cubelm.rag.batcher import AdaptiveBatcher
        self.embedder, self.name = embedder, embedder.name
        self.metrics = EmbeddingMetrics(registry, self.name)
        self.batcher = AdaptiveBatcher(
            lambda ids, plens, width: embedder.embed_ids(ids, prompt_lengths=plens, pad_to=width),
            max_tokens=embedder.max_tokens, max_batch_size=options.embed_max_batch,
            max_delay_ms=options.embed_max_delay_ms,
            max_batch_tokens=max(options.embed_max_batch_tokens, embedder.max_tokens),
            max_queue=options.max_pending_requests * 16, on_batch=self.metrics.on_batch)
        self.in_flight = 0
        # no text longer than this can fit max_tokens (a token covers at most max_token_chars characters; x4 for
        # normalizers that drop or compose characters): refused before time goes into tokenizing it
        vocab = embedder.tokenizer.backend.get_vocab(with_added_tokens=True)
        self.max_chars = 4 * embedder.max_tokens * max(8, max((len(t) for t in vocab), default=1))

    @classmethod
    def load(cls, options, registry) -> "EmbeddingService":
        from cubelm.rag.embedder import load_embedder
        name = options.model if options.task == "embed" else options.embed_model
        embedder = load_embedder(name, pooling=options.embed_pooling, device=options.device,
                                 dtype=None if options.dtype == "auto" else options.dtype)
        if options.task == "embed" and options.served_model_name:
            embedder.name = options.served_model_name
        return cls(embedder, options, registry)

    def close(self) -> None:
        self.batcher.shutdown()

    def tokenize(self, req) -> tuple[list[list[int]], list[int]]:
        """Token ids of each input and the prompt lengths (for pooling), or a 400 naming what is wrong."""
        emb = self.embedder
        try:
            prompt = emb.prompt(req.prompt_name)
            plen = emb.prompt_length(req.prompt_name)
        except CubelmError as e:
            raise APIError(400, str(e), param="prompt_name") from None
        batch = []
        for i, x in enumerate(req.inputs()):
            if isinstance(x, str):
                if len(x) > self.max_chars:
                    raise _too_long(i, f"{len(x):,} characters", emb)
                ids = emb.tokenizer.encode(prompt + x, add_special_tokens=True)
            else:
                ids = x
                vocab = emb.tokenizer.vocab_size
                if max(ids) >= vocab:
                    raise APIError(400, f"input {i}: token ids must be in [0, {vocab}), got {max(ids)}",
                                   param="input")
            if len(ids) > emb.max_tokens:
                raise _too_long(i, f"{len(ids)} tokens", emb)
            batch.append(ids)
        return batch, [plen if isinstance(x, str) else 0 for x in req.inputs()]


def _too_long(i: int, size: str, emb) -> APIError:
    return APIError(400, f"input {i} has {size}, more than the {emb.max_tokens} tokens {emb.name} embeds; shorten "
                         f"or chunk it", param="input", code="context_length_exceeded")


def add_embedding_routes(app, state, client_id, responses) -> None:
    from fastapi import Depends
    from fastapi.responses import JSONResponse

    from cubelm.rag.batcher import QueueFull
    from cubelm.rag.vectors import to_base64, truncate_normalize

    @app.post("/v1/embeddings", summary="Embeddings (OpenAI): float or base64, Matryoshka dimensions",
              responses={200: {"model": EmbeddingResponse, "description": "One vector per input"}} | responses)
    async def embeddings(req: EmbeddingRequest, client: str = Depends(client_id)):
        received = time.monotonic()
        state.check_available()
        service = state.resolve_embedding_model(req.model)
        emb = service.embedder
        if req.dimensions is not None and req.dimensions > emb.dim:
            raise APIError(400, f"dimensions must be at most {emb.dim} for {service.name}, got {req.dimensions}",
                           param="dimensions")
        batch, plens = await asyncio.to_thread(service.tokenize, req)
        num_tokens = sum(map(len, batch))
        await state.wait_for_turn(client, num_tokens)
        service.in_flight += 1
        try:
            vectors = await asyncio.wait_for(service.batcher.embed(batch, plens),
                                             state.options.request_timeout or None)
        except QueueFull as e:
            raise APIError(503, f"the server is at capacity ({e}); retry shortly", type="server_unavailable",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except TimeoutError:
            raise APIError(504, f"the request exceeded the server's time limit ({state.options.request_timeout:g} "
                                f"s)", type="server_error", code="timeout") from None
        finally:
            service.in_flight -= 1
        vectors = truncate_normalize(vectors, req.dimensions)
        if req.encoding_format == "base64":
            data = [to_base64(v) for v in vectors]
        else:
            data = vectors.tolist()
        service.metrics.tokens.labels(service.name).inc(num_tokens)
        service.metrics.e2e.labels(service.name).observe(time.monotonic() - received)
        return JSONResponse({"object": "list", "model": service.name,
                             "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(data)],
                             "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})
