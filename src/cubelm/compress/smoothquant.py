"""SmoothQuant: calibrate per-channel activation ranges, find the outlier channels, migrate them into the weights.

    stats = calibrate(model, tokens)                       # max |x| per input channel of every projection
    print(format_outliers(outlier_report(model, stats)))   # the outlier channels, per layer
    apply_smoothing(model, stats, alpha=0.5)               # exact in float: the model computes the same function
    apply_w8a8(model)                                      # then plain W8A8 (cubelm.compress.w8a8)

For a projection ``y = x W^T`` and any positive per-input-channel ``s``, ``y = (x / s) (W · s)^T``: the division
is folded into whatever produced ``x``, the multiplication into ``W``'s columns, and the float model is unchanged
(a test checks 1e-5). Xiao et al. choose ``s_j = max|X_j|^α / max|W_j|^(1-α)`` (α = 0.5): channel j's activation
range shrinks to ``(max|X_j| · max|W_j|)^½`` and its weight column grows to the same, so the per-token activation
scale is no longer set by a few outlier channels ("borrowing the weights' dynamic range", book §10.8.1); the
weights, quantized per output channel, absorb it.

Where ``x / s`` is folded, per decoder layer (every fold is exact):

- q/k/v input: into ``input_layernorm.weight`` (RMSNorm's output is ``g ⊙ x̂``; ``g / s`` gives ``x / s``);
  ``s`` is shared by q, k and v (one input), ``max|W_j|`` taken over the three weights.
- gate/up input: into ``post_attention_layernorm.weight`` likewise.
- down input ``silu(gate) ⊙ up``: into ``up_proj``'s rows (and bias): ``silu(g) ⊙ (u / s) = (silu(g) ⊙ u) / s``.
- o input (the heads' ``softmax · V``): into ``v_proj``'s rows (and bias); with grouped-query attention a V channel
  feeds the same channel of every query head of its group, so ``s`` is one value per V channel (maxima taken over
  the group).

The paper folds the first two (LayerNorm) only; the last two are the same identity through an elementwise product
and through attention's linearity in V, and cost nothing at inference. Rows of ``up_proj`` and ``v_proj`` divided
by ``s`` do not hurt their own quantization: weights are quantized per output row, and a row's scale absorbs it.
The scales come from ``W`` as it is when the group is smoothed: o and down first (they change v's and up's rows),
then the norms (they change q/k/v's and gate/up's columns); the activation maxima are the original model's (each
fold leaves the other groups' inputs unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS, find_linears

DEFAULT_ALPHA = 0.5
GROUPS = ("qkv", "o", "gate_up", "down")  # what each layer's smoothing touches, named by its input's consumers
_REPRESENTATIVE = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj",
                   "down": "mlp.down_proj"}


def check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise CubelmError(f"--alpha must be in [0, 1] (0: all on the activations, 1: all on the weights), "
                          f"got {alpha!r}")


@torch.no_grad()
def calibrate(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Run ``tokens (N, T)`` through the model; return ``max |x|`` over all tokens per input channel (fp32, (K,))
    of every decoder projection, keyed by its qualified name."""
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise CubelmError(f"calibration needs a non-empty (sequences, tokens) batch, got shape {tuple(tokens.shape)}")
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in find_linears(model, PROJECTIONS)]
    device = next(model.parameters()).device
    try:
        model.eval()
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in stats.items()}


def outlier_report(model: nn.Module, stats: dict[str, torch.Tensor], *, threshold: float = 6.0,
                   top: int = 5) -> list[dict]:
    """Per layer and projection input: its width, how many channels reached ``|x| > threshold`` in calibration,
    the ``top`` channels by max |x| (channel, value), the median channel's max and max / median."""
    rows = []
    for i, _layer in enumerate(model.model.layers):
        for group in GROUPS:
            amax = stats.get(f"model.layers.{i}.{_REPRESENTATIVE[group]}")
            if amax is None:
                continue
            values, idx = amax.topk(min(top, amax.numel()))
            median = float(amax.median())
            rows.append({"layer": i, "input": group, "channels": amax.numel(),
                         "outliers": int((amax > threshold).sum()),
                         "top": [(int(c), round(float(v), 3)) for c, v in zip(idx, values)],
                         "median": round(median, 4), "max_over_median": round(float(values[0]) / max(median, 1e-12),
                                                                               1)})
    return rows


def format_outliers(rows: list[dict], threshold: float = 6.0) -> str:
    lines = [f"{'layer':>5} {'input':8} {'width':>5} {f'>{threshold:g}':>5} {'max/median':>10}  top channels "
             f"(channel: max |x|)"]
    for r in rows:
        top = ", ".join(f"{c}: {v:.2f}" for c, v in r["top"])
        lines.append(f"{r['layer']:>5} {r['input']:8} {r['channels']:>5} {r['outliers']:>5} "
                     f"{r['max_over_median']:>10.1f}  {top}")
    return "\n".join(lines)


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1-α)``, clamped at 1e-5 as in the paper's code (a channel never seen
    active would otherwise get s = 0)."""
    check_alpha(alpha)
    x = act_max.float().clamp(min=1e-5)
    w = weight_max.float().clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def apply_smoothing(model: nn.Module, stats: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA,
                    groups: tuple[str, ...] = GROUPS) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant's scales into the model in place (module docstring); returns them keyed
    ``model.layers.N.GROUP``. The projections must still be float ``nn.Linear``."""
    check_alpha(alpha)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise CubelmError(f"unknown smoothing group(s) {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    scales = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for mod in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if not isinstance(mod, nn.Linear):
                raise CubelmError("smoothing needs the float model (its projections are already replaced); "
                                  "load the float source")
        prefix = f"model.layers.{i}"
        if "o" in groups:
            scales[f"{prefix}.o"] = _smooth_o(attn, stats[f"{prefix}.self_attn.o_proj"], alpha, model.config)
        if "down" in groups:
            s = smoothing_scales(stats[f"{prefix}.mlp.down_proj"], _column_max(mlp.down_proj), alpha)
            _scale_rows(mlp.up_proj, 1 / s)
            mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight))
            scales[f"{prefix}.down"] = s
        if "qkv" in groups:
            scales[f"{prefix}.qkv"] = _smooth_norm(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj),
                                                   stats[f"{prefix}.self_attn.q_proj"], alpha)
        if "gate_up" in groups:
            scales[f"{prefix}.gate_up"] = _smooth_norm(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj),
                                                       stats[f"{prefix}.mlp.gate_proj"], alpha)
    return scales


def _column_max(*linears: nn.Linear) -> torch.Tensor:
    return torch.stack([lin.weight.detach().abs().float().amax(dim=0) for lin in linears]).amax(dim=0)


def _scale_rows(linear: nn.Linear, factor: torch.Tensor) -> None:
    linear.weight.mul_(factor.to(linear.weight)[:, None])
    if linear.bias is not None:
        linear.bias.mul_(factor.to(linear.bias))


def _smooth_norm(norm: nn.Module, linears: tuple[nn.Linear, ...], act_max: torch.Tensor,
                 alpha: float) -> torch.Tensor:
    s = smoothing_scales(act_max, _column_max(*linears), alpha)
    norm.weight.div_(s.to(norm.weight))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight))
    return s


def _smooth_o(attn: nn.Module, act_max: torch.Tensor, alpha: float, cfg) -> torch.Tensor:
    """One scale per V channel (kv_heads · head_dim); o_proj's input channel h·hd + d uses its group's."""
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // kv
    x = act_max.view(kv, group, hd).amax(dim=1).flatten()  # (kv · hd,)
    w = _column_max(attn.o_proj).view(kv, group, hd).amax(dim=1).flatten()
    s = smoothing_scales(x, w, alpha)
    _scale_rows(attn.v_proj, 1 / s)
    expanded = s.view(kv, 1, hd).expand(kv, group, hd).reshape(-1)  # (heads · hd,): o_proj's input channels
    attn.o_proj.weight.mul_(expanded.to(attn.o_proj.weight))
    return s
