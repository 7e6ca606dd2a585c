"""FLOP counts: one matmul, and a Llama-family model per token (prefill, decode, training).

Pure arithmetic on a ``ModelConfig`` (no torch); the trainer and the engine divide these by measured time and
the device's peak to report MFU. Convention: one multiply-add is 2 FLOPs, so an (m×k)·(k×n) matmul is 2·m·n·k
FLOPs. The exact count is m·n·k multiplications and m·n·(k−1) additions (the book, ch. 2); the k-th addition
of the convention is the one that accumulates into a zero (or a bias), and every MFU number in the literature
uses 2·m·n·k, so we do too.

    cubelm flops --m 4096 --k 4096 --n 4096
    cubelm flops --model llama-2-7b --context 4096
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig


@dataclass(slots=True, kw_only=True, frozen=True)
class MatmulCost:
    m: int
    k: int
    n: int
    multiplications: int  # m·n·k: k products for each of the m·n outputs
    additions: int  # m·n·(k−1): summing k products takes k−1 additions
    flops: int  # 2·m·n·k, the multiply-add convention

    def to_dict(self) -> dict:
        return asdict(self)


def matmul_cost(m: int, k: int, n: int) -> MatmulCost:
    """Cost of multiplying an m×k matrix by a k×n matrix."""
    for name, value in (("m", m), ("k", k), ("n", n)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CubelmError(f"matmul dimension {name} must be a positive integer, got {value!r}")
    return MatmulCost(m=m, k=k, n=n, multiplications=m * n * k, additions=m * n * (k - 1), flops=2 * m * n * k)


def layer_linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven projections in one decoder layer."""
    h, q, kv, i = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def matmul_params(cfg: ModelConfig, *, include_lm_head: bool = True) -> int:
    """Weights that take part in a matmul: the layers' projections (+ the output head).

    Excluded, because they cost no matmul: the embedding (a table lookup), RMSNorm weights and biases
    (elementwise). A tied output head still multiplies by the embedding matrix, so it counts either way.
    """
    per_layer = sum(i * o for i, o in layer_linear_shapes(cfg).values())
    return cfg.num_hidden_layers * per_layer + (cfg.vocab_size * cfg.hidden_size if include_lm_head else 0)


def attention_flops_per_key(cfg: ModelConfig) -> int:
    """FLOPs for one query token against one cached key, summed over layers.

    Per head: q·k is 2·head_dim FLOPs and adding p·v into the output another 2·head_dim, so 2·2·(heads·head_dim)
    per layer. GQA/MQA shrink the KV cache, not this: every query head still does its own dot products.
    Softmax, RoPE, RMSNorm and SiLU are O(tokens·hidden) elementwise work and are left out, as usual.
    """
    return cfg.num_hidden_layers * 2 * 2 * cfg.q_size


def attended_pairs(num_tokens: int, sliding_window: int | None = None) -> int:
    """(query, key) pairs of causal attention over ``num_tokens`` tokens: token j sees min(j, window) keys."""
    s, w = num_tokens, sliding_window
    if w is None or w >= s:
        return s * (s + 1) // 2  # causal halving: s(s+1)/2 pairs, not s²
    return w * (w + 1) // 2 + (s - w) * w


@dataclass(slots=True, kw_only=True, frozen=True)
class ModelFlops:
    context: int
    batch: int
    matmul_params: int
    linear_flops_per_token: int  # 2 · matmul_params
    prefill_attention_flops: int  # causal, all layers, one sequence of `context` tokens
    prefill_flops: int  # batch sequences of `context` tokens, logits at every position
    decode_flops: int  # batch × one new token attending to `context` keys
    training_flops: int  # ≈ 3 × prefill: backward = grads w.r.t. activations + grads w.r.t. weights
    training_flops_with_recompute: int  # activation checkpointing reruns the forward: ≈ 4 × prefill

    @property
    def num_tokens(self) -> int:
        return self.batch * self.context

    @property
    def training_flops_per_token(self) -> float:
        return self.training_flops / self.num_tokens

    def rows(self) -> list[tuple[str, int, str]]:
        c = self.context
        return [
            ("matmul params (layers + lm_head)", self.matmul_params, "N; embedding lookup and norms excluded"),
            ("forward, linear layers, per token", self.linear_flops_per_token, "2·N"),
            (f"attention of one prefill of {c} tokens", self.prefill_attention_flops,
             "L·2·2·(heads·head_dim)·s(s+1)/2, causal half; full-mask kernels do ~2×"),
            (f"prefill: {self.batch} × {c} tokens", self.prefill_flops, "forward, logits at every position"),
            (f"decode: {self.batch} × 1 token at context {c}", self.decode_flops,
             "2·N + L·2·2·(heads·head_dim)·t"),
            (f"training step: {self.batch} × {c} tokens", self.training_flops, "≈ 3 × forward (6·N per token)"),
            ("training step with recompute", self.training_flops_with_recompute,
             "≈ 4 × forward; MFU counts the 3×, HFU the 4×"),
        ]

    def to_dict(self) -> dict:
        return {**asdict(self), "num_tokens": self.num_tokens,
                "training_flops_per_token": self.training_flops_per_token}


def prefill_flops(cfg: ModelConfig, num_tokens: int, batch: int = 1) -> int:
    """Forward FLOPs for ``batch`` sequences of ``num_tokens`` tokens (what training and scoring run).

    An engine that computes logits only for the last position saves (num_tokens − 1)·2·hidden·vocab of this.
    """
    linear = 2 * matmul_params(cfg) * num_tokens
    attention = attention_flops_per_key(cfg) * attended_pairs(num_tokens, cfg.sliding_window)
    return batch * (linear + attention)


def decode_flops(cfg: ModelConfig, context: int, batch: int = 1) -> int:
    """Forward FLOPs for one new token per sequence that attends to ``context`` keys (itself included)."""
    keys = context if cfg.sliding_window is None else min(context, cfg.sliding_window)
    return batch * (2 * matmul_params(cfg) + attention_flops_per_key(cfg) * keys)


def model_flops(cfg: ModelConfig, context: int, batch: int = 1) -> ModelFlops:
    for name, value in (("context", context), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CubelmError(f"{name} must be a positive integer, got {value!r}")
    forward = prefill_flops(cfg, context, batch)
    return ModelFlops(
        context=context, batch=batch, matmul_params=matmul_params(cfg),
        linear_flops_per_token=2 * matmul_params(cfg),
        prefill_attention_flops=attention_flops_per_key(cfg) * attended_pairs(context, cfg.sliding_window),
        prefill_flops=forward, decode_flops=decode_flops(cfg, context, batch),
        training_flops=3 * forward, training_flops_with_recompute=4 * forward,
    )


__all__ = ["MatmulCost", "matmul_cost", "layer_linear_shapes", "matmul_params", "attention_flops_per_key",
           "attended_pairs", "ModelFlops", "prefill_flops", "decode_flops", "model_flops"]
