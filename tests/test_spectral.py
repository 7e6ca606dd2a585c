"""Spectral analysis: Gaussian matrices follow Marchenko–Pastur (edges, mean, no spikes, large alpha), planted
power-law spectra give back their exponent, the fit matches a direct CSN computation, ``cubelm analyze``."""

import json
import math
import statistics

import pytest
import torch

from cubelm.compress.spectral import (analyze_weight, eigenvalues, fit_power_law, marchenko_pastur_edges,
                                      marchenko_pastur_pdf)


def _gaussian(rows, cols, sigma, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


@pytest.mark.parametrize("rows,cols", [(1024, 512), (256, 640)])
def test_gaussian_matrix_follows_marchenko_pastur(rows, cols):
    sigma = 0.5
    spec = analyze_weight("w", _gaussian(rows, cols, sigma, seed=0))
    lo, hi = marchenko_pastur_edges(rows, cols, sigma ** 2)
    eigs = spec.eigs
    assert eigs.numel() == min(rows, cols)
    assert float(eigs.mean()) == pytest.approx(sigma ** 2, rel=0.02)  # E[tr(WᵀW/N)]/M = σ²
    assert float(eigs[0]) == pytest.approx(lo, rel=0.1) and float(eigs[-1]) == pytest.approx(hi, rel=0.05)
    assert spec.num_spikes == 0 and spec.mp_edge == pytest.approx(hi, rel=0.01)
    # the histogram follows the MP density: mass in each of 8 bins of the support within 0.02 of the law's
    edges = torch.linspace(lo, hi, 9, dtype=torch.float64)
    observed = torch.histogram(eigs.clamp(lo, hi), edges).hist / eigs.numel()
    grid = torch.linspace(lo, hi, 8001, dtype=torch.float64)
    pdf = marchenko_pastur_pdf(grid, rows, cols, sigma ** 2)
    cdf = torch.cumulative_trapezoid(pdf, grid)
    assert float(cdf[-1]) == pytest.approx(1.0, abs=0.01)
    expected = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf])[torch.arange(0, 8001, 1000)])
    assert (observed - expected).abs().max() < 0.02


def test_gaussian_matrices_have_no_heavy_tail():
    """What the fit gives on Gaussian matrices (see the module docstring): alpha is large but noisy, so the test
    takes the median over seeds; every fitted tail lies inside the MP bulk (its eigenvalues under 1.1 λ+)."""
    alphas = []
    for seed in range(6):
        spec = analyze_weight("w", _gaussian(1024, 512, 1.0, seed))
        alphas.append(spec.fit.alpha)
        assert spec.num_spikes == 0 and spec.lambda_max < 1.1 * spec.mp_edge
    assert statistics.median(alphas) > 6, alphas  # flagged: no heavy tail


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.5])
def test_planted_power_law_spectrum_gives_back_its_exponent(alpha):
    n, g = 400, torch.Generator().manual_seed(1)
    lam = (1 - torch.rand(n, generator=g, dtype=torch.float64)) ** (-1 / (alpha - 1))  # Pareto(α - 1), xmin 1
    u, _ = torch.linalg.qr(torch.randn(2 * n, n, generator=g, dtype=torch.float64))  # orthonormal columns
    w = u * (lam * 2 * n).sqrt()  # W = U diag(s): the eigenvalues of WᵀW / (2n) are lam
    torch.testing.assert_close(eigenvalues(w), lam.sort().values, rtol=1e-9, atol=0)
    spec = analyze_weight("w", w)
    assert abs(spec.fit.alpha - alpha) < 0.3, spec.fit
    assert spec.flag == "" and spec.num_spikes > 0


def test_fit_matches_a_direct_clauset_shalizi_newman_computation():
    x = (1 - torch.rand(60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)) ** -0.5 + 0.3
    xs = sorted(x.tolist())
    best = None
    for i in range(len(xs) - 10 + 1):  # every xmin leaving at least 10 points, plain Python
        tail = xs[i:]
        n = len(tail)
        a = 1 + n / sum(math.log(v / xs[i]) for v in tail)
        d = max(max(abs((k + 1) / n - (1 - (v / xs[i]) ** (1 - a))), abs(k / n - (1 - (v / xs[i]) ** (1 - a))))
                for k, v in enumerate(tail))
        if best is None or d < best[0]:
            best = (d, a, xs[i], n)
    fit = fit_power_law(x)
    assert (fit.ks_distance, fit.alpha, fit.xmin, fit.num_tail) == pytest.approx(best, rel=1e-9)
    assert math.isnan(fit_power_law(x[:5]).alpha)  # too few eigenvalues: no fit


def test_cli_analyze_table_json_png(tmp_path, capsys):
    from cubelm.cli import main
    from cubelm.compress.lowrank import apply_low_rank
    from cubelm.model.config import ModelConfig
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = build_model(cfg, seed=0)
    apply_low_rank(model, rank=40, targets=("gate_proj", "up_proj", "down_proj"))  # analyzed through B @ A
    save_model(model, tmp_path / "m")
    assert main(["analyze", "--model", str(tmp_path / "m"), "--json", "--out", str(tmp_path / "esd.png")]) == 0
    report = json.loads(capsys.readouterr().out)["projections"]
    assert len(report) == 14 and {p["kind"] for p in report} >= {"q_proj", "down_proj"}
    gate = next(p for p in report if p["name"] == "model.layers.1.mlp.gate_proj")
    assert gate["shape"] == [160, 64] and gate["num_eigenvalues"] == 64 and gate["num_tail"] <= 40
    assert (tmp_path / "esd.png").stat().st_size > 10_000
    assert main(["analyze", "--model", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert "mean alpha" in table and "model.layers.0.self_attn.q_proj" in table
    assert main(["analyze", "--model", str(tmp_path / "missing")]) == 2  # a one-line error (cli.main prints it)
    assert capsys.readouterr().err.startswith("cubelm: error: model directory")
