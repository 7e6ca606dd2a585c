"""Memory planner: the bytes a model needs for weights, KV cache, activations and training states.

Pure arithmetic on a ``ModelConfig`` (no torch), so the engine can size its KV block pool with
``plan_kv_pool`` before loading anything, and ``cubelm plan`` can answer "does it fit?". Byte counts are exact
integers; each function says what its formula leaves out. Not counted anywhere: the CUDA context and allocator
fragmentation (budget ~0.5–1 GB of slack on a GPU), temporary buffers and transient gradients in backward.

    cubelm plan --model llama-2-7b --dtype float16 --context 4096 --batch 1 [--mode full] [--device-memory 24GiB]
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from fractions import Fraction

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.systems.flops import layer_linear_shapes

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}
_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8, "int4": 4, "nf4": 4}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# QLoRA (Dettmers et al. 2023): 4-bit NF4 codes, one 8-bit absmax per 64 weights (double quantization), and one
# fp32 scale per 256 of those absmaxes: 4 + 8/64 + 32/(64·256) = 4.127 bits per parameter. ``nf4_tensor_bytes``
# is the exact count for one tensor as ``cubelm.compress.nf4`` stores it (padded blocks, the fp32 mean).
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
NF4_DQ_BITS = Fraction(4) + Fraction(8, NF4_BLOCK) + Fraction(32, NF4_BLOCK * NF4_SCALE_BLOCK)
KV_INT8_SCALE_BYTES = 4  # the engine's int8 KV cache: one fp32 scale per token per KV head (cubelm.engine.kv_cache)
MODES = ("inference", "full", "lora", "qlora")
ADAM_BYTES = 8  # AdamW keeps two fp32 moments (m, v) per trained parameter
TRAINED_BYTES = 16  # fp32 weight + fp32 grad + 2 fp32 moments (or 16-bit weight + grad + fp32 master + moments)


def canonical_dtype(name: str) -> str:
    key = str(name).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _DTYPE_BITS:
        raise CubelmError(f"unknown dtype {name!r}; use one of float32/fp32, float16/fp16/half, bfloat16/bf16, "
                          f"fp8, int8, int4, nf4")
    return key


def dtype_bytes(name: str) -> float:
    """Bytes per element: 4, 2, 1, or 0.5 for the 4-bit formats."""
    return _DTYPE_BITS[canonical_dtype(name)] / 8


def _nbytes(count: int, bits: int | Fraction) -> int:
    return math.ceil(Fraction(count) * bits / 8)


def _bits(dtype: str) -> int:
    return _DTYPE_BITS[canonical_dtype(dtype)]


def _positive_int(name: str, value: int, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise CubelmError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


# ---- weights and KV cache --------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Every parameter in ``dtype`` (a weight-only 4-bit checkpoint that keeps embeddings in 16 bits is larger)."""
    return _nbytes(cfg.num_params(), _bits(dtype))


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str) -> int:
    """2 (K and V) × n_layers × (n_kv_heads × head_dim) × bytes, the book's §10.5 formula.

    The book writes n_heads because Llama 2 7B is MHA; with GQA/MQA only the key/value heads are cached, so
    the book's n_heads becomes num_key_value_heads and the cache shrinks by heads/kv_heads.
    int8 is the engine's format (``kv_cache_dtype="int8"``, ``cubelm.engine.kv_cache``): each cached row (one
    token, one KV head) is head_dim int8 codes plus one fp32 scale, so 2 × n_layers × n_kv_heads × (head_dim + 4).
    """
    rows = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads
    if canonical_dtype(dtype) == "int8":
        return rows * (cfg.head_dim + KV_INT8_SCALE_BYTES)
    return _nbytes(rows * cfg.head_dim, _bits(dtype))


def kv_cache_bytes(cfg: ModelConfig, dtype: str, tokens: int, batch: int = 1) -> int:
    """KV cache for ``batch`` sequences of ``tokens`` tokens each (a full cache; no sliding-window ring buffer)."""
    _positive_int("tokens", tokens, allow_zero=True)
    _positive_int("batch", batch, allow_zero=True)
    return batch * tokens * kv_cache_bytes_per_token(cfg, dtype)


@dataclass(slots=True, kw_only=True, frozen=True)
class KVPoolPlan:
    """How a byte budget splits into paged KV blocks (what the engine's block manager allocates)."""
    block_size: int  # tokens per block
    bytes_per_block: int
    num_blocks: int
    num_tokens: int  # num_blocks × block_size
    max_model_len: int
    blocks_per_seq: int  # ceil(max_model_len / block_size)
    max_num_seqs: int  # sequences that fit at once at full context; 0 means not even one

    def check_fits_one_sequence(self) -> None:
        if self.max_num_seqs < 1:
            raise CubelmError(f"the KV pool holds {self.num_tokens} tokens but one sequence of max_model_len "
                              f"{self.max_model_len} needs {self.blocks_per_seq * self.block_size}; give the KV "
                              f"cache more memory or lower max_model_len")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_kv_pool(cfg: ModelConfig, budget_bytes: int, *, block_size: int = 16, dtype: str = "float16",
                 max_model_len: int | None = None) -> KVPoolPlan:
    """Blocks of ``block_size`` tokens (all layers, K and V) that fit in ``budget_bytes``."""
    max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
    _positive_int("block_size", block_size)
    _positive_int("max_model_len", max_model_len)
    if not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise CubelmError(f"KV budget must be a non-negative number of bytes, got {budget_bytes!r}")
    per_block = block_size * kv_cache_bytes_per_token(cfg, dtype)
    num_blocks = budget_bytes // per_block
    blocks_per_seq = -(-max_model_len // block_size)
    return KVPoolPlan(block_size=block_size, bytes_per_block=per_block, num_blocks=num_blocks,
                      num_tokens=num_blocks * block_size, max_model_len=max_model_len,
                      blocks_per_seq=blocks_per_seq, max_num_seqs=num_blocks // blocks_per_seq)


# ---- activations -------------------------------------------------------------------------------------------
def _layer_saved_per_token(cfg: ModelConfig, p: float, lora_rank: int) -> float:
    """Bytes one decoder layer saves for backward, per token (p = compute-dtype bytes).

    input_layernorm           x (h·p) + rstd (4 B fp32). Counted as a fused RMSNorm; cubelm's eager RMSNorm
                              upcasts to fp32 and autograd keeps those copies too, so it is an under-count there.
    q/k/v_proj                the normed x (h·p), one tensor shared by the three matmuls
    RoPE                      nothing per token: cos/sin are per position and shared by all layers
    SDPA (flash/mem-eff)      q, k, v after RoPE ((q + 2·kv)·p; GQA via enable_gqa, so no repeated K/V),
                              the output (q·p, also o_proj's input), logsumexp (4 B × heads). It does NOT
                              store the s×s scores; see ``naive_scores_per_layer``.
    o_proj + residual add     nothing new
    post_attention_layernorm  h1 (h·p) + rstd (4 B)
    gate_proj / up_proj       the normed h1 (h·p)
    SwiGLU                    gate (i·p, SiLU's input), silu(gate) and up (2·i·p, the product's operands)
    down_proj                 silu(gate)·up (i·p)
    LoRA                      x·A (r·p) for each of the 7 adapted projections; their inputs are saved already
    No dropout in Llama. Total: p·(4h + 2q + 2kv + 4i + 7r) + 8 + 4·heads.
    """
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return p * (4 * h + 2 * q + 2 * kv + 4 * i + 7 * lora_rank) + 2 * 4 + 4 * cfg.num_attention_heads


def _head_saved_per_token(cfg: ModelConfig, p: float) -> float:
    """Final norm (input h·p + rstd 4 B), lm_head input (h·p), logits (V·p) and the fp32 log-probs the loss keeps
    (V·4: the loss upcasts logits to fp32). A chunked/fused cross-entropy would avoid the two V terms."""
    return p * 2 * cfg.hidden_size + 4 + cfg.vocab_size * (p + 4)


@dataclass(slots=True, kw_only=True, frozen=True)
class ActivationEstimate:
    tokens: int  # batch × context
    per_layer: int  # saved for backward by one layer (includes naive scores when attention="naive")
    layer_input: int  # one layer's input, what checkpointing keeps per layer
    head: int  # final norm + logits + fp32 log-probs
    naive_scores_per_layer: int  # s×s probabilities naive attention stores: batch·heads·s²·p
    without_checkpointing: int  # L·per_layer + head
    with_checkpointing: int  # L·layer_input + one layer recomputed in full + head
    inference_peak: int  # no autograd: one layer's live tensors during prefill + last-position logits

    def to_dict(self) -> dict:
        return asdict(self)


def activation_bytes(cfg: ModelConfig, dtype: str, context: int, batch: int = 1, *, lora_rank: int = 0,
                     attention: str = "sdpa") -> ActivationEstimate:
    """Activation memory for a forward over ``batch`` × ``context`` tokens (training and inference)."""
    if attention not in ("sdpa", "naive"):
        raise CubelmError(f"attention must be 'sdpa' or 'naive', got {attention!r}")
    _positive_int("context", context)
    _positive_int("batch", batch)
    p, n, L = dtype_bytes(dtype), batch * context, cfg.num_hidden_layers
    # Naive attention keeps softmax(QK^T) (b, heads, s, s) for P·V's backward; an fp32 softmax adds as much again.
    naive = math.ceil(batch * cfg.num_attention_heads * context * context * p)
    per_layer = math.ceil(n * _layer_saved_per_token(cfg, p, lora_rank)) + (naive if attention == "naive" else 0)
    layer_input = math.ceil(n * cfg.hidden_size * p)
    head = math.ceil(n * _head_saved_per_token(cfg, p))
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    # Inference: residual + normed input (2h) and the larger of attention (q, k, v, out) or MLP (gate, up,
    # product); fp32 logits for the last position only, which is all sampling needs.
    live = math.ceil(n * p * (2 * h + max(2 * q + 2 * kv, 3 * i))) + (naive if attention == "naive" else 0)
    return ActivationEstimate(
        tokens=n, per_layer=per_layer, layer_input=layer_input, head=head, naive_scores_per_layer=naive,
        without_checkpointing=L * per_layer + head, with_checkpointing=L * layer_input + per_layer + head,
        inference_peak=live + batch * cfg.vocab_size * 4)


# ---- training states ------------------------------------------------------------------------------------------
def lora_params(cfg: ModelConfig, rank: int = 8) -> int:
    """A (in×r) and B (r×out) on q, k, v, o, gate, up, down of every layer; alpha only scales, costs nothing."""
    _positive_int("lora rank", rank)
    return cfg.num_hidden_layers * sum(rank * (i + o) for i, o in layer_linear_shapes(cfg).values())


def nf4_tensor_bytes(numel: int, block_size: int = NF4_BLOCK, scale_block_size: int = NF4_SCALE_BLOCK) -> int:
    """One tensor in NF4 with double quantization, each part rounded up to whole blocks: 4-bit codes for every
    (zero-padded) block, an int8 absmax per block, an fp32 scale per ``scale_block_size`` absmaxes, and the fp32
    mean subtracted from the absmaxes. → 4.127 bits per weight for a large tensor."""
    _positive_int("numel", numel)
    blocks = -(-numel // block_size)
    return blocks * block_size // 2 + blocks + 4 * -(-blocks // scale_block_size) + 4


def nf4_base_bytes(cfg: ModelConfig, dtype: str) -> int:
    """QLoRA base: each of the layers' linear weights in NF4 + double quantization (``nf4_tensor_bytes``, per
    tensor); embeddings, lm_head, norms and biases stay in ``dtype`` (as bitsandbytes leaves them)."""
    shapes = layer_linear_shapes(cfg).values()
    linear = cfg.num_hidden_layers * sum(i * o for i, o in shapes)
    nf4 = cfg.num_hidden_layers * sum(nf4_tensor_bytes(i * o) for i, o in shapes)
    return nf4 + _nbytes(cfg.num_params() - linear, _bits(dtype))


@dataclass(slots=True, kw_only=True, frozen=True)
class TrainingStates:
    mode: str
    trainable_params: int
    weights: int  # the model as held in memory: dtype, or NF4 base for qlora
    adapter_weights: int  # LoRA A/B, kept in fp32 (PEFT's default upcast) so they train at 16 B/param
    gradients: int
    master_weights: int  # fp32 copy that AdamW updates when the compute weights are 16-bit
    adam_moments: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter_weights + self.gradients + self.master_weights + self.adam_moments

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def training_states(cfg: ModelConfig, mode: str, dtype: str, *, lora_rank: int = 8) -> TrainingStates:
    """Weights, gradients and AdamW state for ``mode`` (inference has only weights).

    Full training: fp32 is 4 (weight) + 4 (grad) + 8 (moments) = 16 B/param; 16-bit mixed precision is
    2 + 2 + 4 (fp32 master) + 8 = 16 B/param too, the book's rule of thumb.
    """
    if mode not in MODES:
        raise CubelmError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    n, dt = cfg.num_params(), canonical_dtype(dtype)
    if mode == "inference":
        return TrainingStates(mode=mode, trainable_params=0, weights=weight_bytes(cfg, dt), adapter_weights=0,
                              gradients=0, master_weights=0, adam_moments=0)
    if mode in ("full", "qlora") and dt not in _FLOAT_DTYPES:
        raise CubelmError(f"{mode} training computes in float32, float16 or bfloat16, not {dt}; pass --dtype "
                          f"bfloat16 (QLoRA's 4-bit storage is implied by --mode qlora)")
    if mode == "full":
        p = _bits(dt) // 8
        return TrainingStates(mode=mode, trainable_params=n, weights=n * p, adapter_weights=0, gradients=n * p,
                              master_weights=n * 4 if p < 4 else 0, adam_moments=n * ADAM_BYTES)
    r = lora_params(cfg, lora_rank)
    base = weight_bytes(cfg, dt) if mode == "lora" else nf4_base_bytes(cfg, dt)
    return TrainingStates(mode=mode, trainable_params=r, weights=base, adapter_weights=4 * r, gradients=4 * r,
                          master_weights=0, adam_moments=ADAM_BYTES * r)


# ---- byte strings --------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"24GiB"``, ``"80GB"``, ``"512 MiB"``, ``"1073741824"`` → bytes. KB/MB/GB are powers of 1000,
    KiB/MiB/GiB (and bare K/M/G, as in docker) powers of 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise CubelmError(f"cannot read {text!r} as a memory size; write bytes or a number with a unit, "
                              f"e.g. 24GiB, 80GB, 512MiB, 25769803776")
        value, unit = m.group(1), m.group(2)
    num = int(Fraction(value) * _UNITS[unit])  # Fraction reads "1.5", "2e9" exactly; a float would round
    if num <= 0:
        raise CubelmError(f"memory size must be positive, got {text!r}")
    return num


def gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:,.2f} GB"


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.2f} GiB"


__all__ = ["dtype_bytes", "canonical_dtype", "weight_bytes", "kv_cache_bytes_per_token", "kv_cache_bytes",
           "KVPoolPlan", "plan_kv_pool", "ActivationEstimate", "activation_bytes", "lora_params", "nf4_tensor_bytes",
           "nf4_base_bytes", "TrainingStates", "training_states", "parse_bytes", "NF4_DQ_BITS", "MODES",
           "KV_INT8_SCALE_BYTES"]
