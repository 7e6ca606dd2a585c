"""What the V2 transports share: model metadata, V2 requests into engine requests, and the generated text.

A ``TextRequest`` (``cubelm.serve.v2.tensors``) becomes an OpenAI ``CompletionRequest`` built from its
``sampling_parameters``, so V2 and ``/v1/completions`` share every field check, default (``max_tokens`` 16) and the
admission path (``cubelm.serve.serving.admit``: context length, rate limits, queue limit, deadline): the same
prompt and parameters give the same text on both. Errors are ``APIError``s; REST answers them as
``{"error": "..."}`` with the HTTP status, gRPC with the matching status code (``grpc_code``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import ValidationError

import cubelm
from cubelm.serve.errors import APIError
from cubelm.serve.v2.tensors import INPUTS, OUTPUTS, TextRequest

VERSION = "1"  # the one version of the served model
PLATFORM = "cubelm"
# the sampling_parameters keys understood (vLLM's SamplingParams names); anything else is a 400, so a typo such
# as "max_token" is not silently ignored
SAMPLING_KEYS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
                           "skip_special_tokens"})
EXTENSIONS = ["generate", "model_stream_infer"]


def server_metadata() -> dict:
    return {"name": "cubelm", "version": cubelm.__version__, "extensions": EXTENSIONS}


def model_metadata(state, name: str, version: str | None = None) -> dict:
    resolve(state, name, version)
    return {"name": name, "versions": [VERSION], "platform": PLATFORM,
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s, _) in INPUTS.items()],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in OUTPUTS.items()]}


def resolve(state, name: str, version: str | None = None):
    """The adapter ``name`` runs on (None: the base model); 503 while not ready, 404 for an unknown name/version."""
    state.check_available()
    if version not in (None, "", VERSION):
        raise APIError(404, f"model '{name}' has no version '{version}'; its only version is '{VERSION}'",
                       param="model_version", code="model_not_found")
    try:
        return state.resolve_model(name)
    except APIError as e:
        raise APIError(404, e.message.replace("GET /v1/models", "GET /v1/models or /v2/models/{name}"),
                       param="model_name", code="model_not_found") from None


def completion_request(treq: TextRequest):
    from cubelm.serve.protocol import CompletionRequest
    unknown = sorted(set(treq.sampling) - SAMPLING_KEYS)
    if unknown:
        raise APIError(400, f"sampling_parameters: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                            f"{', '.join(sorted(SAMPLING_KEYS))}", param="sampling_parameters")
    if not treq.text:
        raise APIError(400, "text_input is empty; give a prompt", param="text_input")
    try:
        return CompletionRequest.model_validate({**treq.sampling, "prompt": treq.text, "stream": treq.stream})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if isinstance(x, (str, int)) and str(x).isidentifier())
        raise APIError(400, f"sampling_parameters: {where}: {err.get('msg')}", param="sampling_parameters") from None


@dataclass(slots=True)
class Generation:
    """An admitted request: its job and engine request, and what its text output starts with."""
    job: object
    reqs: list
    prefix: str  # the prompt when exclude_input_in_output is false, else ""


async def start(state, client: str, treq: TextRequest, name: str, version: str | None = None) -> Generation:
    from cubelm.serve.serving import admit, encode_prompt
    adapter = resolve(state, name, version)
    req = completion_request(treq)
    ids = encode_prompt(state, treq.text, add_special_tokens=True)
    vocab = state.engine.model.config.vocab_size
    if any(t >= vocab for t in req.stop_token_ids or []):
        raise APIError(400, f"sampling_parameters: stop_token_ids must be in [0, {vocab})", param="sampling_parameters")
    job, reqs = await admit(state, req, client, [ids], chat=False, max_tokens=req.max_tokens, logprobs=None,
                            adapter=adapter)
    return Generation(job, reqs, "" if treq.exclude_input else treq.text)


async def complete(state, gen: Generation) -> tuple[str, str]:
    """The whole text and its finish reason."""
    from cubelm.serve.serving import Responder
    body = await Responder(gen.job, state.tokenizer, state.metrics, state.options.request_timeout).collect(gen.reqs)
    choice = body["choices"][0]
    return gen.prefix + choice["text"], choice["finish_reason"]


async def pieces(state, gen: Generation) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, finish reason or None) as the engine generates; the last piece carries the finish reason."""
    from cubelm.engine.async_engine import EngineDead, RequestFailed
    from cubelm.serve.serving import DeadlineExceeded, deadline_error, engine_error
    job, (req,) = gen.job, gen.reqs
    prefix, num_tokens = gen.prefix, 0
    try:
        async for out in req.outputs():
            c = out.outputs[0]
            num_tokens += len(c.token_ids)
            if c.finish_reason == "abort":
                raise APIError(503, "the request was aborted by the server (shutting down); retry",
                               type="server_error", code="aborted")
            if c.text or prefix or c.finish_reason is not None:
                yield prefix + c.text, c.finish_reason
                prefix = ""
            if out.finished:
                state.metrics.observe_finished(out, job.received, time.monotonic(), num_tokens)
    except DeadlineExceeded:
        state.metrics.rejected("timeout")
        raise deadline_error(job, state.options.request_timeout) from None
    except (RequestFailed, EngineDead) as e:
        raise engine_error(e) from None
    finally:
        req.abort()  # NOTE: a stream closed early frees its KV blocks now


# gRPC status names for the HTTP statuses an APIError carries
GRPC_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
              429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}


class V2Metrics:
    """``cubelm:v2_requests{protocol, endpoint, code}``: V2 requests by transport, endpoint and outcome (the
    engine's latency histograms and the rejection counter are shared with the OpenAI routes)."""

    def __init__(self, metrics):
        from prometheus_client import Counter
        self.model_name = metrics.model_name
        self.requests = Counter("cubelm:v2_requests", "KServe V2 requests, by protocol (http, grpc), endpoint and "
                                "result code (HTTP status or gRPC code).", ["model_name", "protocol", "endpoint",
                                                                           "code"], registry=metrics.registry)

    def count(self, protocol: str, endpoint: str, code) -> None:
        self.requests.labels(self.model_name, protocol, endpoint, str(code)).inc()


def http_endpoint(path: str) -> str:
    """The metrics label of a /v2 path (never a model name: clients choose those, and labels must stay few)."""
    parts = path.strip("/").split("/")
    if parts == ["v2"]:
        return "server_metadata"
    if parts[:2] == ["v2", "health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
        return parts[2]
    if parts[:2] == ["v2", "models"] and len(parts) == 3:
        return "model_metadata"
    if parts[:2] == ["v2", "models"] and len(parts) == 4 and parts[3] in ("ready", "infer", "generate",
                                                                           "generate_stream"):
        return "model_ready" if parts[3] == "ready" else parts[3]
    return "other"


def v2_metrics(state) -> V2Metrics:
    """One ``V2Metrics`` per server (the REST routes and the gRPC server share it)."""
    m = getattr(state, "v2_metrics", None)
    if m is None:
        m = state.v2_metrics = V2Metrics(state.metrics)
    return m
