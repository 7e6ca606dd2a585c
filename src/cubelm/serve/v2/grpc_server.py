"""KServe V2 over gRPC: ``inference.GRPCInferenceService`` on ``cubelm serve --grpc-port P``.

A ``grpc.aio`` server started by the app's lifespan on uvicorn's event loop, so it shares the engine, the async
engine loop, the API keys, the rate limiter and the admission path with the HTTP routes; it stops after the HTTP
drain. Handlers come from the compiled service (``cubelm.serve.v2.proto``): one method of ``V2Servicer`` per RPC.

API keys travel as metadata (``authorization: Bearer KEY`` or ``x-api-key: KEY``); ServerLive, ServerReady and
ServerMetadata need none (probes). Errors are status codes: INVALID_ARGUMENT (bad tensors or parameters),
NOT_FOUND (unknown model), UNAUTHENTICATED, RESOURCE_EXHAUSTED (rate limit), UNAVAILABLE (loading, draining, at
capacity), DEADLINE_EXCEEDED (--request-timeout). ModelStreamInfer runs the requests of one stream concurrently;
a request with ``stream`` true is answered by one response per piece of text, the last marked with the parameter
``triton_final_response`` (or followed by an empty final response when the request sets
``triton_enable_empty_final_response``, as Triton does); an error ends that request with ``error_message``.

NOTE: §6.3.3 promises "orders of magnitude" lower latency from gRPC because protobuf "compresses" payloads. It is
a compact encoding, not compression, and an LLM request is a few KB of text: ``benchmarks/v2_transport.py``
measures gRPC 5-10% faster than REST on a one-token completion and the same bytes for a 2000-character prompt
(docs/benchmarks.md). gRPC is here for its streaming RPC, typed contract and clients, not for speed on text.
"""

from __future__ import annotations

import asyncio
import functools
import inspect

import grpc

from cubelm.serve.auth import key_id
from cubelm.serve.errors import APIError
from cubelm.serve.v2 import core
from cubelm.serve.v2.proto import SERVICE, protocol
from cubelm.serve.v2.tensors import OUTPUTS, Tensor, decode_raw, encode_bytes, text_request

# the InferTensorContents field that holds each datatype's elements
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}
OPEN_RPCS = {"ServerLive", "ServerReady", "ServerMetadata"}  # answer without an API key, like /health and /ready


async def start_grpc_server(state, host: str, port: int):
    proto = protocol()
    servicer = V2Servicer(state, proto)
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    handlers = {m.name: kinds[m.client_streaming, m.server_streaming](
        getattr(servicer, m.name), request_deserializer=m.request.FromString,
        response_serializer=m.response.SerializeToString) for m in proto.methods.values()}
    limit = state.options.max_request_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", max(limit, 64 * 2**20))])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    await server.start()
    return server


def _rpc(fn):
    """Authenticate (unless the RPC is open), count, and turn an ``APIError`` into the matching status code."""
    name = fn.__name__

    async def fail(self, context, e: Exception):
        if isinstance(e, APIError):
            status, message = e.status, e.message
            self.state.metrics.rejected({400: "invalid", 401: "auth", 404: "invalid", 429: "rate_limit",
                                         504: "timeout"}.get(status) or e.code or str(status))
        else:
            status, message = 500, f"internal server error ({type(e).__name__}: {e}); this is a bug, please report it"
        code = core.GRPC_CODES.get(status, "UNKNOWN")
        self.metrics.count("grpc", name, code)
        await context.abort(getattr(grpc.StatusCode, code), message)

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                client = None if name in OPEN_RPCS else self.client(context)
                async for item in fn(self, request, context, client):
                    yield item
            except Exception as e:  # noqa: BLE001 - (CancelledError is not an Exception: it propagates)
                await fail(self, context, e)
                return
            self.metrics.count("grpc", name, "OK")
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            client = None if name in OPEN_RPCS else self.client(context)
            response = await fn(self, request, context, client)
        except Exception as e:  # noqa: BLE001 - every error becomes a status code, never a crash
            await fail(self, context, e)
            return None
        self.metrics.count("grpc", name, "OK")
        return response
    return unary


class V2Servicer:
    def __init__(self, state, proto):
        self.state, self.proto = state, proto
        self.metrics = core.v2_metrics(state)

    def client(self, context) -> str:
        """The rate-limit identity of an authenticated call: its key, or its peer's address without keys."""
        key = self.state.keys.check({k.lower(): v for k, v in context.invocation_metadata()
                                     if isinstance(v, str)})
        if key:
            return key_id(key)
        peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:54321", "ipv6:[::1]:54321"
        return "ip:" + peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]")

    # ---- health and metadata --------------------------------------------------------------------------------
    @_rpc
    async def ServerLive(self, request, context, client):
        return self.proto.ServerLiveResponse(live=self.state.engine_error is None)

    @_rpc
    async def ServerReady(self, request, context, client):
        s = self.state
        return self.proto.ServerReadyResponse(ready=s.engine_error is None and not s.draining and s.llm is not None)

    @_rpc
    async def ServerMetadata(self, request, context, client):
        return self.proto.ServerMetadataResponse(**core.server_metadata())

    @_rpc
    async def ModelReady(self, request, context, client):
        try:
            core.resolve(self.state, request.name, request.version)
        except APIError as e:
            if e.status == 503:  # loading or draining: not ready, which is an answer, not an error
                return self.proto.ModelReadyResponse(ready=False)
            raise
        return self.proto.ModelReadyResponse(ready=True)

    @_rpc
    async def ModelMetadata(self, request, context, client):
        meta = core.model_metadata(self.state, request.name, request.version)
        tensor = self.proto.ModelMetadataResponse.TensorMetadata
        return self.proto.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    # ---- inference ------------------------------------------------------------------------------------------
    @_rpc
    async def ModelInfer(self, request, context, client):
        treq = text_request(_tensors(request), _parameters(request.parameters))
        if treq.stream:
            raise APIError(400, "stream=true needs the streaming RPC ModelStreamInfer", param="stream")
        _check_outputs(request)
        gen = await core.start(self.state, client, treq, request.model_name, request.model_version)
        text, finish_reason = await core.complete(self.state, gen)
        return self._response(request, text, finish_reason)

    @_rpc
    async def ModelStreamInfer(self, request_iterator, context, client):
        out: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        stream_response = self.proto.ModelStreamInferResponse

        async def run_one(request) -> None:
            try:
                async for response in self._stream_one(request, client):
                    out.put_nowait(stream_response(infer_response=response))
            except APIError as e:
                self.metrics.count("grpc", "ModelStreamInfer.request", core.GRPC_CODES.get(e.status, "UNKNOWN"))
                out.put_nowait(stream_response(error_message=e.message))
            except Exception as e:  # noqa: BLE001 - this request fails in-band; the stream and the others go on
                out.put_nowait(stream_response(error_message=f"generation failed ({type(e).__name__}: {e})"))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    tasks.append(asyncio.ensure_future(run_one(request)))
                await asyncio.gather(*tasks)
            finally:
                out.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await out.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for t in tasks:  # NOTE: the client went away: cancelling aborts the engine requests, freeing blocks
                t.cancel()

    async def _stream_one(self, request, client):
        params = _parameters(request.parameters)
        treq = text_request(_tensors(request), params)
        _check_outputs(request)
        empty_final = params.get("triton_enable_empty_final_response") is True
        gen = await core.start(self.state, client, treq, request.model_name, request.model_version)
        if treq.stream:
            async for text, finish_reason in core.pieces(self.state, gen):
                yield self._response(request, text, finish_reason, final=finish_reason is not None and not empty_final)
        else:
            text, finish_reason = await core.complete(self.state, gen)
            yield self._response(request, text, finish_reason, final=not empty_final)
        if empty_final:
            yield self.proto.ModelInferResponse(model_name=request.model_name, model_version=core.VERSION,
                                                id=request.id, parameters={"triton_final_response": _param(True)})

    def _response(self, request, text: str, finish_reason: str | None, final: bool | None = None):
        """text_output as raw bytes when the request sent raw bytes (tritonclient does), else as bytes_contents."""
        p = self.proto
        params = {"finish_reason": _param(finish_reason or "")}
        if final is not None:
            params["triton_final_response"] = _param(final)
        output = p.ModelInferResponse.InferOutputTensor(name="text_output", datatype="BYTES", shape=[1])
        response = p.ModelInferResponse(model_name=request.model_name, model_version=core.VERSION, id=request.id,
                                        parameters=params)
        if request.raw_input_contents:
            response.raw_output_contents.append(encode_bytes([text]))
        else:
            output.contents.bytes_contents.append(text.encode("utf-8"))
        response.outputs.append(output)
        return response


def _tensors(request) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise APIError(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one "
                            f"per input, in order")
    out = []
    for i, t in enumerate(request.inputs):
        if raw:
            values = decode_raw(t.name, t.datatype, raw[i])
        else:
            field = CONTENTS_FIELD.get(t.datatype)
            values = list(getattr(t.contents, field)) if field else [None]
        out.append(Tensor(t.name, t.datatype, list(t.shape), values))
    return out


def _check_outputs(request) -> None:
    for o in request.outputs:
        if o.name not in OUTPUTS:
            raise APIError(400, f"unknown output '{o.name}'; this model returns " + ", ".join(OUTPUTS))


def _parameters(params) -> dict:
    out = {}
    for k, v in params.items():
        choice = v.WhichOneof("parameter_choice")
        out[k] = getattr(v, choice) if choice else None
    return out


def _param(value):
    p = protocol().InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value
    return p
