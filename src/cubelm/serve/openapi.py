"""The OpenAPI document, made to tell the truth: error statuses, no 422, and the server's own limits.

FastAPI documents a 422 for every route with a body, but validation errors are answered 400 in OpenAI's shape;
the errors a route really returns are declared on the route (``errors(400, 401, ...)``) with the
``ErrorResponse`` body. Limits that depend on the running server (``--max-n``, the model's vocabulary size for
token ids) replace the static maxima of the request models, so a request the document calls valid passes the
server's field checks and one it calls invalid is refused with 400.
"""

from __future__ import annotations

from cubelm.serve.protocol import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request: a field out of range, the context length exceeded, malformed JSON",
    401: "Missing or incorrect API key",
    404: "Unknown model or adapter",
    413: "Request body too large (--max-request-bytes)",
    429: "Rate limit reached; see the Retry-After header",
    500: "The engine failed this request (a server bug; other requests are unaffected)",
    503: "Not ready: loading, draining, at capacity, or the engine failed; see Retry-After",
    504: "The request exceeded the server's time limit (--request-timeout)",
}


def errors(*statuses: int, model=ErrorResponse) -> dict:
    """``responses=`` for a route: each status with its description and the error body (OpenAI's by default;
    the V2 routes pass theirs)."""
    return {s: {"model": model, "description": _DESCRIPTIONS[s]} for s in statuses}


def add_schemas(app, *models) -> None:
    """Put request models into the document's components, for routes that parse their body themselves and point
    at them from ``openapi_extra`` (``#/components/schemas/<Name>``)."""
    extra = getattr(app.state, "openapi_schemas", None)
    if extra is None:
        extra = app.state.openapi_schemas = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        extra.update(schema.pop("$defs", {}))
        extra[model.__name__] = schema


def ok(*media_types: str, description: str = "Successful Response") -> dict:
    """A 200 that is not (only) JSON: Prometheus text, or JSON and server-sent events (``stream: true``)."""
    return {200: {"description": description, "content": {m: {} for m in media_types}}}


def install_openapi(app, state) -> None:
    """Replace ``app.openapi`` with a version that drops 422 and fills in the server's limits."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            getattr(app.state, "openapi_schemas", {}))
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        vocab = _vocab_size(state)
        _set_maxima(schema, vocab, state.options.max_n)
        emb = state.embedding.embedder if state.embedding is not None else None
        _set_embed_maxima(schema, *((emb.tokenizer.vocab_size, emb.max_tokens, emb.dim) if emb else (None,) * 3))
        if state.loaded and (vocab or state.llm is None):  # cache only once the models are known
            app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _vocab_size(state) -> int | None:
    if state.engine is not None:
        return state.engine.model.config.vocab_size
    if state.options.task == "embed":
        return None
    try:
        from cubelm.model.config import read_config_json
        return read_config_json(state.options.model).vocab_size
    except Exception:  # noqa: BLE001 - the document is still served; the load reports the real problem
        return None


def _set_maxima(node, vocab: int | None, max_n: int) -> None:
    """Nodes marked ``x-token-id`` get the vocabulary's maximum, ``x-server-max-n`` gets --max-n."""
    if isinstance(node, dict):
        if node.pop("x-token-id", False) and vocab:
            node["maximum"] = vocab - 1
        if node.pop("x-server-max-n", False):
            node["maximum"] = max_n
        for v in node.values():
            _set_maxima(v, vocab, max_n)
    elif isinstance(node, list):
        for v in node:
            _set_maxima(v, vocab, max_n)


def _set_embed_maxima(node, vocab: int | None, max_tokens: int | None, dim: int | None) -> None:
    """/v1/embeddings: token ids below the embedding model's vocabulary, at most its max_tokens per input,
    dimensions at most its embedding size."""
    if isinstance(node, dict):
        if node.pop("x-embed-dim", False) and dim:
            node["maximum"] = dim
        if node.pop("x-embed-token-id", False) and vocab:
            node["maximum"] = vocab - 1
        if node.pop("x-embed-max-tokens", False) and max_tokens:
            node["maxItems"] = max_tokens
        for v in node.values():
            _set_embed_maxima(v, vocab, max_tokens, dim)
    elif isinstance(node, list):
        for v in node:
            _set_embed_maxima(v, vocab, max_tokens, dim)
