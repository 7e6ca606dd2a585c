"""Structured pruning: remove whole attention heads or MLP neurons, so the model itself gets smaller.

    plan = plan_heads(model, sparsity=0.34)        # which query heads / KV heads each layer keeps
    small = prune_heads(model, plan)               # a new CausalLM: num_attention_heads (and maybe KV heads) shrink
    plan = plan_neurons(model, sparsity=0.5)
    small = prune_neurons(model, plan)             # intermediate_size shrinks

Llama-family configs have one ``num_attention_heads``, one ``num_key_value_heads`` and one ``intermediate_size``
for every layer, so every layer loses the same number; the result is a standard HF directory (``config.json``
with the smaller counts, ``head_dim`` written explicitly since heads x head_dim no longer equals hidden_size) that
transformers and ``cubelm.model.hf_io.load_model`` load as any other.

Importance (the smallest go; a data-free criterion, as magnitude pruning is):

- a query head: the L2 norm of its weights, the ``head_dim`` rows of ``q_proj`` (and bias) and the ``head_dim``
  columns of ``o_proj`` it owns; a KV group: the norm of its query heads' weights plus its ``k_proj``/``v_proj`` rows;
- a neuron: the L2 norm of its ``gate_proj`` and ``up_proj`` rows (and biases) and its ``down_proj`` column.

GQA stays consistent by construction. ``unit="query"`` (the default when a KV head serves several query heads)
drops the same number of query heads from every KV group and keeps every KV head: the KV cache keeps its size,
the attention compute and the q/o weights shrink. ``unit="group"`` (forced for MHA, where each head is its own
group) drops whole KV groups with all their query heads: the KV cache shrinks too. ``sparsity`` is the share of
query heads removed, rounded to the nearest whole unit (halves down).

``mask_heads`` / ``mask_neurons`` are the dense reference: the same model with those heads / neurons zeroed in
place. A pruned model computes the same logits as its masked original (a test checks it to 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.transformer import CausalLM

HEAD_UNITS = ("auto", "query", "group")


@dataclass(frozen=True, slots=True)
class HeadPlan:
    """Per layer, the query heads and KV heads kept (ascending indices; the query heads of KV head j stay in j's
    group, so the kept list is grouped as GQA needs)."""
    query: list[torch.Tensor]
    kv: list[torch.Tensor]


@dataclass(frozen=True, slots=True)
class NeuronPlan:
    keep: list[torch.Tensor]  # per layer, kept intermediate neurons (ascending)


# ---- importance --------------------------------------------------------------------------------------------------
def head_importance(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """((num_heads,) query-head norms, (num_kv_heads,) KV-group norms), fp32."""
    H, KV, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj.weight.detach().float().view(H, D, -1).pow(2).sum((1, 2))
    q += attn.o_proj.weight.detach().float().view(-1, H, D).pow(2).sum((0, 2))
    kv = torch.zeros(KV, device=q.device)
    for proj in (attn.k_proj, attn.v_proj):
        kv += proj.weight.detach().float().view(KV, D, -1).pow(2).sum((1, 2))
        if proj.bias is not None:
            kv += proj.bias.detach().float().view(KV, D).pow(2).sum(1)
    if attn.q_proj.bias is not None:
        q += attn.q_proj.bias.detach().float().view(H, D).pow(2).sum(1)
    return q.sqrt().cpu(), (kv + q.view(KV, H // KV).sum(1)).sqrt().cpu()


def neuron_importance(mlp: nn.Module) -> torch.Tensor:
    """(intermediate_size,) norms of each neuron's gate/up rows and down column, fp32."""
    score = mlp.down_proj.weight.detach().float().pow(2).sum(0)
    for proj in (mlp.gate_proj, mlp.up_proj):
        score += proj.weight.detach().float().pow(2).sum(1)
        if proj.bias is not None:
            score += proj.bias.detach().float().pow(2)
    return score.sqrt().cpu()


def round_half_down(x: float) -> int:
    """Nearest integer, halves down: a share that falls between two whole units never removes more than asked
    (Python's round(1.5) is 2, which would take 2 of 3 heads for --sparsity 0.5)."""
    return math.ceil(x - 0.5)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ascending (the kept units stay in their original order)."""
    return scores.topk(k).indices.sort().values


# ---- plans -------------------------------------------------------------------------------------------------------
def resolve_head_unit(unit: str, num_heads: int, num_kv_heads: int) -> str:
    if unit not in HEAD_UNITS:
        raise CubelmError(f"--head-unit must be one of {', '.join(HEAD_UNITS)}, got {unit!r}")
    if unit == "auto":
        return "query" if num_heads > num_kv_heads else "group"
    if unit == "query" and num_heads == num_kv_heads:
        raise CubelmError("--head-unit query keeps every KV head, but this model is MHA (one query head per KV "
                          "head): use --head-unit group (or auto)")
    return unit


def heads_to_remove(num_heads: int, num_kv_heads: int, unit: str, sparsity: float | None = None,
                    count: int | None = None) -> int:
    """Query heads removed per layer: ``count``, or ``sparsity`` x heads rounded to whole units (a query head per
    KV group with ``query``, a whole group with ``group``); checked against what exists."""
    group = num_heads // num_kv_heads
    step = num_kv_heads if unit == "query" else group  # query heads per removable unit, over the layer
    if count is None:
        count = round_half_down(sparsity * num_heads / step) * step
    if count < 0 or count >= num_heads:
        raise CubelmError(f"cannot remove {count} attention heads per layer: each layer has {num_heads} "
                          f"(at least one must stay)")
    if count % step:
        what = (f"the same number from each of the {num_kv_heads} KV groups" if unit == "query"
                else f"whole KV groups of {group} query heads")
        raise CubelmError(f"cannot remove {count} heads per layer with --head-unit {unit}: it removes {what}, so the "
                          f"count must be a multiple of {step}")
    return count


def plan_heads(model: CausalLM, sparsity: float | None = None, *, count: int | None = None,
               unit: str = "auto") -> HeadPlan:
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    unit = resolve_head_unit(unit, H, KV)
    removed = heads_to_remove(H, KV, unit, sparsity, count)
    G = H // KV
    query, kv = [], []
    for layer in model.model.layers:
        head_score, group_score = head_importance(layer.self_attn)
        if unit == "query":  # the best (G - removed/KV) heads of each group; every KV head stays
            keep_per_group = G - removed // KV
            kept = [_top(head_score[j * G:(j + 1) * G], keep_per_group) + j * G for j in range(KV)]
            query.append(torch.cat(kept))
            kv.append(torch.arange(KV))
        else:  # the best groups, with all their query heads
            groups = _top(group_score, KV - removed // G)
            query.append((groups[:, None] * G + torch.arange(G)).flatten())
            kv.append(groups)
    return HeadPlan(query, kv)


def neurons_to_remove(size: int, sparsity: float | None = None, count: int | None = None) -> int:
    """MLP neurons removed per layer: ``count``, or ``sparsity`` x ``size`` rounded; checked against ``size``."""
    if count is None:
        count = round_half_down(sparsity * size)
    if count < 0 or count >= size:
        raise CubelmError(f"cannot remove {count} MLP neurons per layer: each layer has {size} "
                          f"(at least one must stay)")
    return count


def plan_neurons(model: CausalLM, sparsity: float | None = None, *, count: int | None = None) -> NeuronPlan:
    size = model.config.intermediate_size
    count = neurons_to_remove(size, sparsity, count)
    return NeuronPlan([_top(neuron_importance(layer.mlp), size - count) for layer in model.model.layers])


# ---- surgery: a new, smaller model -------------------------------------------------------------------------------
def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units of ``size`` rows: heads -> their head_dim rows."""
    return (units[:, None] * size + torch.arange(size)).flatten()


def _rebuild(model: CausalLM, cfg, state: dict[str, torch.Tensor]) -> CausalLM:
    """A CausalLM of ``cfg`` holding ``state`` (built on meta, tensors assigned: no throwaway initialization)."""
    from cubelm.model.layers import rope_inv_freq
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        new = CausalLM(cfg)
    new.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    new.tie_weights()
    new.model.rotary_emb.inv_freq = rope_inv_freq(cfg).to(model.model.rotary_emb.inv_freq.device)
    return new.train(model.training)


def prune_heads(model: CausalLM, plan: HeadPlan) -> CausalLM:
    """The model without the heads ``plan`` drops (a new model; ``model`` is left as it was)."""
    cfg, D = model.config, model.config.head_dim
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, (query, kv) in enumerate(zip(plan.query, plan.kv)):
        p = f"model.layers.{i}.self_attn."
        device = state[p + "q_proj.weight"].device
        q_rows, kv_rows = _rows(query, D).to(device), _rows(kv, D).to(device)
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for t in ("weight", "bias"):
                if p + f"{name}.{t}" in state:
                    state[p + f"{name}.{t}"] = state[p + f"{name}.{t}"][rows]
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, q_rows]
    new_cfg = cfg.replace(num_attention_heads=len(plan.query[0]), num_key_value_heads=len(plan.kv[0]), head_dim=D)
    return _rebuild(model, new_cfg, state)


def prune_neurons(model: CausalLM, plan: NeuronPlan) -> CausalLM:
    """The model without the MLP neurons ``plan`` drops (a new model)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, keep in enumerate(plan.keep):
        p = f"model.layers.{i}.mlp."
        keep = keep.to(state[p + "down_proj.weight"].device)
        for name in ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias"):
            if p + name in state:
                state[p + name] = state[p + name][keep]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, keep]
    return _rebuild(model, model.config.replace(intermediate_size=len(plan.keep[0])), state)


# ---- the dense reference: zero what the plan drops, in place -----------------------------------------------------
def _dropped(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@torch.no_grad()
def mask_heads(model: CausalLM, plan: HeadPlan) -> None:
    """Zero the dropped heads' q rows, o columns and (for dropped groups) k/v rows: the heads then add nothing."""
    cfg, D = model.config, model.config.head_dim
    for layer, query, kv in zip(model.model.layers, plan.query, plan.kv):
        attn = layer.self_attn
        q_rows = _rows(_dropped(query, cfg.num_attention_heads), D)
        kv_rows = _rows(_dropped(kv, cfg.num_key_value_heads), D)
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0


@torch.no_grad()
def mask_neurons(model: CausalLM, plan: NeuronPlan) -> None:
    """Zero the dropped neurons' gate/up rows and down columns."""
    for layer, keep in zip(model.model.layers, plan.keep):
        mlp = layer.mlp
        drop = _dropped(keep, mlp.down_proj.weight.shape[1])
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[drop] = 0
            if proj.bias is not None:
                proj.bias[drop] = 0
        mlp.down_proj.weight[:, drop] = 0
