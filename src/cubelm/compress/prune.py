"""Unstructured and semi-structured pruning: boolean masks over the decoder's projections, applied in place.

    masks = magnitude_masks(model, 0.5, scope="global")   # one |w| threshold over every decoder projection
    masks = magnitude_masks(model, 0.5, scope="layer")    # each projection pruned to 50% on its own
    masks = semi_structured_masks(model)                  # 2:4: in every 4 consecutive inputs of a row, keep 2
    apply_masks(model, masks)                             # weight *= mask: the zeros are real zeros

A mask is a bool tensor shaped like the weight, True = keep, keyed by the projection's qualified name
(``model.layers.0.self_attn.q_proj``). Only the decoder projections (``cubelm.model.seam.PROJECTIONS``) are
pruned: the embedding and the output head stay dense (they are tied in small models, and the head's rows are the
vocabulary, where a zero is a token the model can no longer score). Pruned weights stay in the dense tensors, so the
saved model is a standard ``model.safetensors`` with zeros: the same size on disk and the same speed on hardware
without sparse kernels; what pruning buys here is quality-per-nonzero (and what Deep Compression then encodes).

The pruned count is exact, ``round(sparsity * n)``: the smallest scores go first and ties at the threshold are
broken by position, so a bf16 checkpoint (many equal magnitudes) is not over-pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS, find_linears

Masks = dict[str, torch.Tensor]
SCOPES = ("layer", "global")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise CubelmError(f"--sparsity must be in [0, 1) (the share of weights removed), got {sparsity!r}")


def keep_largest(scores: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Bool mask shaped like ``scores``, False on exactly ``num_prune`` entries of smallest score (ties at the
    threshold broken by position)."""
    flat = scores.flatten()
    if num_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if num_prune >= flat.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(num_prune).values
    below = flat < threshold
    ties = flat == threshold
    ties[ties.nonzero().flatten()[num_prune - int(below.sum()):]] = False  # the first tied ones make up the count
    return (~(below | ties)).view_as(scores)


def _scores(linear: nn.Module, name: str, previous: Masks | None) -> torch.Tensor:
    """|w| in fp32; entries an earlier round pruned score -1, so the masks of an iterative schedule nest."""
    score = linear.weight.detach().float().abs()
    if previous is not None and name in previous:
        score = score.masked_fill(~previous[name], -1.0)
    return score


def magnitude_masks(model: nn.Module, sparsity: float, scope: str = "layer", *,
                    targets: tuple[str, ...] = PROJECTIONS, previous: Masks | None = None) -> Masks:
    """Masks that remove the ``sparsity`` share of smallest-|w| weights: per projection (``layer``) or with one
    threshold over all of them (``global``: layers with small weights lose more)."""
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise CubelmError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    linears = find_linears(model, targets)
    if not linears:
        raise CubelmError(f"the model has no projection named {', '.join(targets)} to prune")
    if scope == "layer":
        return {name: keep_largest(_scores(lin, name, previous), round(sparsity * lin.weight.numel()))
                for name, lin in linears}
    # global: one fp32 copy of every score (4 bytes per weight) to find the single threshold
    scores = [_scores(lin, name, previous) for name, lin in linears]
    flat = torch.cat([s.flatten() for s in scores])
    keep = keep_largest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores])
    return {name: k.view_as(s) for (name, _), k, s in zip(linears, keep, scores)}


def semi_structured_masks(model: nn.Module, n: int = 2, m: int = 4, *,
                          targets: tuple[str, ...] = PROJECTIONS) -> Masks:
    """N:M masks: in every group of ``m`` consecutive input weights of a row keep the ``n`` largest |w| (2:4 is what
    sparse tensor cores run; sparsity is 1 - n/m)."""
    masks = {}
    for name, lin in find_linears(model, targets):
        out_features, in_features = lin.weight.shape
        if in_features % m:
            raise CubelmError(f"{name} has {in_features} inputs, not a multiple of {m}: {n}:{m} sparsity needs "
                              f"whole groups of {m}")
        groups = lin.weight.detach().float().abs().view(out_features, in_features // m, m)
        top = groups.topk(n, dim=-1).indices  # (out, in/m, n)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        masks[name] = keep.view(out_features, in_features)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """weight *= mask for every masked projection (in place, any dtype or device)."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        weight = modules[name].weight
        weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))


def mask_gradients(model: nn.Module, masks: Masks) -> list:
    """Gradient hooks that zero the pruned entries' gradients, so optimizer moments and the clipped gradient norm
    see only the surviving weights. Returns the hook handles (``handle.remove()`` detaches them)."""
    modules = dict(model.named_modules())
    handles = []
    for name, keep in masks.items():
        weight = modules[name].weight
        mask = keep.to(device=weight.device, dtype=weight.dtype)
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


def sparsity_report(model: nn.Module, targets: tuple[str, ...] = PROJECTIONS) -> dict:
    """Zeros per projection and over all of them: ``{"total": share, "zeros": n, "weights": n, "per_layer":
    {name: share}}`` (what was measured, not what was asked)."""
    per_layer, zeros, total = {}, 0, 0
    for name, lin in find_linears(model, targets):
        z, n = int((lin.weight == 0).sum()), lin.weight.numel()
        per_layer[name] = z / n
        zeros, total = zeros + z, total + n
    return {"total": zeros / max(1, total), "zeros": zeros, "weights": total, "per_layer": per_layer}
