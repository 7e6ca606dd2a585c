"""Embeddings, vector stores and retrieval-augmented generation (book §3.3.2, §6.1.3, §6.1.7).

``embedder`` (encoders and decoders as text embedders), ``pooling``, ``vectors`` (truncation, normalization,
quantization), ``batcher`` (adaptive batching for /v1/embeddings),
``chunking`` (token windows on text boundaries), ``store`` / ``faiss_store`` / ``chroma_store`` (vector stores),
``features`` (the Feast feature store, §6.1.6)."""
