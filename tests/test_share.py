"""Cross-layer sharing and tied embeddings: grouping, the shared model = an unshared model holding the averaged
weights in every layer, the saved directory (smaller on disk, loaded with shared modules and per-layer KV cache),
the engine (decode layout keeps one copy per shared projection; greedy tokens = plain forward), bad input."""

import json

import pytest
import torch

from cubelm.compress.architecture import SHARED_KEY, shared_groups
from cubelm.compress.lowrank import apply_low_rank
from cubelm.compress.share import apply_sharing, layer_groups, tie_embeddings
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.hf_io import load_model, save_model
from cubelm.model.transformer import build_model

CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _logits(model):
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model(ids)


def test_layer_groups():
    assert layer_groups(4, groups=2) == [0, 0, 1, 1]
    assert layer_groups(5, groups=2) == [0, 0, 0, 1, 1]  # the first groups take the remainder
    assert layer_groups(5, every=2) == [0, 0, 1, 1, 2]
    assert layer_groups(3, groups=3) == [0, 1, 2] and layer_groups(3, groups=1) == [0, 0, 0]
    for kwargs in ({"groups": 0}, {"groups": 6}, {"every": 0}, {}, {"groups": 2, "every": 2}):
        with pytest.raises(CubelmError):
            layer_groups(5, **kwargs)


@pytest.mark.parametrize("init", ["mean", "first"])
def test_shared_model_equals_unshared_model_with_the_set_in_every_layer(init, tmp_path):
    groups = [0, 0, 0, 1, 1]
    source = build_model(CFG, seed=0).eval()
    reference = build_model(CFG, seed=0).eval()  # unshared: every layer gets its set's weights copied in
    with torch.no_grad():
        for g in set(groups):
            members = [i for i, gi in enumerate(groups) if gi == g]
            states = [source.model.layers[i].state_dict() for i in members]
            for key in states[0]:
                value = torch.stack([s[key] for s in states]).mean(0) if init == "mean" else states[0][key]
                for i in members:
                    reference.model.layers[i].state_dict(keep_vars=True)[key].copy_(value)
    shared = apply_sharing(build_model(CFG, seed=0).eval(), groups, init)
    layers = shared.model.layers
    assert layers[1].mlp is layers[0].mlp and layers[2].self_attn.q_proj is layers[0].self_attn.q_proj
    assert layers[4].input_layernorm is layers[3].input_layernorm and layers[3].mlp is not layers[0].mlp
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]  # KV cache stays per layer
    assert shared_groups(shared) == groups
    torch.testing.assert_close(_logits(shared), _logits(reference), atol=1e-5, rtol=0)
    save_model(shared, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())[SHARED_KEY] == groups
    loaded = load_model(tmp_path / "s")
    assert loaded.model.layers[2].mlp is loaded.model.layers[0].mlp and shared_groups(loaded) == groups
    torch.testing.assert_close(_logits(loaded), _logits(reference), atol=1e-5, rtol=0)


def test_tied_embeddings_and_sharing_then_low_rank(tmp_path):
    model = tie_embeddings(apply_sharing(build_model(CFG, seed=1).eval(), [0, 0, 1, 1, 1]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_low_rank(model, rank=16)  # a shared projection is factorized once and stays shared
    assert model.model.layers[1].self_attn.q_proj is model.model.layers[0].self_attn.q_proj
    want = _logits(model)
    save_model(model, tmp_path / "st")
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg[SHARED_KEY] == [0, 0, 1, 1, 1]
    assert all(name.startswith(("model.layers.0.", "model.layers.2.")) for name in cfg["cubelm_low_rank"])
    loaded = load_model(tmp_path / "st")
    assert loaded.model.layers[4].mlp.up_proj is loaded.model.layers[2].mlp.up_proj
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)


def test_decode_layout_keeps_one_copy_of_a_shared_projection():
    from cubelm.engine.decode_layout import apply_decode_layout
    model = apply_sharing(build_model(CFG, seed=2).eval(), [0, 0, 1, 1, 1])
    want = _logits(model)
    apply_decode_layout(model)
    a, b = model.model.layers[0], model.model.layers[1]
    assert a.self_attn.o_proj is b.self_attn.o_proj and a.self_attn.q_proj.fused is b.self_attn.q_proj.fused
    assert a.mlp is b.mlp and a.input_layernorm is b.input_layernorm
    torch.testing.assert_close(_logits(model), want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from compress_helpers import varied_model_dir
    return varied_model_dir(tmp_path_factory.mktemp("share"))


def test_cli_share_shrinks_on_disk_and_generates_through_llm(model_dir, tmp_path):
    from compress_helpers import greedy_llm, greedy_plain
    from helpers import cubelm
    out = tmp_path / "sh"
    r = cubelm("compress", "share", "--model", model_dir, "--out", out, "--groups", "2")
    assert r.returncode == 0, r.stderr
    assert "4 decoder layers -> 2 weight sets [0, 0, 1, 1]" in r.stdout
    src = load_model(model_dir)
    layer = sum(t.numel() for t in src.model.layers[0].state_dict().values()) * 4
    saved = (model_dir / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert 2 * layer <= saved < 2 * layer + 4096  # two layers' tensors less (+ safetensors header bytes)
    plain = load_model(out)
    assert plain.model.layers[1].mlp is plain.model.layers[0].mlp
    prompts = [[5, 17, 42, 9], [100, 3]]
    tokens, llm = greedy_llm(out, prompts, 10)
    assert tokens == [greedy_plain(plain, p, 10) for p in prompts]


def test_cli_bad_input_is_one_line(model_dir, tmp_path):
    from helpers import assert_clean_error, cubelm
    out = tmp_path / "x"
    assert_clean_error(cubelm("compress", "share", "--model", model_dir, "--out", out, "--groups", "9"),
                       "--groups must be in [1, 4]")
    assert_clean_error(cubelm("compress", "share", "--model", model_dir, "--out", out), "nothing to share")
    assert_clean_error(cubelm("compress", "share", "--model", model_dir, "--out", out, "--every", "2",
                              "--init", "first", "--groups", "2"), "not both")
    assert_clean_error(cubelm("compress", "share", "--model", model_dir, "--out", out, "--tie-embeddings"),
                       "already ties its embeddings")  # the tiny preset ties them


def test_quantize_refuses_a_shared_model(tmp_path):
    from cubelm.compress.quantized_io import save_quantized
    save_model(apply_sharing(build_model(CFG, seed=3), [0, 0, 1, 1, 1]), tmp_path / "s")
    with pytest.raises(CubelmError, match="low-rank or shared layers"):
        save_quantized(tmp_path / "s", tmp_path / "q", "int8")


def test_training_checkpoint_of_a_shared_model_round_trips(tmp_path):
    """Fine-tuning a shared directory trains the shared modules (each gets the gradients of every layer running
    it); its checkpoints store a set once and load back into the shared modules."""
    from cubelm.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
    model = apply_sharing(build_model(CFG, seed=4), [0, 0, 1, 1, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids).logsumexp(-1).mean().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is model.model.layers[1].mlp.up_proj.weight.grad
    opt.step()
    path = save_checkpoint(tmp_path / "ckpt", model, opt, TrainerState(step=1, samples=2), {})
    fresh = apply_sharing(build_model(CFG, seed=5), [0, 0, 1, 1, 1])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_checkpoint(path, fresh, fresh_opt)
    assert fresh.model.layers[4].mlp is fresh.model.layers[2].mlp
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=0, rtol=0)
