"""KServe V2 / Open Inference Protocol of a live ``cubelm serve --grpc-port``: the official ``tritonclient`` (HTTP
and gRPC) and grpcio with cubelm's compiled protocol, against the OpenAI route's text as the reference."""

from __future__ import annotations

import json
import queue
import signal
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import API_KEY, ServeProcess, free_port

grpc = pytest.importorskip("grpc", reason="the grpc extra is not installed: pip install -e '.[grpc]'")
tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (test extra)")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

from cubelm.serve.v2.proto import Stub, compile_descriptor_set, protocol  # noqa: E402

# ignore_eos: a random model may sample EOS at any step; these tests want exact lengths
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
PROMPTS = ["def add(", "héllo wörld"]


def auth() -> dict:
    # a fresh dict per call: tritonclient.http adds its own (int-valued) headers to the dict it is given
    return {"authorization": f"Bearer {API_KEY}"}


class V2Server(ServeProcess):
    def __init__(self, model_dir, *args):
        self.grpc_port = free_port()
        super().__init__(model_dir, "--api-key", API_KEY, "--grpc-port", str(self.grpc_port), *args)
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.hostport = self.base.removeprefix("http://")


@pytest.fixture(scope="module")
def server(model_dir):
    p = V2Server(model_dir).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return Stub(channel)


def openai_text(server, prompt: str, params: dict = GREEDY) -> str:
    r = httpx.post(f"{server.base}/v1/completions", headers=auth(), timeout=60,
                   json={"model": "m", "prompt": prompt, **params})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def triton_inputs(module, prompt: str, params: dict | str | None = GREEDY, stream: bool | None = None,
                  binary_data: bool = True) -> list:
    def tensor(name, dtype, value):
        t = module.InferInput(name, [1], dtype)
        kw = {"binary_data": binary_data} if module is tritonclient_http else {}
        t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool), **kw)
        return t
    inputs = [tensor("text_input", "BYTES", prompt.encode())]
    if params is not None:
        inputs.append(tensor("sampling_parameters", "BYTES", (params if isinstance(params, str)
                                                             else json.dumps(params)).encode()))
    if stream is not None:
        inputs.append(tensor("stream", "BOOL", stream))
    return inputs


# ---- the protocol ---------------------------------------------------------------------------------------------
def test_proto_matches_tritonclients_wire_contract():
    """Every message, field number, type and RPC of cubelm's .proto is the one tritonclient was compiled from."""
    from tritonclient.grpc import service_pb2
    ours = protocol()
    theirs = service_pb2.DESCRIPTOR
    service = ours.pool.FindServiceByName("inference.GRPCInferenceService")
    ref_service = theirs.services_by_name["GRPCInferenceService"]
    checked = 0
    for m in service.methods:
        ref = ref_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming) == (
            ref.input_type.full_name, ref.output_type.full_name, ref.client_streaming, ref.server_streaming)
    todo = [d for d in service.file.message_types_by_name.values()]
    while todo:
        d = todo.pop()
        ref = theirs.pool.FindMessageTypeByName(d.full_name)
        for f in d.fields:
            r = ref.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated, f.containing_oneof and f.containing_oneof.name) == (
                r.number, r.type, r.is_repeated, r.containing_oneof and r.containing_oneof.name), d.full_name
            if f.message_type is not None:
                assert f.message_type.full_name == r.message_type.full_name
            checked += 1
        todo.extend(d.nested_types)
    assert {m.name for m in service.methods} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer", "ModelStreamInfer"}
    assert checked > 40


def test_proto_is_compiled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBELM_PROTO_CACHE", str(tmp_path))
    first = compile_descriptor_set()
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("grpc_service-") and cached.suffix == ".pb"
    mtime = cached.stat().st_mtime_ns
    assert compile_descriptor_set() == first and cached.stat().st_mtime_ns == mtime  # read back, not recompiled
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temporary file left behind


# ---- tritonclient ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_data", [True, False], ids=["binary", "json"])
def test_tritonclient_http_completion_equals_openai(server, binary_data):
    client = tritonclient_http.InferenceServerClient(server.hostport)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m", headers=auth())
    meta = client.get_model_metadata("m", headers=auth())
    assert meta["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    assert meta["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]
    outputs = [tritonclient_http.InferRequestedOutput("text_output", binary_data=binary_data)]
    for prompt in PROMPTS:
        r = client.infer("m", triton_inputs(tritonclient_http, prompt, binary_data=binary_data), outputs=outputs,
                         headers=auth(), request_id="req-7")
        text = r.as_numpy("text_output")[0]
        assert (text.decode() if isinstance(text, bytes) else text) == openai_text(server, prompt)
        assert r.get_response()["id"] == "req-7"


def test_tritonclient_grpc_completion_equals_openai(server):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m", headers=auth())
    assert client.get_server_metadata().name == "cubelm"
    assert [t.name for t in client.get_model_metadata("m", headers=auth()).inputs][0] == "text_input"
    for prompt in PROMPTS:
        r = client.infer("m", triton_inputs(tritonclient_grpc, prompt), headers=auth())
        assert r.as_numpy("text_output")[0].decode() == openai_text(server, prompt)


@pytest.mark.parametrize("empty_final", [False, True])
def test_tritonclient_grpc_stream_yields_the_same_text_in_pieces(server, empty_final):
    params = {**GREEDY, "max_tokens": 12}
    client = tritonclient_grpc.InferenceServerClient(server.grpc_target)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        client.async_stream_infer("m", triton_inputs(tritonclient_grpc, PROMPTS[0], params, stream=True),
                                  request_id="s1", enable_empty_final_response=empty_final)
        pieces = []
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s1"
            out = result.as_numpy("text_output")
            if out is not None:
                pieces.append(out[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                assert (out is None) == empty_final
                break
    finally:
        client.stop_stream()
    assert len(pieces) > 1 and "".join(pieces) == openai_text(server, PROMPTS[0], params)


# ---- grpcio with cubelm's compiled protocol -------------------------------------------------------------------
def infer_request(prompt: str, params: dict | None = GREEDY, model: str = "m", **extra):
    p = protocol()
    tensor = p.ModelInferRequest.InferInputTensor
    inputs = [tensor(name="text_input", datatype="BYTES", shape=[1],
                     contents=p.InferTensorContents(bytes_contents=[prompt.encode()]))]
    if params is not None:
        inputs.append(tensor(name="sampling_parameters", datatype="BYTES", shape=[1],
                             contents=p.InferTensorContents(bytes_contents=[json.dumps(params).encode()])))
    for name, value in extra.items():
        inputs.append(tensor(name=name, datatype="BOOL", shape=[1], contents=p.InferTensorContents(
            bool_contents=[value])))
    return p.ModelInferRequest(model_name=model, inputs=inputs)


def test_grpcio_health_metadata_and_infer(server, stub):
    p, md = protocol(), tuple(auth().items())
    assert stub.ServerLive(p.ServerLiveRequest()).live  # health needs no key (probes)
    assert stub.ServerReady(p.ServerReadyRequest()).ready
    assert "model_stream_infer" in stub.ServerMetadata(p.ServerMetadataRequest()).extensions
    assert stub.ModelReady(p.ModelReadyRequest(name="m"), metadata=md).ready
    meta = stub.ModelMetadata(p.ModelMetadataRequest(name="m"), metadata=md)
    assert (meta.name, list(meta.versions)) == ("m", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text_input", "BYTES", [1]), ("stream", "BOOL", [1]), ("sampling_parameters", "BYTES", [1]),
        ("exclude_input_in_output", "BOOL", [1])]
    r = stub.ModelInfer(infer_request(PROMPTS[1]), metadata=md)
    (out,) = r.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("text_output", "BYTES", [1])
    text = openai_text(server, PROMPTS[1])
    assert out.contents.bytes_contents[0].decode() == text  # typed contents in, typed contents out
    assert r.parameters["finish_reason"].string_param == "length"
    echoed = stub.ModelInfer(infer_request(PROMPTS[1], exclude_input_in_output=False), metadata=md)
    assert echoed.outputs[0].contents.bytes_contents[0].decode() == PROMPTS[1] + text


def test_grpcio_stream_runs_requests_concurrently(server, stub):
    """Two streaming requests on one ModelStreamInfer stream, plus a non-streaming one: each gets its own text."""
    md = tuple(auth().items())
    reqs = [infer_request(PROMPTS[0], stream=True), infer_request(PROMPTS[1], stream=True),
            infer_request(PROMPTS[1], {**GREEDY, "max_tokens": 3})]
    for i, r in enumerate(reqs):
        r.id = f"r{i}"
    texts: dict[str, str] = {}
    finals = set()
    for msg in stub.ModelStreamInfer(iter(reqs), metadata=md, timeout=60):
        assert not msg.error_message, msg.error_message
        r = msg.infer_response
        texts[r.id] = texts.get(r.id, "") + r.outputs[0].contents.bytes_contents[0].decode()
        if r.parameters["triton_final_response"].bool_param:
            finals.add(r.id)
    assert finals == {"r0", "r1", "r2"}
    assert texts == {"r0": openai_text(server, PROMPTS[0]), "r1": openai_text(server, PROMPTS[1]),
                     "r2": openai_text(server, PROMPTS[1], {**GREEDY, "max_tokens": 3})}


def test_grpcio_stream_error_is_in_band(stub):
    """A bad request on a stream gets error_message; the stream and its other requests go on."""
    bad = infer_request("x", model="nope")
    msgs = list(stub.ModelStreamInfer(iter([bad, infer_request("x", {**GREEDY, "max_tokens": 2})]),
                                      metadata=tuple(auth().items()), timeout=60))
    errors = [m.error_message for m in msgs if m.error_message]
    assert len(errors) == 1 and "does not exist" in errors[0]
    assert any(m.infer_response.outputs for m in msgs)


# ---- bad input ------------------------------------------------------------------------------------------------
def rest_infer(server, inputs: list, headers: dict | None = None, model: str = "m") -> httpx.Response:
    return httpx.post(f"{server.base}/v2/models/{model}/infer", json={"inputs": inputs},
                      headers=auth() if headers is None else headers, timeout=60)


TEXT = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}
BAD_INPUTS = {
    "int32 text_input": ([{**TEXT, "datatype": "INT32", "data": [1]}], "must have datatype BYTES"),
    "shape [2]": ([{**TEXT, "shape": [2], "data": ["a", "b"]}], "must have shape [1]"),
    "shape [1,1]": ([{**TEXT, "shape": [1, 1]}], "must have shape [1]"),
    "elements != shape": ([{**TEXT, "data": ["a", "b"]}], "2 elements"),
    "unknown input": ([TEXT, {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                      "unknown input 'prompt'"),
    "no text_input": ([{"name": "stream", "datatype": "BOOL", "shape": [1], "data": [False]}], "missing input"),
    "bad json": ([TEXT, {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ["{max_tokens"]}],
                 "not valid JSON"),
    "json not object": ([TEXT, {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": ["[8]"]}],
                        "must be a JSON object"),
    "unknown sampling key": ([TEXT, {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
                                     "data": ['{"max_token": 8}']}], "unknown key(s) 'max_token'"),
    "bad sampling value": ([TEXT, {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
                                   "data": ['{"temperature": -1}']}], "temperature"),
    "context overflow": ([TEXT, {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1],
                                 "data": ['{"max_tokens": 100000}']}], "maximum context length"),
    "stream on infer": ([TEXT, {"name": "stream", "datatype": "BOOL", "shape": [1], "data": [True]}],
                        "ModelStreamInfer"),
    "bool not bool": ([TEXT, {"name": "stream", "datatype": "BOOL", "shape": [1], "data": ["yes"]}],
                      "true or false"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_rest_bad_input_is_400_in_v2_shape(server, case):
    inputs, message = BAD_INPUTS[case]
    r = rest_infer(server, inputs)
    assert r.status_code == 400 and set(r.json()) == {"error"} and message in r.json()["error"], r.text


def test_rest_status_codes(server):
    assert rest_infer(server, [TEXT], model="nope").status_code == 404
    r = rest_infer(server, [TEXT], headers={})
    assert r.status_code == 401 and set(r.json()) == {"error"}
    assert rest_infer(server, [TEXT], headers={"authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(f"{server.base}/v2/models/m/infer", content=b"{not json", headers=auth())
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = httpx.post(f"{server.base}/v2/models/m/infer", json={"inputs": [TEXT]}, timeout=60,
                   headers={**auth(), "Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    assert httpx.get(f"{server.base}/v2/models/nope", headers=auth()).status_code == 404
    assert httpx.get(f"{server.base}/v2/models/m/ready", headers=auth()).json() == {"name": "m", "ready": True}
    assert httpx.get(f"{server.base}/v2/health/live").json() == {"live": True}  # probes need no key


@pytest.mark.parametrize("case", ["int32 text_input", "shape [2]", "bad json", "unknown sampling key",
                                  "stream on infer"])
def test_grpc_bad_input_is_invalid_argument(stub, case):
    p = protocol()
    inputs, message = BAD_INPUTS[case]
    tensors = []
    for t in inputs:  # the same tensors, as gRPC typed contents
        field = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "INT32": "int_contents"}[t["datatype"]]
        values = [v.encode() if isinstance(v, str) else v for v in t["data"]]
        tensors.append(p.ModelInferRequest.InferInputTensor(
            name=t["name"], datatype=t["datatype"], shape=t["shape"],
            contents=p.InferTensorContents(**{field: values})))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(p.ModelInferRequest(model_name="m", inputs=tensors), metadata=tuple(auth().items()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_grpc_status_codes(server, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(infer_request("x", model="nope"), metadata=tuple(auth().items()))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    for md in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(infer_request("x"), metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ModelStreamInfer(iter([infer_request("x")]), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # tritonclient raises the status as InferenceServerException
    client = tritonclient_grpc.InferenceServerClient(server.grpc_target)
    with pytest.raises(InferenceServerException) as e:
        client.infer("m", [tritonclient_grpc.InferInput("text_input", [1], "INT32").set_data_from_numpy(
            np.array([1], dtype=np.int32))], headers=auth())
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


# ---- the generate extension (REST streaming) ------------------------------------------------------------------
def test_rest_generate_and_generate_stream(server):
    params = {**GREEDY, "max_tokens": 10}
    r = httpx.post(f"{server.base}/v2/models/m/generate", headers=auth(), timeout=60,
                   json={"text_input": PROMPTS[0], "parameters": params})
    assert r.status_code == 200, r.text
    text = openai_text(server, PROMPTS[0], params)
    assert r.json() == {"model_name": "m", "model_version": "1", "text_output": text, "finish_reason": "length"}
    events = []
    with httpx.stream("POST", f"{server.base}/v2/models/m/generate_stream", headers=auth(), timeout=60,
                      json={"text_input": PROMPTS[0], "sampling_parameters": json.dumps(params),
                            "parameters": {"stream": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == text
    assert [e["finish_reason"] for e in events][-1] == "length"
    r = httpx.post(f"{server.base}/v2/models/m/generate", headers=auth(), json={"text_input": "x", "stream": True})
    assert r.status_code == 400 and "generate_stream" in r.json()["error"]


def test_metrics_count_v2_requests_by_protocol(server, stub):
    stub.ServerLive(protocol().ServerLiveRequest())
    httpx.get(f"{server.base}/v2/health/live")
    assert rest_infer(server, [TEXT], model="unknown-name").status_code == 404
    seen = set()
    for fam in text_string_to_metric_families(httpx.get(f"{server.base}/metrics").text):
        if fam.name == "cubelm:v2_requests":
            seen |= {(s.labels["protocol"], s.labels["endpoint"], s.labels["code"]) for s in fam.samples
                     if s.value > 0}
    assert {("grpc", "ServerLive", "OK"), ("http", "live", "200"), ("http", "infer", "404")} <= seen
    assert not any("unknown-name" in label for labels in seen for label in labels)  # model names are no labels


def test_rate_limit_is_shared_with_openai_routes(model_dir):
    """One client, one budget, whatever the protocol: 3 requests per minute, then 429 / RESOURCE_EXHAUSTED."""
    p = V2Server(model_dir, "--rate-limit-rpm", "3").start()
    try:
        assert openai_text(p, "a", {**GREEDY, "max_tokens": 1})
        assert rest_infer(p, [TEXT]).status_code == 200
        with grpc.insecure_channel(p.grpc_target) as ch:
            Stub(ch).ModelInfer(infer_request("a"), metadata=tuple(auth().items()))
            r = rest_infer(p, [TEXT])
            assert r.status_code == 429 and set(r.json()) == {"error"}
            with pytest.raises(grpc.RpcError) as e:
                Stub(ch).ModelInfer(infer_request("a"), metadata=tuple(auth().items()))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        p.stop()


# ---- lifecycle ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_grpc_cancel_aborts_and_frees_blocks(inprocess_server, stream):
    from tests.serve.test_lifecycle import engine_idle, wait_for
    s = inprocess_server(grpc_port=free_port())
    bm = s.state.engine.block_manager
    long = infer_request("def add(", {"max_tokens": 600, "ignore_eos": True}, **({"stream": True} if stream else {}))
    with grpc.insecure_channel(f"127.0.0.1:{s.state.options.grpc_port}") as ch:
        if stream:
            call = Stub(ch).ModelStreamInfer(iter([long]))
            assert next(call).infer_response.outputs  # generation is under way
            assert bm.num_free_blocks < bm.num_blocks
            call.cancel()
        else:
            with pytest.raises(grpc.RpcError) as e:
                Stub(ch).ModelInfer(long, timeout=0.5)  # the client's deadline cancels the call on the server
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: engine_idle(s.state)), f"{bm.num_blocks - bm.num_free_blocks} blocks still held"
    bm.check_whole()
    gen = s.state.engine.num_generated_tokens
    assert gen < 600
    time.sleep(0.3)
    assert s.state.engine.num_generated_tokens == gen  # nothing keeps generating for a client that is gone


def test_sigterm_drains_grpc_stream_then_exits_zero(model_dir):
    p = V2Server(model_dir, "--shutdown-timeout", "60").start()
    try:
        pr, md = protocol(), tuple(auth().items())
        with grpc.insecure_channel(p.grpc_target) as ch:
            stub = Stub(ch)
            responses = stub.ModelStreamInfer(iter([infer_request("def add(", {"max_tokens": 150, "ignore_eos": True},
                                                                  stream=True)]), metadata=md, timeout=60)
            pieces = [next(responses)]
            p.proc.send_signal(signal.SIGTERM)
            from tests.serve.test_lifecycle import wait_for
            assert wait_for(lambda: not stub.ServerReady(pr.ServerReadyRequest()).ready, 5)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(infer_request("x"), metadata=md)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
            pieces += list(responses)  # the stream in flight runs to its end
        assert not any(m.error_message for m in pieces)
        assert pieces[-1].infer_response.parameters["triton_final_response"].bool_param
        assert pieces[-1].infer_response.parameters["finish_reason"].string_param == "length"
        assert p.proc.wait(30) == 0
    finally:
        p.stop()
