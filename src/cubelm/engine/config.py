"""Engine configuration and KV-pool sizing (through the memory planner, ``cubelm.systems.memory``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cubelm.errors import CubelmError

if TYPE_CHECKING:
    from cubelm.engine.speculative import SpeculativeConfig


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: str | int | float = "1GiB"  # bytes ("2GiB", 2_000_000) or a fraction of RAM (0.2)
    num_blocks: int | None = None  # overrides kv_cache_memory (tests use tiny pools to force preemption)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # "auto" = the model's dtype; "int8": codes + fp32 scale per token and KV head
    seed: int = 0  # for unseeded sampling
    decode_layout: bool = True  # blocked weight layout for fast CPU decode (cubelm.engine.decode_layout)
    native_step: bool = True  # decode-only steps of <= 8 rows in one native call (cubelm.engine.native_step)
    compile_decode: bool = False  # torch.compile the model forward (dynamic shapes; a cold compile takes 15-60 s)
    speculative: "SpeculativeConfig | None" = None  # cubelm.engine.speculative
    # multi-LoRA (cubelm.engine.lora): adapters per step, their largest rank, adapters kept in memory (LRU)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max_loras
    # weight-only quantization at load (cubelm.compress.quantize): None keeps the model's weights as they are
    # (float, or an ahead-of-time quantized directory's); "int8" per-row scales, "int4" per-group scales
    quantization: str | None = None
    quantization_group_size: int = 32  # int4: inputs per scale (32, 64, 128)
    quantize_head: bool = False  # quantize the output head too

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CubelmError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        from cubelm.engine.kv_cache import check_kv_cache_dtype
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.num_blocks is not None and self.num_blocks < 1:
            raise CubelmError(f"num_blocks must be >= 1, got {self.num_blocks}")
        for name in ("max_loras", "max_lora_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CubelmError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.quantization is not None:
            from cubelm.compress.quantize import check_method
            check_method(self.quantization, self.quantization_group_size)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if not isinstance(self.max_cpu_loras, int) or self.max_cpu_loras < self.max_loras:
            raise CubelmError(f"max_cpu_loras ({self.max_cpu_loras!r}) must be an integer >= max_loras "
                              f"({self.max_loras}): the adapters of one step must all be in memory")
        if self.enable_lora and self.compile_decode:
            raise CubelmError("compile_decode does not support enable_lora (the adapters of a step change its "
                              "graph); turn one of them off")


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget_bytes(spec: str | int | float) -> int:
    from cubelm.systems.memory import parse_bytes
    if isinstance(spec, float) or (isinstance(spec, str) and spec.replace(".", "", 1).isdigit() and "." in spec):
        fraction = float(spec)
        if not 0 < fraction < 1:
            raise CubelmError(f"kv_cache_memory as a fraction of RAM must be in (0, 1), got {spec}")
        return int(fraction * _ram_bytes())
    return parse_bytes(spec)


@dataclass(slots=True)
class PoolPlan:
    num_blocks: int
    block_size: int
    bytes_per_block: int
    weight_bytes: int
    max_model_len: int
    kv_dtype: str = "float32"  # what the pool stores: the model's dtype, or "int8" (codes + fp32 scales)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        full = self.num_tokens // self.max_model_len
        kv = "int8 + fp32 scales" if self.kv_dtype == "int8" else self.kv_dtype
        return (f"[cubelm] engine: weights {self.weight_bytes / 2**20:,.1f} MiB; KV cache ({kv}) "
                f"{self.num_blocks * self.bytes_per_block / 2**20:,.1f} MiB = {self.num_blocks:,} blocks x "
                f"{self.block_size} tokens = {self.num_tokens:,} tokens; {full:,} concurrent sequences at the full "
                f"context of {self.max_model_len:,}")


def plan_pool(cfg, config: EngineConfig, param, max_model_len: int) -> PoolPlan:
    from cubelm.systems.memory import plan_kv_pool
    # int8: the planner counts the codes and their fp32 scales, so the same budget buys more blocks
    dtype = "int8" if config.kv_cache_dtype == "int8" else str(param.dtype).removeprefix("torch.")
    weight_bytes = cfg.num_params() * param.element_size()
    if config.num_blocks is not None:
        per_block = plan_kv_pool(cfg, 0, block_size=config.block_size, dtype=dtype,
                                 max_model_len=max_model_len).bytes_per_block
        return PoolPlan(config.num_blocks, config.block_size, per_block, weight_bytes, max_model_len, dtype)
    budget = kv_budget_bytes(config.kv_cache_memory)
    plan = plan_kv_pool(cfg, budget, block_size=config.block_size, dtype=dtype, max_model_len=max_model_len)
    # no point holding more than max_num_seqs sequences at full context
    cap = config.max_num_seqs * plan.blocks_per_seq
    num_blocks = min(plan.num_blocks, cap)
    if num_blocks < 1:
        raise CubelmError(f"kv_cache_memory {config.kv_cache_memory} holds no {config.block_size}-token block "
                          f"({plan.bytes_per_block:,} bytes each); raise it")
    return PoolPlan(num_blocks, config.block_size, plan.bytes_per_block, weight_bytes, max_model_len, dtype)
