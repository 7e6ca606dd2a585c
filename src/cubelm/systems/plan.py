"""The memory plan behind ``cubelm plan``: one ``MemoryPlan`` holding weights, KV cache, activations and
training states for a model, a dtype, a batch, a context and a mode, with a fits / does-not-fit verdict against a
device budget; ``rows()`` is the printed table, ``to_dict()`` the JSON. Formulas live in ``cubelm.systems.memory``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cubelm.model.config import ModelConfig
from cubelm.systems.memory import (ActivationEstimate, KVPoolPlan, NF4_DQ_BITS, TRAINED_BYTES, TrainingStates, _FLOAT_DTYPES, activation_bytes, canonical_dtype, dtype_bytes, gb, gib, kv_cache_bytes, kv_cache_bytes_per_token, plan_kv_pool, training_states)


@dataclass(slots=True, kw_only=True)
class MemoryPlan:
    model: str
    cfg: ModelConfig
    mode: str
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    lora_rank: int
    activation_checkpointing: bool
    attention: str
    states: TrainingStates
    activations: ActivationEstimate
    kv_cache: int  # 0 in training modes: a training forward keeps no cache
    device_memory: int | None = None
    kv_pool: KVPoolPlan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def activation_total(self) -> int:
        a = self.activations
        if self.mode == "inference":
            return a.inference_peak
        return a.with_checkpointing if self.activation_checkpointing else a.without_checkpointing

    @property
    def total(self) -> int:
        return self.states.total + self.kv_cache + self.activation_total

    @property
    def headroom(self) -> int | None:
        return None if self.device_memory is None else self.device_memory - self.total

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.headroom >= 0

    @property
    def verdict(self) -> str:
        if self.device_memory is None:
            return "no --device-memory given"
        if self.fits:
            return f"fits ({self.headroom:,} bytes = {gb(self.headroom)} to spare)"
        return f"does not fit (short by {-self.headroom:,} bytes = {gb(-self.headroom)})"

    def book_rule(self) -> tuple[str, int] | None:
        """The book's rules of thumb on the marketing size: 2 B/param to serve in 16 bits, 16 B/param to train."""
        nominal = self.cfg.nominal_params
        if nominal is None or self.mode not in ("inference", "full"):
            return None
        per_param = TRAINED_BYTES if self.mode == "full" else dtype_bytes(self.dtype)
        label = f"book rule: {nominal / 1e9:g}B params × {per_param:g} B"
        return label, math.ceil(nominal * per_param)

    def items(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) of everything that adds up to ``total``."""
        s, n = self.states, self.cfg.num_params()
        out: list[tuple[str, int, str]] = []
        if self.mode == "qlora":
            out.append(("weights (NF4 + double quant base)", s.weights,
                        f"linear layers at {float(NF4_DQ_BITS):.3f} bits, the rest {self.dtype}"))
        else:
            out.append((f"weights ({self.dtype})", s.weights, f"{n:,} params × {dtype_bytes(self.dtype):g} B"))
        if s.adapter_weights:
            out.append(("LoRA adapters (fp32)", s.adapter_weights,
                        f"{s.trainable_params:,} params, rank {self.lora_rank} on q,k,v,o,gate,up,down"))
        if s.gradients:
            out.append(("gradients", s.gradients, f"{s.trainable_params:,} trained params"))
        if s.master_weights:
            out.append(("fp32 master weights", s.master_weights, "AdamW updates fp32, not 16-bit, weights"))
        if s.adam_moments:
            out.append(("AdamW moments (2 × fp32)", s.adam_moments, "m and v"))
        if self.mode == "inference":
            per_token = kv_cache_bytes_per_token(self.cfg, self.kv_dtype)
            out.append((f"KV cache ({self.kv_dtype})", self.kv_cache,
                        f"{per_token:,} B/token × {self.context} tokens × batch {self.batch}"))
            out.append(("activations (prefill peak)", self.activation_total, "one layer live, no autograd"))
        else:
            how = "checkpointing" if self.activation_checkpointing else "no checkpointing"
            out.append((f"activations ({how})", self.activation_total,
                        f"{self.batch} × {self.context} tokens, {self.attention} attention"))
        return out

    def references(self) -> list[tuple[str, int, str]]:
        """Lines shown for comparison, not added to the total."""
        a, s, L = self.activations, self.states, self.cfg.num_hidden_layers
        out: list[tuple[str, int, str]] = []
        if self.mode == "inference":
            out.append(("KV cache per token", kv_cache_bytes_per_token(self.cfg, self.kv_dtype),
                        "2 × layers × kv_heads × head_dim × bytes"))
        else:
            out.append(("training states (weights+grads+optimizer)", s.total,
                        f"{s.total / self.cfg.num_params():.2f} B per model param"))
            other = a.without_checkpointing if self.activation_checkpointing else a.with_checkpointing
            out.append((f"activations {'without' if self.activation_checkpointing else 'with'} checkpointing",
                        other, "the other setting of --activation-checkpointing"))
        if self.attention == "sdpa":
            layers = 1 if self.mode == "inference" or self.activation_checkpointing else L
            out.append(("naive attention would add", layers * a.naive_scores_per_layer,
                        f"s×s scores: {layers} layer(s) × batch × heads × s² × bytes"))
        if self.mode == "full":
            out.append(("exact 16 B × params", TRAINED_BYTES * self.cfg.num_params(), "same rule, real count"))
        rule = self.book_rule()
        if rule:
            out.append((rule[0], rule[1], "rule of thumb on the nominal size"))
        return out

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(component, bytes, GB, GiB, note) rows; an all-empty row separates sections."""
        def row(label: str, b: int, note: str = "") -> tuple[str, str, str, str, str]:
            return (label, f"{b:,}", gb(b), gib(b), note)
        out = [row(*item) for item in self.items()]
        out.append(row("total", self.total, "+ CUDA context / fragmentation, not counted"))
        if self.device_memory is not None:
            out.append(row("device memory", self.device_memory, self.verdict))
        if self.kv_pool is not None:
            k = self.kv_pool
            out.append(row("KV pool in the remaining memory", k.num_blocks * k.bytes_per_block,
                           f"{k.num_blocks:,} blocks × {k.block_size} tokens = {k.num_tokens:,} tokens, "
                           f"{k.max_num_seqs} seqs at {k.max_model_len}"))
        out.append(("", "", "", "", ""))
        out += [row(*ref) for ref in self.references()]
        return out

    def to_dict(self) -> dict:
        rule = self.book_rule()
        return {
            "model": self.model, "num_params": self.cfg.num_params(), "nominal_params": self.cfg.nominal_params,
            "mode": self.mode, "dtype": self.dtype, "kv_dtype": self.kv_dtype, "context": self.context,
            "batch": self.batch, "lora_rank": self.lora_rank, "attention": self.attention,
            "activation_checkpointing": self.activation_checkpointing,
            "components": {label: b for label, b, _ in self.items()},
            "training_states": self.states.to_dict(), "kv_cache": self.kv_cache,
            "kv_cache_per_token": kv_cache_bytes_per_token(self.cfg, self.kv_dtype),
            "activations": self.activations.to_dict(), "activation_total": self.activation_total,
            "total": self.total, "device_memory": self.device_memory, "fits": self.fits,
            "headroom": self.headroom, "verdict": self.verdict,
            "kv_pool": self.kv_pool.to_dict() if self.kv_pool else None,
            "book_rule": {"label": rule[0], "bytes": rule[1]} if rule else None, "notes": list(self.notes),
        }


def plan_memory(cfg: ModelConfig, *, model: str = "model", mode: str = "inference", dtype: str = "float16",
                context: int = 4096, batch: int = 1, lora_rank: int = 8, activation_checkpointing: bool = False,
                attention: str = "sdpa", device_memory: int | None = None, kv_dtype: str | None = None,
                block_size: int = 16) -> MemoryPlan:
    """Everything ``cubelm plan`` prints. ``dtype`` is the compute (and, except for qlora, storage) dtype."""
    dtype = canonical_dtype(dtype)
    # A 4-bit or int8 weight format does not make a 4-bit cache; default the cache to 16 bits then.
    kv_dtype = canonical_dtype(kv_dtype) if kv_dtype else (dtype if dtype in _FLOAT_DTYPES + ("fp8",) else "float16")
    states = training_states(cfg, mode, dtype, lora_rank=lora_rank)
    compute = dtype if dtype in _FLOAT_DTYPES else "float16"
    acts = activation_bytes(cfg, compute, context, batch, lora_rank=lora_rank if mode in ("lora", "qlora") else 0,
                            attention=attention)
    plan = MemoryPlan(model=model, cfg=cfg, mode=mode, dtype=dtype, kv_dtype=kv_dtype, context=context,
                      batch=batch, lora_rank=lora_rank, activation_checkpointing=activation_checkpointing,
                      attention=attention, states=states, activations=acts,
                      kv_cache=kv_cache_bytes(cfg, kv_dtype, context, batch) if mode == "inference" else 0,
                      device_memory=device_memory)
    if device_memory is not None and mode == "inference":
        spare = device_memory - states.weights - plan.activation_total
        plan.kv_pool = plan_kv_pool(cfg, max(spare, 0), block_size=block_size, dtype=kv_dtype, max_model_len=context)
    plan.notes += _notes(cfg, context)
    return plan


def _notes(cfg: ModelConfig, context: int) -> list[str]:
    notes = []
    if context > cfg.max_position_embeddings:
        notes.append(f"context {context} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    if cfg.sliding_window is not None and context > cfg.sliding_window:
        notes.append(f"sliding window {cfg.sliding_window}: a ring-buffer cache would need only that many tokens "
                     f"per sequence; the plan counts a full cache, as cubelm's engine keeps")
    return notes
