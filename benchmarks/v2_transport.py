"""What the transport costs (§6.3.3): one ``cubelm serve`` answering the same completion over OpenAI REST, KServe V2
REST (JSON and Triton's binary extension) and V2 gRPC, in the same run, interleaved rounds (A B C D, A B C D, ...).

§6.3.3 credits gRPC/protobuf with "orders of magnitude" lower latency because the payload is "compressed". Protobuf
is a compact encoding, not compression, and a text-generation request carries a prompt of a few KB, so the
question is how much of a request's time the transport is at all. Each transport sends the same prompt with
``max_tokens=1`` (one prefill and one sampled token: the engine's share is as small as it gets), one request at a
time over a kept-alive connection; the table gives median latency per transport, the ratio to OpenAI REST, and the
request's size on the wire. Two prompt sizes: a short one and one of ~``--long-chars`` characters.

    python benchmarks/v2_transport.py                      # the default model, else a tiny random model
    python benchmarks/v2_transport.py --rounds 7 --requests 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from cubelm.serve.v2.proto import Stub, protocol
from cubelm.systems.host import describe_host, host_info

PARAMS = {"max_tokens": 1, "temperature": 0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(workdir: Path, given: str | None) -> tuple[Path, str]:
    from cubelm.store import is_complete_model_dir, model_path
    if given:
        return Path(given), given
    if is_complete_model_dir(model_path()):
        return model_path(), "the default model"
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    lines = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def __init__(self):", "import os\n"] * 50
    train_tokenizer(lines, TokenizerConfig(vocab_size=320)).save(workdir / "tok")
    subprocess.run([sys.executable, "-m", "cubelm", "model", "init", "--preset", "tiny", "--out", str(workdir / "m"),
                    "--tokenizer", str(workdir / "tok")], check=True, capture_output=True)
    return workdir / "m", "a randomly initialized tiny preset (320-token BPE trained here)"


def start_server(model: Path) -> tuple[subprocess.Popen, int, int]:
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cubelm", "serve", "--model", str(model), "--served-model-name", "m",
                             "--port", str(port), "--grpc-port", str(grpc_port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc, port, grpc_port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready")


class Transports:
    """One callable per transport, each sending ``prompt`` and returning (text, request bytes on the wire)."""

    def __init__(self, port: int, grpc_port: int):
        base = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=base, timeout=120)
        self.triton_http = thttp.InferenceServerClient(f"127.0.0.1:{port}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = Stub(self.channel)
        self.triton_grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        self.all = {"OpenAI REST /v1/completions": self.openai, "V2 REST infer (JSON)": self.v2_json,
                    "V2 REST infer (tritonclient, binary)": self.v2_binary,
                    "V2 gRPC ModelInfer (grpcio)": self.v2_grpc, "V2 gRPC ModelInfer (tritonclient)": self.v2_tgrpc}

    def openai(self, prompt: str):
        body = json.dumps({"model": "m", "prompt": prompt, **PARAMS}).encode()
        r = self.http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        return r.json()["choices"][0]["text"], len(body)

    def v2_json(self, prompt: str):
        body = json.dumps({"inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]},
            {"name": "sampling_parameters", "datatype": "BYTES", "shape": [1], "data": [json.dumps(PARAMS)]}]}).encode()
        r = self.http.post("/v2/models/m/infer", content=body, headers={"content-type": "application/json"})
        return r.json()["outputs"][0]["data"][0], len(body)

    def _triton_inputs(self, module, prompt: str) -> list:
        out = []
        for name, value in (("text_input", prompt), ("sampling_parameters", json.dumps(PARAMS))):
            t = module.InferInput(name, [1], "BYTES")
            t.set_data_from_numpy(np.array([value.encode()], dtype=object))
            out.append(t)
        return out

    def v2_binary(self, prompt: str):
        inputs = self._triton_inputs(thttp, prompt)
        body, json_size = thttp.InferenceServerClient.generate_request_body(inputs)
        r = self.triton_http.infer("m", inputs)
        return r.as_numpy("text_output")[0].decode(), len(body)

    def v2_grpc(self, prompt: str):
        p = protocol()
        tensor = p.ModelInferRequest.InferInputTensor
        req = p.ModelInferRequest(model_name="m", inputs=[
            tensor(name="text_input", datatype="BYTES", shape=[1],
                   contents=p.InferTensorContents(bytes_contents=[prompt.encode()])),
            tensor(name="sampling_parameters", datatype="BYTES", shape=[1],
                   contents=p.InferTensorContents(bytes_contents=[json.dumps(PARAMS).encode()]))])
        r = self.stub.ModelInfer(req)
        return r.outputs[0].contents.bytes_contents[0].decode(), req.ByteSize()

    def v2_tgrpc(self, prompt: str):
        r = self.triton_grpc.infer("m", self._triton_inputs(tgrpc, prompt))
        return r.as_numpy("text_output")[0].decode(), None

    def close(self) -> None:
        self.http.close()
        self.channel.close()
        self.triton_grpc.close()
        self.triton_http.close()


def measure(transports: Transports, prompt: str, rounds: int, requests: int) -> dict[str, dict]:
    times: dict[str, list[float]] = {name: [] for name in transports.all}
    sizes: dict[str, int | None] = {}
    texts = set()
    for _ in range(rounds):
        for name, send in transports.all.items():  # interleaved: every transport sees the same machine state
            for _ in range(requests):
                t0 = time.perf_counter()
                text, size = send(prompt)
                times[name].append(time.perf_counter() - t0)
                sizes[name] = size
                texts.add(text)
    assert len(texts) == 1, f"transports disagree on the greedy text: {texts}"
    return {name: {"median_ms": 1e3 * statistics.median(t), "p90_ms": 1e3 * float(np.percentile(t, 90)),
                   "request_bytes": sizes[name]} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory; default: the default model, else a tiny random one")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--requests", type=int, default=20, help="requests per transport per round")
    ap.add_argument("--long-chars", type=int, default=2000, help="characters of the long prompt")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = host_info()
    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_dir(Path(tmp), args.model)
        proc, port, grpc_port = start_server(model)
        transports = Transports(port, grpc_port)
        try:
            for name, send in transports.all.items():  # warm-up: connections, first compilations
                for _ in range(3):
                    send("warm up")
            short = "def add(a, b):"
            long = ("def add(a, b):\n    return a + b\n" * (args.long_chars // 32 + 1))[:args.long_chars]
            results = {f"{len(p)} chars": measure(transports, p, args.rounds, args.requests) for p in (short, long)}
        finally:
            transports.close()
            proc.terminate()
            proc.wait(30)
    print(f"host: {describe_host(info)}\nmodel: {what}; max_tokens=1, one request at a time, {args.rounds} "
          f"interleaved rounds x {args.requests} requests per transport\n")
    print("| prompt | transport | median ms | p90 ms | vs OpenAI REST | request bytes |\n|---|---|---|---|---|---|")
    for prompt, rows in results.items():
        ref = rows["OpenAI REST /v1/completions"]["median_ms"]
        for name, r in rows.items():
            size = "-" if r["request_bytes"] is None else f"{r['request_bytes']:,}"
            print(f"| {prompt} | {name} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['median_ms'] / ref:.2f}x "
                  f"| {size} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": info, "model": what, "results": results}, indent=1))


if __name__ == "__main__":
    main()
