"""Evaluation: bits per byte of a model on held-out text, next to gzip and unigram baselines; retrieval quality
(recall@k, MRR, nDCG) of embedders and vector indexes on a labeled set built from Python sources."""
