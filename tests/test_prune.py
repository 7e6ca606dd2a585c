"""Pruning: masks at the requested pattern and sparsity, structured pruning = the masked original, saved
directories that cubelm, transformers and the engine load, bad input as one-line errors."""

import copy
import json

import pytest
import torch

from cubelm.cli import main
from cubelm.compress.prune import (apply_masks, keep_largest, magnitude_masks, semi_structured_masks,
                                   sparsity_report)
from cubelm.compress.structured import mask_heads, mask_neurons, plan_heads, plan_neurons, prune_heads, prune_neurons
from cubelm.errors import CubelmError
from cubelm.model.config import ModelConfig
from cubelm.model.hf_io import load_model, save_model
from cubelm.model.seam import find_linears
from cubelm.model.transformer import build_model
from helpers import assert_clean_error, cubelm, make_tiny_model_dir

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
SHAPES = {  # (model_type, attention): GQA, MHA, MQA, and biases on every projection that can have one
    "gqa": ("llama", dict(num_attention_heads=6, num_key_value_heads=2)),
    "mha-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mqa-qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
}


def _model(shape="gqa", seed=0):
    model_type, kw = SHAPES[shape]
    model = build_model(ModelConfig(model_type=model_type, **BASE, **kw), seed=seed).eval()
    with torch.no_grad():  # init_weights zeroes biases: randomize them so slicing them is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def _ids(seed=1):
    return torch.randint(0, BASE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(seed))


# ---- unstructured and 2:4 ----------------------------------------------------------------------------------------
def test_keep_largest_prunes_exactly_k_even_with_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 1.0, 0.5])
    keep = keep_largest(scores, 3)
    assert int((~keep).sum()) == 3
    assert not keep[6] and keep[0] and keep[4]  # 0.5 goes first, then two of the tied 1.0s
    bf16 = torch.randn(4096).bfloat16().float().abs()  # bf16 has ~256 values per octave: many ties
    assert int((~keep_largest(bf16, 1000)).sum()) == 1000


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_per_layer_zeroes_the_smallest_share_of_each_projection(sparsity):
    model = _model()
    before = copy.deepcopy(model)
    apply_masks(model, magnitude_masks(model, sparsity, "layer"))
    old = dict(before.named_modules())
    for name, lin in find_linears(model):
        w, w0 = lin.weight, old[name].weight
        assert int((w == 0).sum()) == round(sparsity * w.numel()), name  # exact, not "within rounding"
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])  # survivors untouched
        if 0 < sparsity:
            assert w0[~kept].abs().max() <= w0[kept].abs().min()  # the smallest went
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, before.lm_head.weight)


def test_magnitude_global_uses_one_threshold_over_all_projections():
    model = _model()
    before = dict(copy.deepcopy(model).named_modules())
    apply_masks(model, magnitude_masks(model, 0.5, "global"))
    report = sparsity_report(model)
    assert report["zeros"] == round(0.5 * report["weights"])
    pruned = torch.cat([before[n].weight[lin.weight == 0].abs() for n, lin in find_linears(model)])
    kept = torch.cat([before[n].weight[lin.weight != 0].abs() for n, lin in find_linears(model)])
    assert pruned.max() <= kept.min()
    # init scales o_proj / down_proj by 1/sqrt(2L): one global threshold prunes them harder than q_proj
    per = report["per_layer"]
    assert per["model.layers.0.self_attn.o_proj"] > 0.6 > 0.4 > per["model.layers.0.self_attn.q_proj"]


def test_iterative_magnitude_masks_nest():
    model = _model()
    first = magnitude_masks(model, 0.25, "global")
    apply_masks(model, first)
    with torch.no_grad():  # a recovery step would move the survivors; make some of them tiny
        for _, lin in find_linears(model):
            lin.weight.mul_(torch.rand_like(lin.weight))
    second = magnitude_masks(model, 0.5, "global", previous=first)
    for name in first:
        assert not (second[name] & ~first[name]).any()  # nothing pruned comes back
    apply_masks(model, second)
    assert sparsity_report(model)["zeros"] == round(0.5 * sparsity_report(model)["weights"])


def test_two_four_keeps_exactly_the_two_largest_of_every_four():
    model = _model()
    before = dict(copy.deepcopy(model).named_modules())
    apply_masks(model, semi_structured_masks(model))
    for name, lin in find_linears(model):
        groups = lin.weight.view(lin.weight.shape[0], -1, 4)
        assert ((groups != 0).sum(-1) == 2).all(), name
        old = before[name].weight.abs().view_as(groups)
        kept_min = old.masked_fill(groups == 0, float("inf")).min(-1).values
        pruned_max = old.masked_fill(groups != 0, -1.0).max(-1).values
        assert (pruned_max <= kept_min).all()
    assert sparsity_report(model)["total"] == 0.5


def test_two_four_needs_inputs_in_whole_groups():
    model = build_model(ModelConfig(**{**BASE, "hidden_size": 50, "num_attention_heads": 5}), seed=0)
    with pytest.raises(CubelmError, match="multiple of 4"):
        semi_structured_masks(model)


# ---- structured: smaller model = masked original ----------------------------------------------------------------
@pytest.mark.parametrize("shape,unit,sparsity,heads,kv_heads", [
    ("gqa", "auto", 0.34, 4, 2),     # one query head from each of the 2 groups
    ("gqa", "group", 0.5, 3, 1),     # one whole group of 3
    ("mha-bias", "auto", 0.5, 2, 2),  # MHA: heads are groups
    ("mqa-qwen2", "query", 0.5, 2, 1),
])
def test_head_pruning_equals_the_masked_original(shape, unit, sparsity, heads, kv_heads):
    model = _model(shape)
    plan = plan_heads(model, sparsity, unit=unit)
    small = prune_heads(model, plan).eval()
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (heads, kv_heads)
    assert sum(p.numel() for p in small.parameters()) == small.config.num_params() < model.config.num_params()
    masked = copy.deepcopy(model)
    mask_heads(masked, plan)
    ids = _ids()
    with torch.no_grad():
        got, want, original = small(ids), masked(ids), model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (original - want).abs().max() > 1e-3  # the heads mattered: the comparison can fail


def test_heads_removed_are_the_least_important():
    model = _model("gqa")
    with torch.no_grad():  # make head 4 (group 1) and head 0 (group 0) near-silent in layer 0
        attn = model.model.layers[0].self_attn
        for h in (0, 4):
            attn.q_proj.weight[h * 8:(h + 1) * 8] *= 1e-3
            attn.o_proj.weight[:, h * 8:(h + 1) * 8] *= 1e-3
    plan = plan_heads(model, count=2)
    assert plan.query[0].tolist() == [1, 2, 3, 5] and plan.kv[0].tolist() == [0, 1]


@pytest.mark.parametrize("shape", ["gqa", "mha-bias"])
def test_neuron_pruning_equals_the_masked_original(shape):
    model = _model(shape)
    plan = plan_neurons(model, 0.5)
    small = prune_neurons(model, plan).eval()
    assert small.config.intermediate_size == 40
    masked = copy.deepcopy(model)
    mask_neurons(masked, plan)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(small(ids), masked(ids), atol=1e-5, rtol=1e-5)
        assert (model(ids) - masked(ids)).abs().max() > 1e-3


def test_structured_counts_are_checked():
    model = _model("gqa")
    # 0.5 of 3 heads per group lies between 1 and 2 units: halves round down, never more than asked
    assert len(plan_heads(model, 0.5).query[0]) == 4 and len(plan_heads(model, 0.67).query[0]) == 2
    with pytest.raises(CubelmError, match="each layer has 6"):
        plan_heads(model, count=7)
    with pytest.raises(CubelmError, match="multiple of 2"):
        plan_heads(model, count=3)  # query unit: the same number from both groups
    with pytest.raises(CubelmError, match="each layer has 80"):
        plan_neurons(model, count=80)
    with pytest.raises(CubelmError, match="MHA"):
        plan_heads(_model("mha-bias"), count=1, unit="query")


# ---- saved directories load in cubelm, transformers and the engine -----------------------------------------------
@pytest.mark.parametrize("shape", ["gqa", "mha-bias"])
def test_pruned_dirs_load_in_cubelm_and_transformers_with_the_same_logits(shape, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(shape)
    small = prune_neurons(prune_heads(model, plan_heads(model, 0.5)), plan_neurons(model, 0.25))
    apply_masks(small, semi_structured_masks(small))
    save_model(small, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_attention_heads"] < model.config.num_attention_heads and cfg["intermediate_size"] == 60
    ours = load_model(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = _ids(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids), small.eval()(ids), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("prune"))


def test_cli_writes_hf_dirs_that_the_engine_serves(model_dir, tmp_path):
    from cubelm import LLM, SamplingParams
    from cubelm.engine.reference import generate_tokens
    for method, extra in (("magnitude", ["--scope", "global"]), ("2:4", []), ("heads", ["--count", "2"]),
                          ("neurons", ["--sparsity", "0.25"])):
        out = tmp_path / method.replace(":", "-")
        assert main(["compress", "prune", "--model", str(model_dir), "--out", str(out), "--method", method,
                     *extra]) == 0
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "pruning.json"):
            assert (out / name).is_file(), name
        summary = json.loads((out / "pruning.json").read_text())
        model = load_model(out)
        if method in ("magnitude", "2:4"):
            assert summary["projection_sparsity"] == pytest.approx(0.5, abs=1e-6)
            assert sparsity_report(model)["total"] == pytest.approx(0.5, abs=1e-6)
        else:
            assert summary["params_after"] == model.config.num_params() < summary["params_before"]
    # the engine (paged KV, decode layout) runs the smaller architecture like the reference generator
    small = load_model(tmp_path / "heads")
    assert small.config.num_attention_heads == 2 and small.config.head_dim == 64
    llm = LLM(str(tmp_path / "heads"), num_blocks=64, log=lambda m: None)
    out = llm.generate([[5, 9, 11, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ref = list(generate_tokens(small, [5, 9, 11, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    assert list(out.token_ids) == ref


def test_cli_bad_input_exits_2_with_one_line(model_dir, tmp_path):
    r = cubelm("compress", "prune", "--model", model_dir, "--out", tmp_path / "o", "--method", "magnitude",
               "--sparsity", "1.0")
    assert_clean_error(r, "[0, 1)")


@pytest.mark.parametrize("args,needle", [
    (["--method", "magnitude", "--sparsity", "-0.1"], "[0, 1)"),
    (["--method", "lottery"], "unknown --method"),
    (["--method", "heads", "--count", "9"], "each layer has 4"),
    (["--method", "neurons", "--count", "688"], "each layer has 688"),
    (["--method", "2:4", "--sparsity", "0.3"], "0.5"),
    (["--method", "heads", "--scope", "global"], "magnitude"),
    (["--method", "magnitude", "--iterations", "3"], "--recover-steps"),
])
def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, args, needle):
    code = main(["compress", "prune", "--model", str(model_dir), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cubelm: error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


# ---- recovery: the trainer runs on the pruned model and the mask holds --------------------------------------------
@pytest.fixture(scope="module")
def packed_data(model_dir, tmp_path_factory):
    import sysconfig
    from pathlib import Path

    from cubelm.data.clean import CleanConfig
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.sources import resolve_source
    from cubelm.data.tokenizer import TokenizerConfig
    root = tmp_path_factory.mktemp("packed")
    corpus = resolve_source(str(Path(sysconfig.get_paths()["stdlib"]) / "json"))
    prepare(corpus, root, PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(), tokenizer_dir=str(model_dir),
                                        val_fraction=0.2), log=lambda *a: None)
    return root


@pytest.mark.parametrize("keep_mask", [True, False])
def test_recovery_trains_the_survivors_and_keeps_the_zeros(model_dir, packed_data, keep_mask):
    from cubelm.compress.recover import Recovery
    model = load_model(model_dir)
    masks = magnitude_masks(model, 0.5, "global")
    apply_masks(model, masks)
    pruned = copy.deepcopy(model)
    recovery = Recovery(model_dir, str(packed_data), steps=2, lr=1e-3, seq_len=32, micro_batch_size=2,
                        eval_batches=2)
    recovered = recovery.run(model, masks if keep_mask else None)
    before, after = dict(pruned.named_modules()), dict(recovered.named_modules())
    for name, keep in masks.items():
        w = after[name].weight
        assert not torch.equal(w[keep], before[name].weight[keep]), name  # survivors trained
        if keep_mask:
            assert (w[~keep] == 0).all(), name
    if not keep_mask:  # the reference: without the mask, training brings pruned weights back
        assert sparsity_report(recovered)["total"] < 0.1
    assert {"val_loss_pruned", "val_loss_recovered"} <= recovery.last.keys()


def test_iterative_cli_prunes_in_rounds_and_recovers_each(model_dir, packed_data, tmp_path):
    out = tmp_path / "iter"
    assert main(["compress", "prune", "--model", str(model_dir), "--out", str(out), "--method", "magnitude",
                 "--sparsity", "0.5", "--scope", "global", "--iterations", "2", "--recover-steps", "2",
                 "--data", str(packed_data), "--seq-len", "32", "--micro-batch-size", "2"]) == 0
    summary = json.loads((out / "pruning.json").read_text())
    assert [r["projection_sparsity"] for r in summary["rounds"]] == pytest.approx([0.25, 0.5], abs=1e-6)
    assert sparsity_report(load_model(out))["total"] == pytest.approx(0.5, abs=1e-6)


def test_structured_recovery_on_instruct_rows(model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"add {i} and {i + 1}", "completion": f" {2 * i + 1}"}) + "\n"
                            for i in range(40)))
    out = tmp_path / "neurons"
    assert main(["compress", "prune", "--model", str(model_dir), "--out", str(out), "--method", "neurons",
                 "--sparsity", "0.5", "--recover-steps", "2", "--data", str(rows), "--micro-batch-size", "4"]) == 0
    round_ = json.loads((out / "pruning.json").read_text())["rounds"][0]
    assert round_["recover_steps"] == 2 and load_model(out).config.intermediate_size == 344
    r = cubelm("compress", "prune", "--model", model_dir, "--out", tmp_path / "x", "--method", "neurons",
               "--recover-steps", "2")
    assert_clean_error(r, "--data")
