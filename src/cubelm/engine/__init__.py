"""Inference: sampling, incremental detokenization and the reference generator (contiguous KV cache).

The paged engine (block manager, scheduler, runner) is tested against ``reference.generate_tokens``.
"""
