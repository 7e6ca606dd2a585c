"""KServe V2 / Open Inference Protocol in front of the engine: REST (``rest``) and gRPC (``grpc_server``, protocol
compiled from ``grpc_service.proto`` by ``proto``), sharing tensors (``tensors``) and generation (``core``)."""
