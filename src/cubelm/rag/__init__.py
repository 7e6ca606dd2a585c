"""Retrieval-augmented generation: chunking, embedders, vector stores, retrieval (issue 14)."""
