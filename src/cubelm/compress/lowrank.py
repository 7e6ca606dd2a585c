"""Low-rank factorization of the decoder's projections by truncated SVD: ``cubelm compress lowrank``.

    cubelm compress lowrank --model DIR --out OUT --energy 0.9       # keep 90% of each W's squared singular values
    cubelm compress lowrank --model DIR --out OUT --rank 64          # the same rank everywhere
    cubelm compress lowrank --model DIR --out OUT --size-ratio 0.5   # each factorized W at ~half its parameters

W (out, in) = U S Vᵀ; the best rank-r approximation (Eckart–Young, in Frobenius and spectral norm) keeps the r
largest singular values: W ≈ (U_r S_r^½)(S_r^½ V_rᵀ), stored as two linears, in -> r (A = S_r^½ V_rᵀ) then
r -> out (B = U_r S_r^½, with W's bias). The square-root split gives both factors the same scale, which keeps
them well conditioned for fine-tuning and for 16-bit storage. The rank is chosen per projection:

- ``--energy E``: the smallest r whose kept energy Σ_{i<r} s_i² / Σ s_i² reaches E (E = 1 keeps everything);
- ``--rank R``: R everywhere (R above min(out, in) of any projection is an error);
- ``--size-ratio F``: r = ⌊F·in·out / (in + out)⌋ (at least 1), i.e. each factorized projection holds ~F of
  its dense parameters (a uniform ratio, not a global allocation across layers).

Two factors cost r·(in + out) parameters against in·out dense, so a projection is factorized only when
r·(in + out) < in·out; otherwise it stays dense (the summary says which). The output head and the embeddings
stay dense. The saved directory is HF-shaped with cubelm's ``cubelm_low_rank`` extension in config.json
(``cubelm.compress.architecture``), which ``load_model`` / ``LLM`` / ``cubelm serve`` rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cubelm.cli import opt
from cubelm.compress.architecture import LowRankLinear, shared_groups, tie_shared_layers
from cubelm.compress.spectral import small_matrix_threads
from cubelm.errors import CubelmError
from cubelm.model.seam import PROJECTIONS, find_linears, replace_module


@dataclass(frozen=True, slots=True)
class Decision:
    """What happened to one projection."""
    name: str
    out_features: int
    in_features: int
    rank: int  # the rank chosen (the full rank min(out, in) when nothing is cut)
    kept_energy: float  # Σ_{i<rank} s_i² / Σ s_i²
    factorized: bool

    @property
    def params_before(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_after(self) -> int:
        return self.rank * (self.in_features + self.out_features) if self.factorized else self.params_before


def check_rule(energy: float | None, rank: int | None, size_ratio: float | None) -> None:
    given = [n for n, v in (("--energy", energy), ("--rank", rank), ("--size-ratio", size_ratio)) if v is not None]
    if len(given) != 1:
        raise CubelmError(f"give exactly one of --energy, --rank, --size-ratio (got {', '.join(given) or 'none'})")
    if energy is not None and not 0 < energy <= 1:
        raise CubelmError(f"--energy must be in (0, 1] (the fraction of Σ s² kept), got {energy}")
    if rank is not None and rank < 1:
        raise CubelmError(f"--rank must be >= 1, got {rank}")
    if size_ratio is not None and not 0 < size_ratio <= 1:
        raise CubelmError(f"--size-ratio must be in (0, 1] (factorized / dense parameters), got {size_ratio}")


def choose_rank(s: torch.Tensor, out_features: int, in_features: int, *, energy: float | None = None,
                rank: int | None = None, size_ratio: float | None = None, name: str = "W") -> int:
    """The rank the rule gives for singular values ``s`` (descending) of an (out, in) matrix."""
    full = min(out_features, in_features)
    if rank is not None:
        if rank > full:
            raise CubelmError(f"--rank {rank} is above min(out, in) = {full} of {name} ({out_features}x{in_features}); "
                              f"the rank of a matrix is at most its smaller dimension")
        return rank
    if size_ratio is not None:
        return max(1, min(full, int(size_ratio * out_features * in_features // (out_features + in_features))))
    if energy >= 1:
        return full
    cumulative = torch.cumsum(s.double() ** 2, 0)
    target = energy * cumulative[-1] * (1 - 1e-9)  # "reaches E" up to the rounding of the squares
    return min(full, int(torch.searchsorted(cumulative, target).item()) + 1)


def factorize(linear: nn.Linear, rank: int, svd=None) -> LowRankLinear:
    """The rank-``rank`` truncated SVD of ``linear`` as a ``LowRankLinear`` (same device and dtype)."""
    w = linear.weight.detach()
    u, s, vh = svd if svd is not None else torch.linalg.svd(w.double(), full_matrices=False)  # float64: exact
    root = s[:rank].sqrt()
    layer = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None,
                          device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer[0].weight.copy_(root[:, None] * vh[:rank])  # A = S_r^½ V_rᵀ   (r, in)
        layer[1].weight.copy_(u[:, :rank] * root[None, :])  # B = U_r S_r^½  (out, r)
        if linear.bias is not None:
            layer[1].bias.copy_(linear.bias)
    return layer


def apply_low_rank(model: nn.Module, *, energy: float | None = None, rank: int | None = None,
                   size_ratio: float | None = None, targets=PROJECTIONS,
                   dense_if_larger: bool = True) -> list[Decision]:
    """Replace the decoder's projections by their truncated SVD, in place. ``dense_if_larger=False`` factorizes
    even where two factors are not smaller (to check that full rank reproduces the model)."""
    check_rule(energy, rank, size_ratio)
    groups = shared_groups(model)  # a shared projection is factorized once, then re-tied to every layer using it
    decisions = []
    for name, linear in find_linears(model, targets):
        if type(linear) is not nn.Linear:
            raise CubelmError(f"{name} is a {type(linear).__name__}, not a dense projection; factorize the float "
                              f"model it came from")
        w = linear.weight.detach()
        with small_matrix_threads(w):  # one thread for small SVDs (busy cores make OpenMP threads wait)
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = choose_rank(s, *w.shape, energy=energy, rank=rank, size_ratio=size_ratio, name=name)
        energy_kept = float((s[:r] ** 2).sum() / (s ** 2).sum()) if s.abs().sum() > 0 else 1.0
        smaller = r * (linear.in_features + linear.out_features) < linear.in_features * linear.out_features
        decisions.append(Decision(name, linear.out_features, linear.in_features, r, energy_kept,
                                  smaller or not dense_if_larger))
        if decisions[-1].factorized:
            replace_module(model, name, factorize(linear, r, (u, s, vh)))
    if groups is not None:
        tie_shared_layers(model, groups)
    return decisions


def summary(decisions: list[Decision]) -> str:
    """One line per projection, then the totals."""
    lines = [f"{'projection':<40} {'shape':>11} {'rank':>5} {'energy':>7}  stored as"]
    for d in decisions:
        how = "two factors" if d.factorized else "dense (r·(in+out) >= in·out)"
        lines.append(f"{d.name:<40} {f'{d.out_features}x{d.in_features}':>11} {d.rank:>5} {d.kept_energy:>7.4f}  {how}")
    before, after = sum(d.params_before for d in decisions), sum(d.params_after for d in decisions)
    kept = sum(d.factorized for d in decisions)
    lines.append(f"factorized {kept}/{len(decisions)} projections ({len(decisions) - kept} left dense); projection "
                 f"parameters {before:,} -> {after:,} ({after / max(before, 1):.3f}x)")
    return "\n".join(lines)


@dataclass(slots=True, kw_only=True)
class LowrankOptions:
    model: str | None = opt(None, help="float model directory (HF format); default: the default model")
    out: str = opt(help="output directory (created; files of the same name are replaced)", metavar="DIR")
    energy: float | None = opt(None, help="keep the smallest rank whose Σ s² reaches this fraction, in (0, 1]")
    rank: int | None = opt(None, help="the same rank for every projection (at most min(out, in))")
    size_ratio: float | None = opt(None, help="each factorized projection at ~this fraction of its dense parameters, "
                                              "in (0, 1]")

    def __post_init__(self) -> None:
        check_rule(self.energy, self.rank, self.size_ratio)


def run_lowrank(o: LowrankOptions) -> int:
    from cubelm.compress.architecture import load_float_model, save_compressed, weights_bytes
    from cubelm.engine.commands import resolve_model_dir
    src = resolve_model_dir(o.model)
    model = load_float_model(src)  # the checkpoint's dtype (the SVD itself runs in float64)
    decisions = apply_low_rank(model, energy=o.energy, rank=o.rank, size_ratio=o.size_ratio)
    out = save_compressed(model, src, o.out)
    print(summary(decisions))
    print(f"[cubelm] {src} -> {out}: weights {weights_bytes(src) / 2**20:.2f} -> {weights_bytes(out) / 2**20:.2f} MiB")
    return 0
