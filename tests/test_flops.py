"""FLOP counts: a matmul against an explicit triple loop, model FLOPs worked by hand, and ``cubelm flops``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig, preset
from cubelm.systems.flops import (attended_pairs, decode_flops, matmul_cost, matmul_params, model_flops,
                                  prefill_flops)


def loop_counts(m: int, k: int, n: int) -> tuple[int, int]:
    """Multiply C = A·B the schoolbook way and count the operations it does."""
    mults = adds = 0
    for _i in range(m):
        for _j in range(n):
            acc_started = False
            for _l in range(k):
                mults += 1
                if acc_started:
                    adds += 1
                acc_started = True
    return mults, adds


@pytest.mark.parametrize("m,k,n", [(3, 4, 5), (1, 1, 1), (2, 7, 3), (6, 2, 1)])
def test_matmul_cost_matches_triple_loop(m, k, n):
    c = matmul_cost(m, k, n)
    assert (c.multiplications, c.additions) == loop_counts(m, k, n)
    assert c.flops == 2 * m * n * k


def test_matmul_cost_rejects_bad_dims():
    with pytest.raises(CubelmError):
        matmul_cost(0, 3, 4)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=8, num_key_value_heads=2), **kw})


def test_matmul_params_by_hand():
    cfg = small()  # q 64→64, k/v 64→16, o 64→64, gate/up 64→128, down 128→64, lm_head 64→100
    per_layer = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 2 * 64 * 128 + 128 * 64
    assert matmul_params(cfg) == 3 * per_layer + 64 * 100
    # llama-2-7b: everything but the embedding table and the RMSNorm weights
    big = preset("llama-2-7b")
    assert matmul_params(big) == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096


@pytest.mark.parametrize("s,w", [(1, None), (10, None), (10, 4), (10, 10), (10, 20), (7, 1)])
def test_attended_pairs_brute_force(s, w):
    expected = sum(1 for q in range(s) for k in range(s) if k <= q and (w is None or k > q - w))
    assert attended_pairs(s, w) == expected


def test_prefill_and_decode_by_hand():
    cfg = small()
    n, s = matmul_params(cfg), 10
    attn_per_pair = 3 * 2 * 2 * (8 * 8)  # layers · (q·k + p·v) · heads·head_dim
    assert prefill_flops(cfg, s) == 2 * n * s + attn_per_pair * s * (s + 1) // 2
    assert prefill_flops(cfg, s, batch=3) == 3 * prefill_flops(cfg, s)
    assert decode_flops(cfg, 7) == 2 * n + attn_per_pair * 7


def test_gqa_does_not_change_attention_flops():
    mha, gqa = small(num_key_value_heads=8), small()
    score_flops = lambda c: prefill_flops(c, 16) - 2 * matmul_params(c) * 16  # noqa: E731
    assert score_flops(mha) == score_flops(gqa)
    assert matmul_params(mha) - matmul_params(gqa) == 3 * 2 * 64 * (64 - 16)


def test_sliding_window_caps_decode_attention():
    cfg = small(model_type="mistral", sliding_window=4)
    n, attn_per_pair = matmul_params(cfg), 3 * 2 * 2 * 64
    assert decode_flops(cfg, 100) == 2 * n + attn_per_pair * 4


def test_training_is_three_times_forward_and_6n_per_token():
    cfg = preset("llama-2-7b")
    f = model_flops(cfg, 4096)
    assert f.training_flops == 3 * f.prefill_flops
    assert f.training_flops_with_recompute == 4 * f.prefill_flops
    six_n = 6 * matmul_params(cfg)
    assert six_n < f.training_flops_per_token < 1.25 * six_n  # attention adds ~20% at 4k context for 7B


def cubelm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cubelm", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_cli_flops_matmul_and_model():
    r = cubelm("flops", "--m", "3", "--k", "4", "--n", "5", "--model", "tiny", "--context", "16")
    assert r.returncode == 0, r.stderr
    assert "multiplications" in r.stdout and " 60 " in r.stdout and " 45 " in r.stdout
    assert "prefill" in r.stdout and "decode" in r.stdout


def test_cli_flops_json():
    r = cubelm("flops", "--model", "llama-2-7b", "--context", "4096", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["model"]["training_flops"] == 3 * d["model"]["prefill_flops"]


@pytest.mark.parametrize("args", [[], ["--m", "3"], ["--model", "no-such-model"], ["--m", "0", "--k", "1", "--n", "1"]])
def test_cli_flops_errors(args):
    r = cubelm("flops", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("cubelm: error: ") and r.stderr.count("\n") == 1
