"""Retrieval and features around the LLM: embedders, vector stores, chunking, RAG and the feature store."""
