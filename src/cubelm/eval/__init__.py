"""Evaluation: bits per byte of a model on held-out text, next to gzip and unigram baselines."""
