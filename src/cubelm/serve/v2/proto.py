"""The V2 gRPC protocol's messages and service, compiled from ``grpc_service.proto`` on first use.

``grpc_tools.protoc`` (grpcio-tools) compiles the .proto into a ``FileDescriptorSet`` cached at
``$CUBELM_PROTO_CACHE`` (default ``~/.cache/cubelm/proto``) as ``grpc_service-<hash>.pb`` (the hash covers the
.proto text and the protobuf and grpcio-tools versions; written under a temporary name, then renamed, so
concurrent first uses never read half a file). The message classes are built from it at run time
(``message_factory``), so no generated code exists, in the repository or anywhere else.

NOTE: the descriptors go into a private ``DescriptorPool``, not protobuf's default one: tritonclient's compiled
``service_pb2`` registers the same full names (``inference.ModelInferRequest``, ...) in the default pool, and a
process that imports both (a test, a client next to a server) would fail with "duplicate symbol". Only the
service and method names travel on the wire (``/inference.GRPCInferenceService/ModelInfer``), so the private
pool changes nothing for clients.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cubelm.errors import CubelmError

PROTO = Path(__file__).with_name("grpc_service.proto")
SERVICE = "inference.GRPCInferenceService"


def cache_dir() -> Path:
    return Path(os.environ.get("CUBELM_PROTO_CACHE") or Path.home() / ".cache" / "cubelm" / "proto")


def compile_descriptor_set() -> bytes:
    """The serialized FileDescriptorSet of ``grpc_service.proto``, compiled once per .proto and toolchain."""
    try:
        import google.protobuf
        from grpc_tools import protoc
    except ImportError:
        raise CubelmError("the V2 gRPC server needs grpcio, grpcio-tools and protobuf: "
                          "pip install 'cubelm[grpc]'") from None
    text = PROTO.read_bytes()
    key = hashlib.sha256(text + google.protobuf.__version__.encode() + _tools_version().encode()).hexdigest()[:16]
    target = cache_dir() / f"grpc_service-{key}.pb"
    if target.is_file():
        return target.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".grpc_service-", suffix=".tmp")
    os.close(fd)
    try:
        # argv[0] is ignored by protoc; -I the .proto's folder so its descriptor is named "grpc_service.proto"
        status = protoc.main(["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={tmp}", str(PROTO)])
        if status != 0:
            raise CubelmError(f"protoc failed to compile {PROTO} (exit {status}); see the message above")
        os.replace(tmp, target)  # atomic: a concurrent reader sees no file or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target.read_bytes()


def _tools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("grpcio-tools")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Method:
    name: str  # "ModelInfer"
    path: str  # "/inference.GRPCInferenceService/ModelInfer", what travels on the wire
    request: type  # message classes
    response: type
    client_streaming: bool
    server_streaming: bool


class Protocol:
    """The compiled protocol: ``proto.ModelInferRequest`` etc. are message classes; ``methods`` the service's RPCs."""

    def __init__(self, descriptor_set: bytes):
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
        self.pool = descriptor_pool.DescriptorPool()
        for f in files.file:
            self.pool.Add(f)
        self._classes: dict[str, type] = {}
        service = self.pool.FindServiceByName(SERVICE)
        for d in service.file.message_types_by_name.values():
            self._classes[d.name] = message_factory.GetMessageClass(d)
        self.methods = {m.name: Method(m.name, f"/{SERVICE}/{m.name}", self._classes[m.input_type.name],
                                       self._classes[m.output_type.name], m.client_streaming, m.server_streaming)
                        for m in service.methods}

    def __getattr__(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            raise AttributeError(f"the V2 protocol has no message {name}") from None


@functools.cache
def protocol() -> Protocol:
    return Protocol(compile_descriptor_set())


class Stub:
    """A client for ``GRPCInferenceService`` built from the compiled service: ``Stub(channel).ModelInfer(req,
    metadata=...)``. Works with ``grpc.Channel`` and ``grpc.aio.Channel`` alike."""

    def __init__(self, channel):
        for m in protocol().methods.values():
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                (m.client_streaming, m.server_streaming)]
            setattr(self, m.name, kind(m.path, request_serializer=m.request.SerializeToString,
                                       response_deserializer=m.response.FromString))
