"""Low-rank factorization: the rank rules, full rank = the original model, truncation error = Eckart–Young, the
saved directory through load_model and the engine (greedy tokens = plain forward), bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cubelm.compress.architecture import LOW_RANK_KEY, LowRankLinear
from cubelm.compress.lowrank import apply_low_rank, choose_rank, factorize
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.hf_io import load_model, save_model
from cubelm.model.transformer import build_model

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _logits(model, seed=0):
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(ids)


def test_full_rank_factorization_reproduces_the_model_and_round_trips(tmp_path):
    model = build_model(CFG, seed=0).eval()
    want = _logits(model)
    decisions = apply_low_rank(model, energy=1.0, dense_if_larger=False)  # factorize even where not smaller
    assert len(decisions) == 7 * CFG.num_hidden_layers and all(d.factorized for d in decisions)
    assert all(d.rank == min(d.out_features, d.in_features) for d in decisions)
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)
    save_model(model, tmp_path / "lr")
    cfg = json.loads((tmp_path / "lr" / "config.json").read_text())
    assert cfg[LOW_RANK_KEY]["model.layers.0.self_attn.k_proj"] == CFG.kv_size
    keys = load_file(tmp_path / "lr" / "model.safetensors").keys()
    assert {"model.layers.0.mlp.down_proj.0.weight", "model.layers.0.mlp.down_proj.1.weight"} <= keys
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    loaded = load_model(tmp_path / "lr")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, LowRankLinear)
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)


def test_energy_one_keeps_every_projection_dense_and_the_model_identical():
    model = build_model(CFG, seed=1).eval()
    want = _logits(model)
    decisions = apply_low_rank(model, energy=1.0)
    assert decisions and not any(d.factorized for d in decisions)
    assert all(d.kept_energy == pytest.approx(1.0) for d in decisions)
    assert all(type(m) is nn.Linear for _, m in model.named_modules() if m.__class__.__name__.endswith("Linear"))
    assert torch.equal(_logits(model), want)


def test_truncation_error_is_the_dropped_singular_values():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 80, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 48, generator=g))
    s = torch.linalg.svdvals(linear.weight.detach().double())
    for r in (1, 7, 30):
        approx = factorize(linear, r)
        assert approx[0].weight.shape == (r, 48) and approx[1].weight.shape == (80, r)
        err = torch.linalg.matrix_norm(approx.dense_weight().detach().double() - linear.weight.detach().double())
        assert float(err) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-5)  # Eckart–Young
        x = torch.randn(3, 48, generator=g)
        torch.testing.assert_close(approx(x), x @ approx.dense_weight().T + linear.bias)


def test_rank_rules():
    # s² = 4, 3, 2, 1: cumulative energy 0.4, 0.7, 0.9, 1.0
    s = torch.tensor([2.0, 3 ** 0.5, 2 ** 0.5, 1.0], dtype=torch.float64)
    assert [choose_rank(s, 4, 9, energy=e) for e in (0.3, 0.4, 0.7, 0.71, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3, 4, 4]
    assert choose_rank(s, 4, 9, rank=3) == 3
    assert choose_rank(s, 100, 300, size_ratio=0.5) == 0.5 * 100 * 300 // 400
    assert choose_rank(s, 4, 9, size_ratio=0.01) == 1
    with pytest.raises(CubelmError, match="above min"):
        choose_rank(s, 4, 9, rank=5)


def test_a_projection_is_factorized_only_when_two_factors_are_smaller():
    model = build_model(CFG, seed=2)
    # q/o are 64x64: rank 32 costs 32·128 = 64·64 (not smaller: dense); k/v 32x64 (rank 32 = full: dense);
    # gate/up/down 160x64: 32·224 < 160·64 (factorized)
    decisions = {d.name.rsplit(".", 1)[-1]: d for d in apply_low_rank(model, rank=32)}
    assert {k for k, d in decisions.items() if d.factorized} == {"gate_proj", "up_proj", "down_proj"}
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert sum(d.params_after for d in decisions.values()) < sum(d.params_before for d in decisions.values())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from compress_helpers import varied_model_dir
    return varied_model_dir(tmp_path_factory.mktemp("lowrank"))


def test_cli_lowrank_generates_through_llm_like_the_plain_forward(model_dir, tmp_path):
    from compress_helpers import greedy_llm, greedy_plain
    from helpers import cubelm

    from cubelm.engine.decode_layout import BlockedLinear
    out = tmp_path / "lr"
    r = cubelm("compress", "lowrank", "--model", model_dir, "--out", out, "--energy", "0.8")
    assert r.returncode == 0, r.stderr
    assert "two factors" in r.stdout and "projection parameters" in r.stdout
    assert (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size
    plain = load_model(out)
    factored = [n for n, m in plain.named_modules() if isinstance(m, LowRankLinear)]
    assert factored and set(factored) == set(json.loads((out / "config.json").read_text())[LOW_RANK_KEY])
    prompts = [[5, 17, 42, 9], [100, 3]]
    tokens, llm = greedy_llm(out, prompts, 10)
    assert tokens == [greedy_plain(plain, p, 10) for p in prompts]
    # the engine's decode layout: factorized projections stay unfused, their two factors are BlockedLinear
    engine_model = llm.engine.runner.model
    lr = engine_model.model.layers[0].mlp.gate_proj
    assert isinstance(lr, LowRankLinear) and all(type(f) is BlockedLinear for f in lr)


def test_cli_bad_input_is_one_line(model_dir, tmp_path):
    from helpers import assert_clean_error, cubelm
    out = tmp_path / "x"
    assert_clean_error(cubelm("compress", "lowrank", "--model", model_dir, "--out", out, "--rank", "300"),
                       "--rank 300 is above min(out, in) = 256")
    assert_clean_error(cubelm("compress", "lowrank", "--model", model_dir, "--out", out, "--energy", "1.5"),
                       "--energy must be in (0, 1]")
    assert_clean_error(cubelm("compress", "lowrank", "--model", model_dir, "--out", out), "give exactly one of")
    assert_clean_error(cubelm("compress", "lowrank", "--model", model_dir, "--out", model_dir, "--rank", "8"),
                       "is the source directory")
