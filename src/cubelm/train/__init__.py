"""Training: config + recipes, deterministic batches, AdamW + cosine schedule, atomic checkpoints, the loop.

    cubelm train --data DIR --out DIR --preset tiny            # single process
    cubelm build-default                                       # the default model, from the stdlib
"""
