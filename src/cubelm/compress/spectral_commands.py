"""``cubelm analyze``: per-projection spectra of a model directory — table, JSON, PNG.

    cubelm analyze --model DIR                     # table: alpha per projection, layers outside 2-6 flagged
    cubelm analyze --model DIR --json              # the same as JSON
    cubelm analyze --model DIR --out esd.png       # ESDs per projection kind (log-log) and alpha per layer

The numbers are ``cubelm.compress.spectral``'s; matplotlib is imported only for ``--out``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class AnalyzeOptions:
    model: str | None = opt(None, help="model directory (HF format, cubelm's extensions included); default: the "
                                       "default model")
    out: str | None = opt(None, help="write a PNG of the spectral densities and alphas here", metavar="PNG")
    json: bool = opt(False, help="print JSON instead of the table")


def table(spectra) -> str:
    from cubelm.compress.spectral import ALPHA_RANGE
    lines = [f"{'projection':<36} {'shape':>10} {'alpha':>6} {'xmin':>9} {'tail':>5} {'KS':>6} {'λmax':>9} "
             f"{'MP λ+':>9} {'spikes':>6}  flag"]
    for s in spectra:
        alpha = f"{s.fit.alpha:6.2f}" if math.isfinite(s.fit.alpha) else f"{'-':>6}"
        lines.append(f"{s.name:<36} {f'{s.out_features}x{s.in_features}':>10} {alpha} {s.fit.xmin:9.3g} "
                     f"{s.fit.num_tail:>5} {s.fit.ks_distance:6.3f} {s.lambda_max:9.3g} {s.mp_edge:9.3g} "
                     f"{s.num_spikes:>6}  {s.flag}")
    alphas = [s.fit.alpha for s in spectra if math.isfinite(s.fit.alpha)]
    flagged = sum(1 for s in spectra if s.flag)
    if alphas:
        lines.append(f"mean alpha {sum(alphas) / len(alphas):.2f} over {len(alphas)} projections; {flagged} outside "
                     f"[{ALPHA_RANGE[0]:g}, {ALPHA_RANGE[1]:g}]")
    else:
        lines.append("no projection has enough nonzero eigenvalues for a power-law fit")
    return "\n".join(lines)


def plot(spectra, png: str | Path, title: str = "") -> Path:
    """One panel per projection kind with every layer's ESD (log-binned density, log-log; dashed: each fit's
    power law from xmin), and a last panel with alpha per layer and the 2-6 band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CubelmError("--out needs matplotlib (pip install matplotlib)") from None
    import torch
    from cubelm.compress.spectral import ALPHA_RANGE
    kinds = list(dict.fromkeys(s.kind for s in spectra))
    cols = 4
    rows = math.ceil((len(kinds) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.3 * rows), squeeze=False)
    layers = sorted({s.layer for s in spectra if s.layer is not None}) or [0]
    cmap = plt.get_cmap("viridis")
    for ax, kind in zip(axes.flat, kinds):
        for s in (s for s in spectra if s.kind == kind):
            eigs = s.eigs[s.eigs > s.eigs[-1] * 1e-12]
            edges = torch.logspace(math.log10(float(eigs[0])), math.log10(float(eigs[-1]) * 1.0001), 40,
                                   dtype=torch.float64)
            counts = torch.histogram(eigs, edges).hist
            dens = counts / (eigs.numel() * (edges[1:] - edges[:-1]))
            centers = (edges[1:] * edges[:-1]).sqrt()
            color = cmap(layers.index(s.layer) / max(1, len(layers) - 1)) if s.layer in layers else "k"
            keep = dens > 0
            ax.plot(centers[keep], dens[keep], color=color, lw=1, label=f"layer {s.layer}")
            if math.isfinite(s.fit.alpha):  # the fitted tail density, scaled to the tail's share of eigenvalues
                x = torch.logspace(math.log10(s.fit.xmin), math.log10(s.lambda_max), 20, dtype=torch.float64)
                share = s.fit.num_tail / eigs.numel()
                pdf = share * (s.fit.alpha - 1) / s.fit.xmin * (x / s.fit.xmin) ** (-s.fit.alpha)
                ax.plot(x, pdf, "--", color=color, lw=0.8)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_title(kind), ax.set_xlabel("eigenvalue of WᵀW/N"), ax.set_ylabel("density")
        ax.grid(alpha=0.3, which="both", lw=0.3)
    if len(layers) <= 8:
        axes.flat[0].legend(fontsize=7)
    ax = axes.flat[len(kinds)]
    for i, kind in enumerate(kinds):
        pts = [(s.layer, s.fit.alpha) for s in spectra if s.kind == kind and math.isfinite(s.fit.alpha)]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=4, lw=0.8, label=kind, color=plt.get_cmap("tab10")(i % 10))
    ax.axhspan(*ALPHA_RANGE, color="green", alpha=0.1, label="2 ≤ α ≤ 6")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer"), ax.set_ylabel("power-law α"), ax.set_title("alpha per layer")
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    for extra in list(axes.flat)[len(kinds) + 1:]:
        extra.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def run_analyze(o: AnalyzeOptions) -> int:
    from cubelm.compress.spectral import analyze_model
    from cubelm.engine.commands import resolve_model_dir
    from cubelm.model.hf_io import load_model
    model_dir = resolve_model_dir(o.model)
    spectra = analyze_model(load_model(model_dir, dtype="float32"))
    if not spectra:
        raise CubelmError(f"{model_dir} has no float projections to analyze (quantized? analyze its float source)")
    if o.out:
        plot(spectra, o.out, title=f"{Path(model_dir).name}: empirical spectral densities")
    if o.json:
        print(json.dumps({"model": str(model_dir), "projections": [s.to_dict() for s in spectra]}, indent=2))
    else:
        print(table(spectra))
        if o.out:
            print(f"[cubelm] wrote {o.out}")
    return 0
