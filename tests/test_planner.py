"""Memory planner: the book's numbers, formulas worked by hand on small shapes, and the ``cubelm plan`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig, preset
from cubelm.systems.memory import (activation_bytes, dtype_bytes, kv_cache_bytes, kv_cache_bytes_per_token,
                                   lora_params, nf4_base_bytes, parse_bytes, plan_kv_pool, training_states,
                                   weight_bytes)
from cubelm.systems.plan import plan_memory

LLAMA2_7B_PARAMS = 6_738_415_616


def small(**kw) -> ModelConfig:
    # h=64, 8 heads of 8, i=128, 3 layers, vocab 100
    return ModelConfig(**{**dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=8), **kw})


# ---- the book's numbers -----------------------------------------------------------------------------------------
def test_llama2_7b_fp16_weights():
    cfg = preset("llama-2-7b")
    assert cfg.num_params() == LLAMA2_7B_PARAMS
    assert weight_bytes(cfg, "float16") == 13_476_831_232 == 2 * LLAMA2_7B_PARAMS


def test_llama2_7b_kv_cache_is_the_books_2gb():
    # §10.5: 1 × 4096 × 2 × 32 × 4096 × 2 bytes
    cfg = preset("llama-2-7b")
    assert kv_cache_bytes(cfg, "fp16", tokens=4096, batch=1) == 1 * 4096 * 2 * 32 * 4096 * 2 == 2_147_483_648
    assert kv_cache_bytes_per_token(cfg, "float16") == 2 * 32 * 4096 * 2


def test_full_training_is_16_bytes_per_param_and_book_rule_112gb():
    cfg = preset("llama-2-7b")
    plan = plan_memory(cfg, model="llama-2-7b", mode="full", dtype="float16")
    assert plan.states.total == 16 * LLAMA2_7B_PARAMS == 107_814_649_856
    assert plan.book_rule()[1] == 112_000_000_000  # §1.3: "to train a 7B parameter model, you will need 112GB"
    s = plan.states
    assert (s.weights, s.gradients, s.master_weights, s.adam_moments) == (
        2 * LLAMA2_7B_PARAMS, 2 * LLAMA2_7B_PARAMS, 4 * LLAMA2_7B_PARAMS, 8 * LLAMA2_7B_PARAMS)


def test_fp32_training_is_also_16_bytes_per_param_without_master_copy():
    cfg = small()
    n = cfg.num_params()
    s = training_states(cfg, "full", "float32")
    assert (s.weights, s.gradients, s.master_weights, s.adam_moments, s.total) == (4 * n, 4 * n, 0, 8 * n, 16 * n)


# ---- dtypes and byte strings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [("float32", 4), ("fp32", 4), ("float16", 2), ("fp16", 2), ("half", 2),
                                           ("bfloat16", 2), ("bf16", 2), ("torch.bfloat16", 2), ("int8", 1),
                                           ("fp8", 1), ("int4", 0.5), ("nf4", 0.5)])
def test_dtype_bytes(name, expected):
    assert dtype_bytes(name) == expected


def test_unknown_dtype_raises():
    with pytest.raises(CubelmError, match="unknown dtype"):
        dtype_bytes("float12")


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20),
                                           ("1073741824", 2**30), ("1.5GB", 1_500_000_000), ("16g", 16 * 2**30),
                                           ("2e9", 2 * 10**9), ("4kb", 4000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "12XB", "GB", "1.2.3GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(CubelmError):
        parse_bytes(text)


# ---- formulas on other shapes ------------------------------------------------------------------------------------
def test_gqa_kv_cache_shrinks_by_heads_over_kv_heads():
    mha, gqa = small(), small(num_key_value_heads=2)
    # 2 (K, V) × 3 layers × kv_heads × head_dim 8 × 2 bytes
    assert kv_cache_bytes_per_token(mha, "float16") == 2 * 3 * 8 * 8 * 2 == 768
    assert kv_cache_bytes_per_token(gqa, "float16") == 2 * 3 * 2 * 8 * 2 == 192
    assert kv_cache_bytes(mha, "bf16", 100, 3) == 4 * kv_cache_bytes(gqa, "bf16", 100, 3) == 3 * 100 * 768
    mqa = small(num_key_value_heads=1)
    assert kv_cache_bytes_per_token(mqa, "float32") == 2 * 3 * 1 * 8 * 4


def test_activation_formula_by_hand():
    cfg = small(num_key_value_heads=2)  # h=64, q=64, kv=16, i=128, heads=8, V=100, L=3
    est = activation_bytes(cfg, "float16", context=8, batch=2)
    tokens, p = 16, 2
    per_token_layer = p * (4 * 64 + 2 * 64 + 2 * 16 + 4 * 128) + 2 * 4 + 4 * 8  # saved tensors + rstd + lse
    per_layer = tokens * per_token_layer
    head = tokens * (p * 2 * 64 + 4 + 100 * (p + 4))  # final norm in/out, bf16 logits + fp32 log-probs
    assert est.per_layer == per_layer == 30_336
    assert est.head == head == 13_760
    assert est.without_checkpointing == 3 * per_layer + head
    assert est.with_checkpointing == 3 * tokens * 64 * p + per_layer + head
    assert est.naive_scores_per_layer == 2 * 8 * 8 * 8 * p  # batch × heads × s × s × bytes
    naive = activation_bytes(cfg, "float16", context=8, batch=2, attention="naive")
    assert naive.without_checkpointing == est.without_checkpointing + 3 * est.naive_scores_per_layer
    lora = activation_bytes(cfg, "float16", context=8, batch=2, lora_rank=4)
    assert lora.per_layer == per_layer + tokens * p * 7 * 4


def test_checkpointing_saves_memory_on_a_real_shape():
    est = activation_bytes(preset("llama-2-7b"), "bf16", context=4096)
    assert est.with_checkpointing < est.without_checkpointing / 5


# ---- LoRA / QLoRA ---------------------------------------------------------------------------------------------------
def test_lora_params_by_hand_and_peft_reference():
    cfg = small(num_key_value_heads=2)
    r = 4  # q (64→64), k/v (64→16), o (64→64), gate/up (64→128), down (128→64): r·(in+out) each
    per_layer = r * ((64 + 64) + 2 * (64 + 16) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora_params(cfg, r) == 3 * per_layer == 11_904
    assert lora_params(preset("llama-2-7b"), 8) == 19_988_480  # what PEFT prints for all-linear r=8


def test_lora_breakdown():
    cfg = small(num_key_value_heads=2)
    s = training_states(cfg, "lora", "bf16", lora_rank=4)
    assert s.weights == 2 * cfg.num_params()  # frozen base in bf16, no grads or moments for it
    assert (s.adapter_weights, s.gradients, s.master_weights, s.adam_moments) == (4 * 11_904, 4 * 11_904, 0,
                                                                                   8 * 11_904)
    assert s.total == 2 * cfg.num_params() + 16 * 11_904


def test_qlora_breakdown():
    cfg = small(num_key_value_heads=2)
    linear = 3 * (64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 128)
    assert linear == 104_448
    # per tensor, as cubelm.compress.nf4 stores it: NF4 codes (4 bits) + an int8 absmax per 64 weights + an fp32
    # scale per 256 absmaxes (a partial block of 256 still has one) + the fp32 mean of the absmaxes
    q_o = 64 * 64 // 2 + 64 + 4 + 4  # 4096 weights: 64 blocks, one scale block
    k_v = 64 * 16 // 2 + 16 + 4 + 4
    mlp = 64 * 128 // 2 + 128 + 4 + 4
    nf4 = 3 * (2 * q_o + 2 * k_v + 3 * mlp)
    assert nf4 == 54_024  # vs 53,882 for 4.127 bits × all 104,448 weights as one tensor
    rest = cfg.num_params() - linear  # embeddings, lm_head, norms stay bf16
    expected_base = nf4 + 2 * rest
    assert nf4_base_bytes(cfg, "bf16") == expected_base
    s = training_states(cfg, "qlora", "bf16", lora_rank=4)
    assert s.weights == expected_base
    assert s.total == expected_base + 16 * 11_904


def test_qlora_7b_base_is_about_4_127_bits():
    cfg = preset("llama-2-7b")
    base = nf4_base_bytes(cfg, "bf16")
    assert 3.8e9 < base < 3.95e9  # 6.48B linear weights at 4.127 bits + 262M embedding/head params at 16 bits


def test_full_training_rejects_integer_dtype():
    with pytest.raises(CubelmError, match="float32, float16 or bfloat16"):
        training_states(small(), "full", "int8")


# ---- KV pool ---------------------------------------------------------------------------------------------------
def test_plan_kv_pool():
    cfg = small(num_key_value_heads=2)  # 192 B/token in fp16
    pool = plan_kv_pool(cfg, 10 * 16 * 192 + 100, block_size=16, dtype="float16", max_model_len=50)
    assert pool.bytes_per_block == 16 * 192
    assert (pool.num_blocks, pool.num_tokens) == (10, 160)
    assert pool.blocks_per_seq == 4  # ceil(50 / 16)
    assert pool.max_num_seqs == 2
    pool.check_fits_one_sequence()


def test_plan_kv_pool_too_small():
    cfg = small(num_key_value_heads=2)
    pool = plan_kv_pool(cfg, 3 * 16 * 192, block_size=16, dtype="float16", max_model_len=64)
    assert (pool.num_blocks, pool.max_num_seqs) == (3, 0)
    with pytest.raises(CubelmError, match="max_model_len"):
        pool.check_fits_one_sequence()
    with pytest.raises(CubelmError):
        plan_kv_pool(cfg, -1, dtype="float16", max_model_len=64)


# ---- the plan: totals and verdicts ---------------------------------------------------------------------------------
def test_fits_and_does_not_fit():
    cfg = small()
    total = plan_memory(cfg, context=32).total
    assert total == weight_bytes(cfg, "float16") + kv_cache_bytes(cfg, "float16", 32) + \
        activation_bytes(cfg, "float16", 32).inference_peak
    ok = plan_memory(cfg, context=32, device_memory=total)
    assert ok.fits and ok.headroom == 0 and ok.verdict.startswith("fits")
    short = plan_memory(cfg, context=32, device_memory=total - 1)
    assert short.fits is False and short.verdict.startswith("does not fit (short by 1 bytes")
    assert plan_memory(cfg, context=32).fits is None


def test_plan_rows_and_dict():
    plan = plan_memory(preset("llama-2-7b"), model="llama-2-7b", device_memory=24 * 2**30)
    labels = [r[0] for r in plan.rows()]
    assert "total" in labels and "device memory" in labels
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["kv_cache"] == 2_147_483_648 and d["fits"] is True and d["kv_pool"]["max_num_seqs"] >= 1


# ---- the CLI ------------------------------------------------------------------------------------------------------
def cubelm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cubelm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def test_cli_plan_prints_books_kv_cache():
    r = cubelm("plan", "--model", "llama-2-7b", "--dtype", "float16", "--context", "4096", "--batch", "1")
    assert r.returncode == 0, r.stderr
    kv_line = next(line for line in r.stdout.splitlines() if line.startswith("KV cache (float16)"))
    assert "2,147,483,648" in kv_line
    assert "13,476,831,232" in r.stdout


def test_cli_plan_full_training():
    r = cubelm("plan", "--model", "llama-2-7b", "--dtype", "float16", "--mode", "full")
    assert r.returncode == 0, r.stderr
    assert "107,814,649,856" in r.stdout and "107.81 GB" in r.stdout
    assert "112,000,000,000" in r.stdout and "112.00 GB" in r.stdout


def test_cli_plan_json():
    r = cubelm("plan", "--model", "llama-2-7b", "--mode", "qlora", "--dtype", "bf16", "--device-memory", "24GiB",
               "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["device_memory"] == 24 * 2**30 and d["mode"] == "qlora" and isinstance(d["fits"], bool)


def test_cli_does_not_import_torch():
    code = ("import sys; from cubelm.cli import main; main(['plan', '--model', 'tiny']); "
            "assert 'torch' not in sys.modules, 'planner imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case", ["unknown-preset", "malformed-json", "wrong-type", "bad-memory", "zero-memory"])
def test_cli_errors_are_one_line(case, tmp_path):
    bad = tmp_path / "config.json"
    args = ["--model", "llama-2-7b"]
    if case == "unknown-preset":
        args = ["--model", "llama-99b"]
    elif case == "malformed-json":
        bad.write_text('{"model_type": "llama", "vocab_size": ')
        args = ["--model", str(bad)]
    elif case == "wrong-type":
        bad.write_text(json.dumps(dict(model_type="llama", vocab_size=10, hidden_size="wide", intermediate_size=8,
                                       num_hidden_layers=1, num_attention_heads=2)))
        args = ["--model", str(tmp_path)]
    elif case == "bad-memory":
        args += ["--device-memory", "24 gigs"]
    else:
        args += ["--device-memory", "0"]
    r = cubelm("plan", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("cubelm: error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
