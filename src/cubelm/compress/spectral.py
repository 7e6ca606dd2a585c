"""Spectral analysis of weight matrices (weightwatcher's heavy-tailed self-regularization diagnostics).

For a projection W (out, in), N = max(out, in), M = min(out, in), the empirical spectral density (ESD) is the
distribution of the M eigenvalues of the correlation matrix X = WᵀW / N, i.e. λ_i = s_i² / N with s_i the
singular values of W (the other |out - in| eigenvalues of the larger Gram matrix are zeros and are left out).

- A random matrix with i.i.d. entries of variance σ² has no heavy tail: its ESD follows Marchenko–Pastur, supported
  on [σ²(1 - √q)², σ²(1 + √q)²] with q = M / N and mean σ² (``marchenko_pastur_edges`` / ``_pdf``).
- Training correlates the weights and the tail of the ESD becomes a power law p(λ) ∝ λ^(-α). ``fit_power_law``
  fits α the way weightwatcher does (the ``powerlaw`` package's Clauset–Shalizi–Newman method): for each candidate
  xmin among the eigenvalues, the maximum-likelihood α = 1 + n / Σ_{λ ≥ xmin} ln(λ / xmin) over the n eigenvalues
  of the tail, and the chosen xmin is the one whose fitted power law has the smallest Kolmogorov–Smirnov distance to
  the tail's empirical distribution. weightwatcher reads 2 ≤ α ≤ 6 as "well trained"; α < 2 as very heavy-tailed
  (over-fit, or a layer with few directions carrying everything) and α > 6 as close to random (under-trained).
- On a random Gaussian matrix the fitted "tail" is the top of the MP bulk, whose density falls to zero at a sharp
  edge: the ML α is large but noisy. Measured on 8 seeds per shape: (1024, 512) gives α 6.9-18.7 (median 10),
  (256, 256) 4.2-7.9, (256, 128) 3.3-13 (weightwatcher's own fitter gives the same values). So α alone does not
  certify "random" on small matrices; the MP check does: no eigenvalue clearly above λ+ (``num_spikes`` counts
  those more than 10% above it, beyond the finite-size fluctuations of the edge, ~M^(-2/3)). The tests check the
  MP edges and mean, zero spikes, a median α > 6 over seeds at (1024, 512), and α within 0.3 of the planted
  exponent on a matrix with a power-law spectrum.

The eigenvalues come from a float64 SVD: O(M²N) per matrix, ~20 ms for each of the tiny preset's projections.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from cubelm.model.seam import PROJECTIONS, find_linears

ALPHA_RANGE = (2.0, 6.0)  # weightwatcher's "well trained" band
SPIKE_MARGIN = 1.1  # a spike is above 1.1 λ+ (the edge fluctuates by ~M^(-2/3) at finite size)
MIN_TAIL = 10  # fewest eigenvalues a tail may have: smaller tails make the KS distance (and alpha) noise


SINGLE_THREAD_MAX_DIM = 1024  # matrices up to this smaller dimension are analyzed on one thread (small_matrix_threads)


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """The M eigenvalues of WᵀW / N, ascending, float64."""
    with small_matrix_threads(weight):
        s = torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))
    return (s ** 2 / max(weight.shape)).flip(0)


@contextlib.contextmanager
def small_matrix_threads(weight: torch.Tensor):
    """One thread for a small matrix: its SVD and fit gain little from threads at a few hundred columns, and when
    the cores are busy (other processes, a data loader) OpenMP threads wait on each other. Measured on the default
    model's 28 projections on the 2-core host shared with other jobs: 0.6 s on one thread, 9-28 s on two."""
    threads = torch.get_num_threads()
    if min(weight.shape) <= SINGLE_THREAD_MAX_DIM:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def marchenko_pastur_edges(rows: int, cols: int, sigma2: float) -> tuple[float, float]:
    """(λ-, λ+) of the ESD of WᵀW / N for an i.i.d. (rows, cols) matrix of entry variance ``sigma2``."""
    q = min(rows, cols) / max(rows, cols)
    return sigma2 * (1 - math.sqrt(q)) ** 2, sigma2 * (1 + math.sqrt(q)) ** 2


def marchenko_pastur_pdf(x: torch.Tensor, rows: int, cols: int, sigma2: float) -> torch.Tensor:
    """The Marchenko–Pastur density at ``x`` (0 outside the support), same normalization as ``eigenvalues``."""
    lo, hi = marchenko_pastur_edges(rows, cols, sigma2)
    q = min(rows, cols) / max(rows, cols)
    inside = (x > lo) & (x < hi)
    dens = torch.sqrt(((hi - x) * (x - lo)).clamp(min=0)) / (2 * math.pi * sigma2 * q * x.clamp(min=1e-300))
    return torch.where(inside, dens, torch.zeros_like(dens))


@dataclass(frozen=True, slots=True)
class PowerLawFit:
    alpha: float  # nan when there are too few eigenvalues to fit
    xmin: float
    num_tail: int  # eigenvalues >= xmin
    ks_distance: float


def fit_power_law(eigs: torch.Tensor, min_tail: int = MIN_TAIL) -> PowerLawFit:
    """Clauset–Shalizi–Newman: the ML exponent for each xmin candidate, the xmin of least KS distance."""
    x = eigs.detach().to("cpu", torch.float64).flatten().sort().values
    x = x[x > x[-1] * 1e-12] if x.numel() else x  # zeros (rank deficiency) are not part of any tail
    n = x.numel()
    if n < max(min_tail, 2):
        return PowerLawFit(math.nan, math.nan, n, math.nan)
    logs = x.log()
    suffix = logs.flip(0).cumsum(0).flip(0)  # suffix[i] = Σ_{j >= i} ln x_j
    cand = torch.arange(n - min_tail + 1)
    m = (n - cand).double()  # tail sizes
    denom = suffix[cand] - m * logs[cand]  # Σ ln(x_j / x_i) over the tail
    alpha = torch.where(denom > 0, 1 + m / denom.clamp(min=1e-300), torch.full_like(denom, math.inf))
    ks = torch.empty_like(alpha)
    j = torch.arange(n)
    chunk = max(1, (1 << 21) // n)  # candidates per (chunk, n) block: bounded memory for large matrices
    for start in range(0, cand.numel(), chunk):
        i = cand[start:start + chunk, None]  # (C, 1)
        rank = (j[None, :] - i).double()  # position in the tail, negative before it
        mi, a = m[start:start + chunk, None], alpha[start:start + chunk, None]
        cdf = 1 - torch.exp((1 - a) * (logs[None, :] - logs[i]))  # P(λ <= x_j) of the fitted power law
        # the empirical CDF jumps from rank/m to (rank+1)/m at x_j: the sup distance is reached at one side
        gap = torch.maximum(((rank + 1) / mi - cdf).abs(), (rank / mi - cdf).abs())
        ks[start:start + chunk] = torch.where(rank >= 0, gap, torch.zeros_like(gap)).amax(1)
    ks = torch.where(torch.isfinite(alpha), ks, torch.full_like(ks, math.inf))
    best = int(ks.argmin())
    return PowerLawFit(float(alpha[best]), float(x[best]), int(m[best]), float(ks[best]))


@dataclass(slots=True)
class LayerSpectrum:
    name: str  # model.layers.3.mlp.down_proj
    out_features: int
    in_features: int
    fit: PowerLawFit
    lambda_max: float
    mp_edge: float  # λ+ of the Marchenko–Pastur law with this matrix's entry variance
    num_spikes: int  # eigenvalues > 1.1 mp_edge: directions training put outside the random bulk
    eigs: torch.Tensor = field(repr=False)

    @property
    def layer(self) -> int | None:
        parts = self.name.split(".")
        return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def flag(self) -> str:
        a = self.fit.alpha
        if math.isnan(a):
            return "too few eigenvalues"
        if a < ALPHA_RANGE[0]:
            return "alpha < 2: very heavy tail"
        if a > ALPHA_RANGE[1]:
            return "alpha > 6: no heavy tail (random-like)"
        return ""

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "kind": self.kind, "shape": [self.out_features,
                self.in_features], "alpha": _finite(self.fit.alpha), "xmin": _finite(self.fit.xmin),
                "num_tail": self.fit.num_tail, "ks_distance": _finite(self.fit.ks_distance),
                "lambda_max": self.lambda_max, "mp_edge": self.mp_edge, "num_spikes": self.num_spikes,
                "num_eigenvalues": int(self.eigs.numel()), "flag": self.flag}


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no nan / inf


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) matrix a projection multiplies by: an ``nn.Linear``'s weight, a factorized projection's
    product; None for kinds that hold no float matrix (quantized codes)."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point() else None


@torch.no_grad()
def analyze_weight(name: str, weight: torch.Tensor) -> LayerSpectrum:
    with small_matrix_threads(weight):
        eigs = eigenvalues(weight)
        out_features, in_features = weight.shape
        sigma2 = float(weight.detach().double().pow(2).mean())
        edge = marchenko_pastur_edges(out_features, in_features, sigma2)[1]
        return LayerSpectrum(name, out_features, in_features, fit_power_law(eigs), float(eigs[-1]), edge,
                             int((eigs > SPIKE_MARGIN * edge).sum()), eigs)


def analyze_model(model: nn.Module, targets=PROJECTIONS) -> list[LayerSpectrum]:
    """One ``LayerSpectrum`` per decoder projection (a projection shared by several layers counts once)."""
    found = [(name, dense_weight(mod)) for name, mod in find_linears(model, targets)]
    return [analyze_weight(name, w) for name, w in found if w is not None]


def alpha_summary(model: nn.Module) -> dict:
    """What training records at a checkpoint: the mean alpha over all projections, the mean per decoder layer,
    and how many projections fall outside 2-6."""
    spectra = analyze_model(model)
    per_layer: dict[int, list[float]] = {}
    for s in spectra:
        if s.layer is not None and math.isfinite(s.fit.alpha):
            per_layer.setdefault(s.layer, []).append(s.fit.alpha)
    alphas = [a for values in per_layer.values() for a in values]
    return {"alpha_mean": sum(alphas) / len(alphas) if alphas else None,
            "alpha_per_layer": [sum(v) / len(v) for _, v in sorted(per_layer.items())],
            "alpha_flagged": sum(1 for s in spectra if s.flag)}
