"""W8A8 activation quantization: the exact int8 matmul, the per-token / per-channel schemes' error bounds, LLM.int8's
decomposition at its two limits, SmoothQuant's folds (the float model unchanged), and on a model with planted
outlier channels both fixes closer to fp32 than plain W8A8; the verbs' round trip and bad input."""

import copy
import json

import pytest
import torch
from torch import nn

from cubelm.compress.smoothquant import apply_smoothing, calibrate, outlier_report
from cubelm.compress.w8a8 import (EXACT_FP32_K, W8A8Linear, apply_w8a8, int8_matmul, int_mm_available,
                                  quantize_per_token)
from cubelm.model.config import ModelConfig
from cubelm.model.transformer import build_model

PLANTED = (3, 17, 42)


def _cfg(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    return ModelConfig(**(base | kw))


@torch.no_grad()
def _plant_outliers(model, channels=PLANTED, factor=50.0, compensate=False):
    """Outlier channels as trained models have them: both norms' weights scaled 50x on a few channels, so every
    token's q/k/v and gate/up input has 50x entries there. ``compensate`` divides the consuming weight columns by
    50 (the float function unchanged: SmoothQuant in reverse); without it the weights stay ordinary, as in real
    models, and the planted model is its own fp32 reference."""
    for layer in model.model.layers:
        for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj)),
                              (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            norm.weight[list(channels)] *= factor
            for lin in linears if compensate else ():
                lin.weight[:, list(channels)] /= factor
    return model


def _tokens(seed, n=8, t=32, vocab=128):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _rel_err(model, ref_logits, ids):
    with torch.no_grad():
        return float((model(ids) - ref_logits).norm() / ref_logits.norm())


@pytest.mark.parametrize("use_int_mm", [False, True])
def test_int8_matmul_is_exact(use_int_mm):
    if use_int_mm and not int_mm_available():
        pytest.skip("torch._int_mm is not available on this build")
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(5, 64, 24), (3, EXACT_FP32_K + 300, 7), (1, 2 * EXACT_FP32_K + 1, 2)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        a[0], b[:, 0] = 127, 127  # the largest possible sum, k · 127², in row 0 column 0
        got = int8_matmul(a, b, use_int_mm=use_int_mm)
        assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long())


def test_per_token_quantization_error_at_most_half_a_step():
    x = torch.randn(6, 50) * torch.rand(6, 1) * 10
    x[2] = 0
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale[2] == 0 and (codes[2] == 0).all()
    assert ((codes.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (codes.abs().amax(dim=1)[[0, 1, 3, 4, 5]] == 127).all()


def test_w8a8_linear_error_bound_and_decomposition_limits():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=True)
    x = torch.randn(3, 5, 40)
    plain = W8A8Linear.from_linear(lin)
    w_hat = plain.qweight_t.t().float() * plain.scales[:, None]  # the dequantized int8 weight
    exact = nn.functional.linear(x, w_hat, lin.bias)
    x2 = x.reshape(-1, 40)
    _, sx = quantize_per_token(x2)
    # only the activation rounding remains: at most half a step per input, times |w_hat|
    bound = (sx[:, None] / 2) * w_hat.abs().sum(dim=1)[None, :]
    assert ((plain(x).reshape(-1, 24) - exact.reshape(-1, 24)).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert (plain(x) - lin(x)).abs().max() < 0.05  # and close to the float layer
    # LLM.int8 at its limits: a threshold no |x| reaches is plain W8A8; one every column reaches is the float layer
    assert torch.equal(W8A8Linear.from_linear(lin, outlier_threshold=1e9)(x), plain(x))
    all_float = W8A8Linear.from_linear(lin, outlier_threshold=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(all_float(x), lin(x), atol=1e-5, rtol=1e-5)
    assert all_float.outlier_stats == {"calls": 1, "float_columns": 40}


@pytest.mark.parametrize("kw", [dict(mlp_bias=True), dict(model_type="qwen2", num_key_value_heads=1)])
def test_smoothing_keeps_the_float_model(kw):
    model = _plant_outliers(build_model(_cfg(**kw), seed=1), compensate=True)
    with torch.no_grad():  # biases are zero at init: make them count
        for p in model.parameters():
            if p.dim() == 1 and not torch.all(p == 1):
                p.copy_(torch.randn_like(p) * 0.1)
    ids = _tokens(2, n=2, t=16)
    with torch.no_grad():
        ref = model(ids)
    smoothed = copy.deepcopy(model)
    scales = apply_smoothing(smoothed, calibrate(smoothed, _tokens(3)), alpha=0.5)
    assert len(scales) == 4 * 2 and all((s > 0).all() for s in scales.values())
    norm = smoothed.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids), ref, atol=1e-5, rtol=0)


def test_calibration_finds_the_planted_channels():
    model = _plant_outliers(build_model(_cfg(), seed=1))
    rows = outlier_report(model, calibrate(model, _tokens(3)), threshold=6.0, top=5)
    by = {(r["layer"], r["input"]): r for r in rows}
    assert set(by) == {(i, g) for i in range(2) for g in ("qkv", "o", "gate_up", "down")}
    for i in range(2):
        for group in ("qkv", "gate_up"):
            r = by[(i, group)]
            assert r["outliers"] == len(PLANTED) and {c for c, _ in r["top"][:3]} == set(PLANTED)
            assert r["max_over_median"] > 20


def _errors(model, ids):
    with torch.no_grad():
        ref = model(ids)
    plain = _rel_err(apply_w8a8(copy.deepcopy(model)), ref, ids)
    int8 = apply_w8a8(copy.deepcopy(model), outlier_threshold=6.0)
    int8_err = _rel_err(int8, ref, ids)
    sq = copy.deepcopy(model)
    apply_smoothing(sq, calibrate(sq, _tokens(5)), alpha=0.5)  # calibrated on other tokens than the test's
    return plain, int8_err, _rel_err(apply_w8a8(sq), ref, ids), int8


@pytest.mark.parametrize("compensate", [True, False])
def test_outlier_fixes_beat_plain_w8a8_on_planted_outliers(compensate):
    ids = _tokens(4, n=4, t=32)
    clean = build_model(_cfg(), seed=1)
    with torch.no_grad():
        clean_ref = clean(ids)
    clean_err = _rel_err(apply_w8a8(clean), clean_ref, ids)  # plain W8A8 without outliers: ~0.4% on the logits
    plain, int8_err, sq_err, int8 = _errors(_plant_outliers(build_model(_cfg(), seed=1), compensate=compensate), ids)
    # the planted channels set every token's scale: plain W8A8 rounds the other channels onto a few codes
    assert plain > 5 * clean_err, (plain, clean_err)
    if compensate:  # the same float function as `clean`: both fixes bring W8A8 back to the clean model's error
        assert int8_err < plain / 5 and sq_err < plain / 5, (plain, int8_err, sq_err)
        assert int8_err < 2 * clean_err and sq_err < 2 * clean_err, (clean_err, int8_err, sq_err)
    else:  # ordinary weights next to the outlier channels: SmoothQuant moves √50 of the range into them
        assert int8_err < plain / 2 and sq_err < plain / 1.5, (plain, int8_err, sq_err)
    used = [m.outlier_stats for m in int8.modules() if isinstance(m, W8A8Linear)]
    assert max(s["float_columns"] / s["calls"] for s in used) >= len(PLANTED)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import make_tiny_model_dir
    root = tmp_path_factory.mktemp("w8a8")
    (root / "calib.txt").write_text("def add(a, b):\n    return a + b\n" * 60)
    return make_tiny_model_dir(root)


def _cli(capsys, *args):
    from helpers import cli_in_process
    return cli_in_process(capsys, *args)


def test_cli_smoothquant_round_trip_and_w8a8_report(model_dir, tmp_path, capsys):
    from cubelm import LLM, SamplingParams
    from cubelm.model.hf_io import load_model
    calib = model_dir.parent / "calib.txt"
    out = tmp_path / "sq"
    r = _cli(capsys, "compress", "smoothquant", "--model", model_dir, "--out", out, "--calib", 8, "--calib-len", 64,
             "--calib-source", calib)
    assert r.returncode == 0, r.stderr
    assert "top channels" in r.stdout and "layer" in r.stdout
    note = json.loads((out / "smoothquant.json").read_text())
    assert note["alpha"] == 0.5 and note["calibration"]["sequences"] == 8 and len(note["outliers"]) == 4 * 4
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), load_model(model_dir)(ids), atol=1e-5, rtol=0)
    outs = LLM(str(out), num_blocks=32, log=lambda m: None).generate(
        ["def add("], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 6
    r = _cli(capsys, "compress", "w8a8", "--model", out, "--method", "smoothquant", "--source", calib,
             "--max-bytes", 2000, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["smoothed_on_disk"] and "calibration" not in result["smoothquant"]  # not smoothed twice
    assert abs(result["smoothquant"]["bpb"] - result["fp32"]["bpb"]) < 0.05 * result["fp32"]["bpb"]
    assert 0 <= result["smoothquant"]["kl_nats_per_token"] < 0.05
    r = _cli(capsys, "compress", "smoothquant", "--model", out, "--out", tmp_path / "again")
    assert r.returncode == 2 and "already smoothed" in r.stderr


def test_cli_bad_input(model_dir, tmp_path, capsys):
    from helpers import assert_clean_error, cubelm

    from cubelm.compress.smoothquant import GROUPS
    from cubelm.compress.w8a8_commands import SMOOTH_GROUPS
    assert GROUPS == SMOOTH_GROUPS
    assert_clean_error(cubelm("compress", "smoothquant", "--model", model_dir, "--out", tmp_path / "x",
                              "--alpha", 1.5), "--alpha")  # one real process: the exit code and stderr as users see
    assert_clean_error(_cli(capsys, "compress", "w8a8", "--model", model_dir, "--threshold", 0), "--threshold")
    assert_clean_error(_cli(capsys, "compress", "w8a8", "--model", model_dir, "--smooth", "qkv,nope"), "--smooth")
    assert_clean_error(_cli(capsys, "compress", "w8a8", "--model", model_dir, "--calib", 0), "--calib")
