"""KServe V2 (Open Inference Protocol) over REST, on the same app, engine and admission as the OpenAI routes.

    GET  /v2                                 server metadata
    GET  /v2/health/live, /v2/health/ready   liveness, readiness (no API key, like /health and /ready)
    GET  /v2/models/{name}                   model metadata: versions, platform, input and output tensors
    GET  /v2/models/{name}/ready             the model is ready
    POST /v2/models/{name}/infer             one completion: text_input in, text_output out (BYTES tensors)
    POST /v2/models/{name}/generate          Triton's generate extension: {"text_input": ..., "parameters": ...}
    POST /v2/models/{name}/generate_stream   the same as server-sent events, one per piece of text

Infer takes plain JSON or Triton's binary tensor extension (the ``Inference-Header-Content-Length`` header: a
JSON header, then each tensor's raw bytes), which ``tritonclient.http`` uses by default, and answers binary
outputs when asked (``binary_data`` / ``binary_data_output``). Streaming needs generate_stream or gRPC: infer
with ``stream`` true is a 400. Errors are ``{"error": "..."}`` (``cubelm.serve.app`` renders every error on a
/v2 path that way); model routes need the API key and count against the caller's rate limit.
"""

from __future__ import annotations

import json

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from cubelm.serve.errors import APIError
from cubelm.serve.openapi import add_schemas, errors, ok
from cubelm.serve.streaming import SSEResponse, sse, until_disconnect
from cubelm.serve.v2 import core, schemas
from cubelm.serve.v2.tensors import OUTPUTS, Tensor, decode_raw, encode_bytes, text_request

HEADER_LENGTH = "inference-header-content-length"
GENERATE_ERRORS = errors(400, 401, 404, 413, 429, 500, 503, 504, model=schemas.V2Error)


def _body(model) -> dict:
    """``openapi_extra`` for a route that parses its body itself (binary extension, V2-shaped errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_v2_routes(app: FastAPI, state, client_id) -> None:
    metrics = core.v2_metrics(state)
    add_schemas(app, schemas.InferRequest, schemas.GenerateRequest)

    def counted(endpoint: str, body):
        metrics.count("http", endpoint, 200)
        return body

    @app.get("/v2", summary="V2 server metadata", response_model=schemas.ServerMetadata)
    async def server_metadata():
        return counted("server_metadata", core.server_metadata())

    @app.get("/v2/health/live", summary="V2 liveness (as /health)", response_model=schemas.Live,
             responses=errors(503, model=schemas.V2Error))
    async def live():
        if state.engine_error is not None:
            raise APIError(503, f"the engine failed: {state.engine_error}", code="engine_dead")
        return counted("live", {"live": True})

    @app.get("/v2/health/ready", summary="V2 readiness (as /ready): 503 while loading, draining or failed",
             response_model=schemas.Ready, responses=errors(503, model=schemas.V2Error))
    async def ready():
        state.check_available()
        return counted("ready", {"ready": True})

    @app.get("/v2/models/{model_name}", summary="V2 model metadata: its tensors", response_model=schemas.ModelMetadata,
             responses=errors(401, 404, 503, model=schemas.V2Error))
    async def model_metadata(model_name: str, _: str = Depends(client_id)):
        return counted("model_metadata", core.model_metadata(state, model_name))

    @app.get("/v2/models/{model_name}/ready", summary="V2 model readiness", response_model=schemas.ModelReady,
             responses=errors(401, 404, 503, model=schemas.V2Error))
    async def model_ready(model_name: str, _: str = Depends(client_id)):
        core.resolve(state, model_name)
        return counted("model_ready", {"name": model_name, "ready": True})

    @app.post("/v2/models/{model_name}/infer", summary="V2 inference: text_input -> text_output",
              openapi_extra=_body(schemas.InferRequest),
              responses=ok("application/json", "application/octet-stream",
                           description="The outputs (JSON; with binary outputs requested, a JSON header of "
                                       "Inference-Header-Content-Length bytes, then the tensors' bytes)") | {
                  200: {"model": schemas.InferResponse}} | GENERATE_ERRORS)
    async def infer(model_name: str, request: Request, client: str = Depends(client_id)):
        body, binary = await _read_infer_body(request)
        treq = text_request(_tensors(body, binary), body.parameters)
        if treq.stream:
            raise APIError(400, "stream=true needs a streaming transport: POST /v2/models/{name}/generate_stream "
                                "or gRPC ModelStreamInfer", param="stream")
        binary_out = _binary_outputs(body)
        gen = await core.start(state, client, treq, model_name)
        result = await until_disconnect(core.complete(state, gen), request.receive)
        if result is None:  # the client went away
            state.metrics.rejected("disconnect")
            return Response(status_code=499)
        text, finish_reason = result
        metrics.count("http", "infer", 200)
        return _infer_response(model_name, body.id, text, finish_reason, binary_out)

    @app.post("/v2/models/{model_name}/generate", summary="Triton's generate extension: one completion",
              openapi_extra=_body(schemas.GenerateRequest), response_model=schemas.GenerateResponse,
              responses=GENERATE_ERRORS)
    async def generate(model_name: str, request: Request, client: str = Depends(client_id)):
        treq = _generate_request(await request.body())
        if treq.stream:
            raise APIError(400, "stream=true needs POST /v2/models/{name}/generate_stream", param="stream")
        gen = await core.start(state, client, treq, model_name)
        result = await until_disconnect(core.complete(state, gen), request.receive)
        if result is None:
            state.metrics.rejected("disconnect")
            return Response(status_code=499)
        metrics.count("http", "generate", 200)
        return _generate_event(model_name, *result)

    @app.post("/v2/models/{model_name}/generate_stream",
              summary="Triton's generate extension, streamed: server-sent events, one per piece of text",
              openapi_extra=_body(schemas.GenerateRequest),
              responses=ok("text/event-stream", description="data: {model_name, model_version, text_output} "
                                                            "events; an error after the start is a data: "
                                                            "{error} event") | GENERATE_ERRORS)
    async def generate_stream(model_name: str, request: Request, client: str = Depends(client_id)):
        treq = _generate_request(await request.body())
        gen = await core.start(state, client, treq, model_name)
        metrics.count("http", "generate_stream", 200)
        return SSEResponse(_events(state, gen, model_name, treq.stream))


async def _read_infer_body(request: Request) -> tuple[schemas.InferRequest, bytes]:
    raw = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise APIError(400, f"Inference-Header-Content-Length must be an integer in 0..{len(raw)} (the body's "
                                f"size), got {header_length!r}")
        raw, binary = raw[:int(header_length)], raw[int(header_length):]
    return _validate(schemas.InferRequest, raw), binary


def _validate(model, raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({err.get('msg')})") from None
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(400, f"invalid request: {loc + ': ' if loc else ''}{err.get('msg')}") from None


def _tensors(body: schemas.InferRequest, binary: bytes) -> list[Tensor]:
    out, offset = [], 0
    for t in body.inputs:
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary) - offset:
                raise APIError(400, f"input '{t.name}': binary_data_size {size!r} does not fit the "
                                    f"{len(binary) - offset} binary bytes left in the body")
            values = decode_raw(t.name, t.datatype, binary[offset:offset + size])
            offset += size
        elif t.data is not None:
            values = _flatten(t.data)
        else:
            raise APIError(400, f"input '{t.name}' has neither data nor parameters.binary_data_size")
        out.append(Tensor(t.name, t.datatype, t.shape, values))
    if offset != len(binary):
        raise APIError(400, f"the body has {len(binary) - offset} binary bytes no input's binary_data_size accounts "
                            f"for")
    return out


def _flatten(data: list) -> list:
    out = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _binary_outputs(body: schemas.InferRequest) -> bool:
    """Whether text_output goes back as binary data (tritonclient.http's default)."""
    for o in body.outputs or []:
        if o.name not in OUTPUTS:
            raise APIError(400, f"unknown output '{o.name}'; this model returns " + ", ".join(OUTPUTS))
    if body.outputs:
        return any((o.parameters or {}).get("binary_data") is True for o in body.outputs)
    return (body.parameters or {}).get("binary_data_output") is True


def _infer_response(model_name: str, request_id: str | None, text: str, finish_reason: str, binary: bool):
    head = {"model_name": model_name, "model_version": core.VERSION, "parameters": {"finish_reason": finish_reason}}
    if request_id:
        head["id"] = request_id
    output = {"name": "text_output", "datatype": "BYTES", "shape": [1]}
    if not binary:
        return JSONResponse({**head, "outputs": [{**output, "data": [text]}]})
    raw = encode_bytes([text])
    header = json.dumps({**head, "outputs": [{**output, "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return Response(header + raw, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _generate_request(raw: bytes):
    body = _validate(schemas.GenerateRequest, raw)
    params = body.parameters or {}
    stream = body.stream if body.stream is not None else params.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"parameters.stream must be true or false, got {stream!r}", param="stream")
    tensors = [Tensor("text_input", "BYTES", [1], [body.text_input]), Tensor("stream", "BOOL", [1], [stream])]
    if body.sampling_parameters is not None:
        tensors.append(Tensor("sampling_parameters", "BYTES", [1], [body.sampling_parameters]))
    if body.exclude_input_in_output is not None:
        tensors.append(Tensor("exclude_input_in_output", "BOOL", [1], [body.exclude_input_in_output]))
    return text_request(tensors, params)


def _generate_event(model_name: str, text: str, finish_reason: str | None) -> dict:
    return {"model_name": model_name, "model_version": core.VERSION, "text_output": text,
            "finish_reason": finish_reason}


async def _events(state, gen, model_name: str, stream: bool):
    try:
        if stream:
            async for text, finish_reason in core.pieces(state, gen):
                yield sse(_generate_event(model_name, text, finish_reason))
        else:
            yield sse(_generate_event(model_name, *await core.complete(state, gen)))
    except APIError as e:
        yield sse({"error": e.message})
    except Exception as e:  # noqa: BLE001 - the headers are sent; tell the client in-band
        yield sse({"error": f"generation failed: {e}"})
