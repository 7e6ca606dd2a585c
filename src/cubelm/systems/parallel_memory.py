"""Per-rank memory under data / tensor / pipeline parallelism: what each rank of a ``cubelm train --nproc`` job
holds (states divided by FSDP and TP, layers divided by PP, in-flight micro-batches by schedule).

Pure arithmetic like ``cubelm.systems.memory``; ``cubelm plan --mode full --dp/--tp/--pp ...`` prints it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.systems.memory import (ADAM_BYTES, _head_saved_per_token, _positive_int, dtype_bytes)

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zbv", "dualpipev")


@dataclass(slots=True, kw_only=True, frozen=True)
class ParallelLayout:
    """How ``cubelm train`` lays a job out (``cubelm.parallel.ParallelConfig``, without torch)."""
    dp: int = 1
    dp_mode: str = "fsdp"  # ddp | fsdp
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    virtual_stages: int = 1
    sequence_parallel: bool = True

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "microbatches", "virtual_stages"):
            _positive_int(name, getattr(self, name))
        if self.dp_mode not in ("ddp", "fsdp"):
            raise CubelmError(f"dp mode must be ddp or fsdp, got {self.dp_mode!r}")
        if self.schedule not in PP_SCHEDULES:
            raise CubelmError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(PP_SCHEDULES)}")

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def in_flight(self) -> int:
        """Micro-batches whose activations the busiest (first) pipeline rank holds at once: all of them when
        every forward runs before any backward (GPipe, looped BFS), else the 1F1B bound min(m, pp). Interleaving
        adds about (pp − 1)/(pp·v) of that; DualPipeV can hold up to 2·pp stage-micro-batches."""
        if self.pp == 1:
            return 1
        return self.microbatches if self.schedule in ("gpipe", "looped-bfs") else min(self.microbatches, self.pp)


@dataclass(slots=True, kw_only=True, frozen=True)
class RankMemory:
    layout: ParallelLayout
    params: int  # parameters this rank computes with (its TP slice of its pipeline stages)
    states: int  # weights + grads + (master) + AdamW moments it stores: /dp under FSDP
    gathered: int  # FSDP: unsharded weights of the two layers in flight (current + prefetched)
    activations: int  # saved for backward on the busiest rank

    @property
    def total(self) -> int:
        return self.states + self.gathered + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def per_rank_memory(cfg: ModelConfig, layout: ParallelLayout, *, dtype: str = "float32", context: int = 2048,
                    batch: int = 1, activation_checkpointing: bool = False) -> RankMemory:
    """Full (AdamW) training bytes on the busiest rank. ``batch`` is the global batch of sequences per micro-step.

    DDP replicates all 16 B/param; FSDP2 (ZeRO-3-like) divides them by dp and adds the unsharded weights of the
    layers being computed; TP divides every linear weight and the embeddings by tp, and the activations of q, k, v,
    attention and the MLP (the norms' and residuals' too with sequence parallelism); cubelm's TP all-gathers the
    logits, so the head's V-sized activations stay whole. PP keeps ceil(L / stages) · v layers per rank and
    ``in_flight`` micro-batches of their activations. Not counted: DDP's 25 MB gradient buckets, communication
    buffers, pipeline p2p buffers.
    """
    p, L, h, t = dtype_bytes(dtype), cfg.num_hidden_layers, cfg.hidden_size, layout.tp
    norm_and_head = h + (0 if cfg.tie_word_embeddings else cfg.vocab_size * h)
    per_layer = (cfg.num_params(include_embeddings=False) - h) // L
    layer_linear = per_layer - 2 * h
    stages = layout.pp * layout.virtual_stages
    layers = L if layout.pp == 1 else min(L, -(-L // stages) * layout.virtual_stages)
    ends = cfg.vocab_size * h + norm_and_head if layout.pp == 1 or layout.schedule in ("zbv", "dualpipev") else \
        max(cfg.vocab_size * h, norm_and_head)
    params = layers * (layer_linear // t + 2 * h) + ends // t
    per_param = 2 * p + (4 if p < 4 else 0) + ADAM_BYTES  # weight + grad + fp32 master + moments
    fsdp = layout.dp > 1 and layout.dp_mode == "fsdp"
    states = math.ceil(params * per_param / (layout.dp if fsdp else 1))
    gathered = math.ceil(2 * (layer_linear // t + 2 * h) * p) if fsdp else 0
    seqs = max(1, batch // layout.dp) / (layout.microbatches if layout.pp > 1 else 1)
    acts = _rank_activations(cfg, layout, p, layers, seqs * context, activation_checkpointing)
    return RankMemory(layout=layout, params=params, states=states, gathered=gathered, activations=acts)


def _rank_activations(cfg: ModelConfig, layout: ParallelLayout, p: float, layers: int, tokens: float,
                      checkpointing: bool) -> int:
    h, q, kv, i, t = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, layout.tp
    replicated = 4 * h / (t if layout.sequence_parallel else 1)
    per_token = p * (replicated + (2 * q + 2 * kv + 4 * i) / t) + 8 + 4 * cfg.num_attention_heads / t
    layer_input = p * h / (t if layout.sequence_parallel else 1)
    head = _head_saved_per_token(cfg, p)
    per_micro = layers * (layer_input if checkpointing else per_token) + (per_token if checkpointing else 0)
    return math.ceil(tokens * (layout.in_flight() * per_micro + head))
