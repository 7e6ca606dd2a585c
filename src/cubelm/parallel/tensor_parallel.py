"""Tensor parallelism (Megatron style, book ch. 14) with DTensor, plus sequence parallelism for the norms (§10.6).

Per decoder layer, on the ``tp`` mesh dim:

    input_layernorm           SequenceParallel: activations sharded on the sequence dim, weight replicated
    self_attn input           all-gather the sequence (Shard(1) -> Replicate)
    q_proj, k_proj, v_proj    ColwiseParallel: each rank computes heads / tp heads (no communication)
    o_proj                    RowwiseParallel: partial sums, reduce-scattered back to sequence shards
    post_attention_layernorm  SequenceParallel
    mlp input                 all-gather the sequence
    gate_proj, up_proj        ColwiseParallel: intermediate / tp columns each
    down_proj                 RowwiseParallel, reduce-scatter to sequence shards

Embeddings are row-parallel over the vocabulary (output: sequence shards), the final norm sequence-parallel and
``lm_head`` column-parallel with replicated logits. q/k/v leave their projections as plain local tensors of
``heads / tp`` heads, so RoPE and SDPA see ordinary tensors; the only model change is the per-rank head counts the
attention module reshapes with, set here from outside.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig


def check_tp_divisible(cfg: ModelConfig, tp: int, seq_len: int | None = None) -> None:
    """Every sharded dimension must split evenly over the tp ranks; say which one does not."""
    sizes = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "intermediate_size": cfg.intermediate_size, "hidden_size": cfg.hidden_size}
    if not cfg.tie_word_embeddings:  # untied embeddings and head are sharded over the vocabulary
        sizes["vocab_size"] = cfg.vocab_size
    if seq_len is not None:
        sizes["seq_len (sequence parallel)"] = seq_len
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        divisors = [d for d in range(1, tp + 1) if all(v % d == 0 for v in sizes.values())]
        raise CubelmError(f"--tp {tp} does not divide {what}; use a tp degree that divides them all "
                          f"(here: {', '.join(map(str, divisors))})")


def _layer_plan(sp: bool) -> dict:
    seq = Shard(1) if sp else Replicate()
    plan = {
        "self_attn": PrepareModuleInput(input_layouts=(seq, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
        "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=seq),
    }
    if sp:
        plan |= {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel()}
    return plan


def apply_tp(module: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True) -> nn.Module:
    """Shard a ``CausalLM`` (or a pipeline stage module with the same names) over ``tp_mesh`` in place."""
    tp = tp_mesh.size()
    cfg: ModelConfig = module.config
    check_tp_divisible(cfg, tp)
    seq = Shard(1) if sequence_parallel else Replicate()
    tied = cfg.tie_word_embeddings
    top = {}
    if getattr(module.model, "embed_tokens", None) is not None:
        top["model.embed_tokens"] = _replicated_output(seq) if tied else \
            RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if getattr(module.model, "norm", None) is not None:
        top["model.norm"] = SequenceParallel() if sequence_parallel else None
        top["lm_head"] = _replicated_input(seq) if tied else \
            ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    parallelize_module(module, tp_mesh, {k: v for k, v in top.items() if v is not None})
    layers = module.model.layers
    for layer in (layers.values() if isinstance(layers, nn.ModuleDict) else layers):
        parallelize_module(layer, tp_mesh, _layer_plan(sequence_parallel))
        # The attention module reshapes q/k/v with these counts; each rank now holds 1/tp of the heads.
        layer.self_attn.num_heads = cfg.num_attention_heads // tp
        layer.self_attn.num_kv_heads = cfg.num_key_value_heads // tp
    return module


# NOTE: tied embeddings share one weight between a row-parallel and a column-parallel use, which cannot both
# shard it; they stay replicated (every tp rank computes the same full-vocabulary grads), and only the layouts of
# their activations are converted to and from sequence shards.
def _replicated_output(seq):
    return None if seq == Replicate() else PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=seq)


def _replicated_input(seq):
    return None if seq == Replicate() else PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),),
                                                              use_local_output=True)


# ---- the book's ch. 14 example: one linear layer, column- and row-parallel ------------------------------------
def column_parallel_linear(linear: nn.Linear, tp_mesh: DeviceMesh) -> nn.Linear:
    """Each rank keeps out_features / tp output columns of y = x·W and computes its slice of y; the slices are
    all-gathered so every rank returns the full y."""
    return parallelize_module(linear, tp_mesh, ColwiseParallel(output_layouts=Replicate()))


def row_parallel_linear(linear: nn.Linear, tp_mesh: DeviceMesh) -> nn.Linear:
    """Each rank keeps in_features / tp input rows of W and takes the matching slice of x (input sharded on its
    last dim); its x_r·W_r is a partial sum of y, and an all-reduce adds the partials."""
    return parallelize_module(linear, tp_mesh, RowwiseParallel(input_layouts=Shard(-1), output_layouts=Replicate()))
