"""``cubelm serve``: the OpenAI-compatible HTTP server over the paged engine.

    cubelm serve                                   # the default model on 127.0.0.1:8000
    cubelm serve --model DIR --host 0.0.0.0 --port 8000 --api-key sk-1 --rate-limit-rpm 60
    cubelm serve --model DIR --grpc-port 8001                # + KServe V2 over gRPC (REST /v2 is always on)
    cubelm serve --model DIR --lora-modules sql=adapters/sql --lora-modules chat=adapters/chat --max-loras 2
    cubelm serve --task embed --model all-minilm-l6-v2            # /v1/embeddings only (adaptive batching)
    cubelm serve --model DIR --embed-model all-minilm-l6-v2       # generation and /v1/embeddings
    cubelm serve --model DIR --feature-store qa_repo   # chat requests with `user` are personalized (§6.1.6)
    cubelm serve --model DIR --rag-index idx/          # POST /v1/rag/chat: answers with file:line citations
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from cubelm.cli import opt
from cubelm.errors import CubelmError
from cubelm.serve.ratelimit import STRATEGIES

# after the drain, uvicorn's own graceful shutdown (open connections closed) takes at most this long: a supervisor's
# kill deadline (Kubernetes' terminationGracePeriodSeconds) must exceed --shutdown-timeout + this
UVICORN_GRACEFUL_SHUTDOWN_S = 5


@dataclass(slots=True, kw_only=True)
class ServeOptions:
    model: str | None = opt(None, help="model directory (HF format), a name in the model store, or a URL (s3://, "
                                       "gs://, http(s)://, file://) pulled through the store first; default: the "
                                       "default model in the model store (--task embed: an encoder directory or "
                                       "all-minilm-l6-v2, the default)")
    task: str = opt("generate", choices=("generate", "embed"), help="generate: completions and chat (plus "
                    "/v1/embeddings with --embed-model); embed: only /v1/embeddings, with --model as the embedder")
    embed_model: str | None = opt(None, help="with --task generate: also serve /v1/embeddings with this embedding "
                                             "model (all-minilm-l6-v2, an HF encoder directory or a cubelm model)")
    embed_pooling: str | None = opt(None, choices=("cls", "mean", "max", "last"), help="embedding pooling; "
                                    "default: the model's 1_Pooling config, else mean (encoders) / last (decoders)")
    embed_max_batch: int = opt(32, help="adaptive batching: most inputs in one embedding forward")
    embed_max_delay_ms: float = opt(5.0, help="adaptive batching: longest wait for a batch to fill after its first "
                                              "input arrives (latency traded for throughput)")
    embed_max_batch_tokens: int = opt(16384, help="adaptive batching: most inputs x padded length in one forward "
                                                  "(bounds its memory)")
    served_model_name: str | None = opt(None, help="the model id clients send; default: the directory's name "
                                                   "(without @digest)")
    host: str = opt("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    port: int = opt(8000, help="TCP port")
    grpc_port: int | None = opt(None, help="also serve KServe V2 over gRPC (inference.GRPCInferenceService) on this "
                                           "TCP port, same process and engine; needs the grpc extra")
    api_key: list[str] = opt([], help="accepted API key (repeatable); also --api-key-file and $CUBELM_API_KEYS; "
                                      "none configured = open server")
    api_key_file: str | None = opt(None, help="file with one API key per line (# comments allowed)")
    metrics_require_key: bool = opt(False, help="put /metrics behind the API key too")
    rate_limit_strategy: str = opt("fixed-window", choices=STRATEGIES, help="rate-limit algorithm (§6.1.4)")
    rate_limit_rpm: int | None = opt(None, help="requests per minute per API key (per IP without a key)")
    rate_limit_tpm: int | None = opt(None, help="tokens per minute per key (prompt + n x max_tokens, charged "
                                                "up front)")
    rate_limit_burst_seconds: float = opt(60.0, help="token/leaky bucket capacity, in seconds of the rate")
    rate_limit_storage: str = opt("memory://", help="rate-limit storage: memory:// or redis://HOST:PORT (shared "
                                                    "by replicas)")
    max_batch_delay_ms: float = opt(0.0, help="when idle, wait this long for more arrivals before the first step "
                                              "(adaptive batching: latency for throughput)")
    max_pending_requests: int = opt(512, help="requests in the engine at once (running + waiting); beyond it 503")
    request_timeout: float = opt(600.0, help="wall-clock limit per request in seconds, then it is aborted; 0 = none")
    shutdown_timeout: float = opt(30.0, help="on SIGTERM, how long in-flight requests may run before exit")
    kv_cache_memory: str = opt("1GiB", help="KV-cache budget: bytes (2GiB) or a fraction of RAM (0.2)")
    num_blocks: int | None = opt(None, help="KV-cache blocks (overrides --kv-cache-memory)")
    kv_cache_dtype: str = opt("auto", choices=("auto", "int8"), help="KV-cache storage: auto (the model's dtype) or "
                                                                      "int8 (a scale per token and head: ~2x the "
                                                                      "tokens of bf16, ~3.8x of fp32 per byte)")
    max_num_seqs: int = opt(64, help="sequences in one batch at most")
    max_model_len: int | None = opt(None, help="context length to serve; default: the model's")
    max_n: int = opt(128, help="most completions one request may ask for per prompt (n); more is a 400")
    max_request_bytes: int = opt(16 * 2**20, help="largest request body accepted; larger is a 413")
    device: str = opt("cpu", help="torch device: cpu, cuda, cuda:1, ... (the CPU decode layout and native kernels "
                                  "are used on CPU only)")
    dtype: str = opt("auto", help="compute dtype: auto (bfloat16 on CUDA and on CPUs with avx512_bf16 or AMX, "
                                  "else float32), float32, bfloat16, float16")
    quantization: str | None = opt(None, choices=["int8", "int4"], help="weight-only quantization at load: int8 "
                                   "(per-row scales) or int4 (per-group scales); not needed for a `cubelm quantize` "
                                   "directory")
    quantization_group_size: int = opt(32, help="int4: inputs per scale (32, 64 or 128, dividing the hidden size)")
    lora_modules: list[str] = opt([], help="serve a LoRA adapter, NAME=PATH (repeatable; peft's format): requests "
                                           "whose model is NAME run on it; checked before the server starts",
                                  metavar="NAME=PATH")
    enable_runtime_lora: bool = opt(False, help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter, behind the "
                                               "API key (they load any adapter directory the server can read)")
    max_loras: int = opt(1, help="adapters whose requests run at once (slots); requests of another adapter wait")
    max_lora_rank: int = opt(16, help="largest LoRA rank served (memory per slot grows with it); a higher rank is "
                                      "refused")
    max_cpu_loras: int | None = opt(None, help="adapters kept in memory, least recently used evicted and re-read "
                                               "when needed; default --max-loras")
    feature_store: str | None = opt(None, help="feature repo (`cubelm features demo`; needs the feature-store "
                                               "extra): a chat request with OpenAI's `user` field gets that user's "
                                               "online features as a system preamble", metavar="REPO_DIR")
    rag_index: str | None = opt(None, help="serve POST /v1/rag/chat over this vector index (`cubelm rag ingest`; "
                                           "a directory or http://HOST:PORT/COLLECTION): retrieval-augmented chat "
                                           "with citations", metavar="PATH")
    rag_embed_model: str | None = opt(None, help="the embedder for --rag-index queries; default: the one the index "
                                                 "records (it must be the one it was built with)")
    log_level: str = opt("info", choices=("critical", "error", "warning", "info", "debug"), help="uvicorn log level")
    access_log: bool = opt(False, help="log every HTTP request")

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise CubelmError(f"--port must be in 1..65535, got {self.port}")
        if self.grpc_port is not None and not (1 <= self.grpc_port <= 65535 and self.grpc_port != self.port):
            raise CubelmError(f"--grpc-port must be in 1..65535 and differ from --port, got {self.grpc_port}")
        if self.max_pending_requests < 1:
            raise CubelmError(f"--max-pending-requests must be >= 1, got {self.max_pending_requests}")
        from cubelm.engine.params import MAX_N
        if not 1 <= self.max_n <= MAX_N:
            raise CubelmError(f"--max-n must be in 1..{MAX_N}, got {self.max_n}")
        if self.max_request_bytes < 1024:
            raise CubelmError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_batch_delay_ms < 0 or self.request_timeout < 0 or self.shutdown_timeout < 0:
            raise CubelmError("--max-batch-delay-ms, --request-timeout and --shutdown-timeout must be >= 0")
        from cubelm.serve.lora import parse_lora_modules
        parse_lora_modules(self.lora_modules)
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise CubelmError(f"--max-loras and --max-lora-rank must be >= 1, got {self.max_loras}, "
                              f"{self.max_lora_rank}")
        if self.embed_max_batch < 1 or self.embed_max_delay_ms < 0 or self.embed_max_batch_tokens < 1:
            raise CubelmError(f"--embed-max-batch and --embed-max-batch-tokens must be >= 1 and --embed-max-delay-ms "
                              f">= 0, got {self.embed_max_batch}, {self.embed_max_batch_tokens}, "
                              f"{self.embed_max_delay_ms}")
        if self.task == "embed" and (self.lora_modules or self.enable_runtime_lora or self.embed_model
                                     or self.grpc_port or self.rag_index):
            raise CubelmError("--task embed serves one embedding model (--model): --lora-modules, "
                              "--enable-runtime-lora, --embed-model, --grpc-port and --rag-index are for --task "
                              "generate")
        if self.rag_embed_model and not self.rag_index:
            raise CubelmError("--rag-embed-model needs --rag-index")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise CubelmError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")

    @property
    def enable_lora(self) -> bool:
        return bool(self.lora_modules) or self.enable_runtime_lora


def run_serve(o: ServeOptions) -> int:
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.model.hf_io import resolve_device, resolve_dtype

    _log_to_stderr()
    if o.task == "embed":
        from cubelm.rag.embedder import resolve_embedder
        model = o.model or "all-minilm-l6-v2"
        name, path = resolve_embedder(model)  # a bad name fails now, not in the load thread
        o = dataclasses.replace(o, model=model, served_model_name=o.served_model_name or name)
        resolve_dtype(o.dtype, resolve_device(o.device))
        return _run(o, path)
    path = resolve_model_dir(o.model)
    resolve_dtype(o.dtype, resolve_device(o.device))  # a bad --device/--dtype fails now, not in the load thread
    if o.quantization is not None:
        from cubelm.compress.quantize import check_method
        check_method(o.quantization, o.quantization_group_size)
    o = dataclasses.replace(o, model=str(path), served_model_name=o.served_model_name or path.name.partition("@")[0])
    if o.lora_modules:  # a bad adapter fails now, in one line, not in the load thread
        from cubelm.serve.lora import check_lora_modules, parse_lora_modules
        check_lora_modules(parse_lora_modules(o.lora_modules), path, o.served_model_name, o.max_lora_rank)
    if o.grpc_port:  # compile the protocol and check the port now: a problem is one line, not a startup traceback
        from cubelm.serve.v2.proto import protocol
        protocol()
        _check_port_free(o.host, o.grpc_port)
    if o.embed_model:
        from cubelm.rag.embedder import resolve_embedder
        resolve_embedder(o.embed_model)
    if o.rag_index:  # a missing or corrupt index, or an embedder that does not load, is one line now
        from cubelm.serve.rag_chat import check_rag_index
        check_rag_index(o.rag_index, o.rag_embed_model)
    return _run(o, path)


def _run(o: ServeOptions, path) -> int:
    import uvicorn

    from cubelm.serve.app import create_app
    from cubelm.serve.server import DrainingServer
    from cubelm.serve.state import ServerState

    state = ServerState(o)  # opens the feature store: a bad repo or a missing extra fails here, in one line
    if state.limiter is not None:
        state.limiter.check_storage()
    config = uvicorn.Config(create_app(state), host=o.host, port=o.port, log_level=o.log_level,
                            access_log=o.access_log, timeout_graceful_shutdown=UVICORN_GRACEFUL_SHUTDOWN_S,
                            lifespan="on")
    server = DrainingServer(config, state, o.shutdown_timeout)
    auth = f"{len(state.keys._digests)} API key(s)" if state.keys.enabled else "no API key (open)"
    print(f"[cubelm] serving {path} as '{o.served_model_name}' on http://{o.host}:{o.port}/v1 ({auth}); "
          f"docs at /docs" + ("" if o.task == "embed" else "; KServe V2 at /v2")
          + (f" and gRPC {o.host}:{o.grpc_port}" if o.grpc_port else ""),
          file=sys.stderr, flush=True)
    server.run()
    if state.load_error is not None:
        raise CubelmError(f"could not load the model from {path}: {state.load_error}")
    if state.engine_error is not None:  # non-zero, so that a supervisor restarts the server
        print(f"[cubelm] exiting with status 1: the engine failed ({type(state.engine_error).__name__}: "
              f"{state.engine_error})", file=sys.stderr, flush=True)
        return 1
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise CubelmError(f"--grpc-port {port}: cannot listen on {host}:{port} ({e.strerror}); choose a free "
                              f"port") from None


def _log_to_stderr() -> None:
    """cubelm's own log records (engine failures with their tracebacks) go to stderr next to uvicorn's."""
    import logging
    logger = logging.getLogger("cubelm")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[cubelm] %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
