"""Distributed training gives the single-process losses (fp32, same global batch and seed, 5 steps, 1e-5 rel).

One 2-rank launch covers DDP, FSDP2, TP (with and without sequence parallel), all seven pipeline schedules, the
ch. 14 linear example, an FSDP2 checkpoint + resume + HF export, a pipeline timing, and fine-tuning (LoRA under DDP
and FSDP2 with the frozen base sharded, full under FSDP2, an FSDP2 LoRA checkpoint + resume + adapter export); one
4-rank launch covers the 2-D meshes (FSDP × TP, PP × FSDP) and resuming the 2-rank checkpoint on 4 ranks.
"""

import shutil

import pytest
import torch

from dist_helpers import torchrun

STEPS = 5
RTOL = 1e-5
SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "interleaved-zb", "zbv", "dualpipev"]
TWO_RANK = {"ddp": dict(dp_mode="ddp"), "fsdp": dict(dp_mode="fsdp"), "tp": dict(tp=2),
            "tp-no-sp": dict(tp=2, sequence_parallel=False),
            **{f"pp-{s}": dict(pp=2, schedule=s, microbatches=4) for s in SCHEDULES}}
MASKED = {"masked-ddp": dict(dp_mode="ddp"), "masked-fsdp": dict(dp_mode="fsdp"),
          "masked-pp": dict(pp=2, schedule="1f1b", microbatches=4)}
FINETUNE = {"ft-lora-ddp": ("lora", dict(dp_mode="ddp")), "ft-lora-fsdp": ("lora", dict(dp_mode="fsdp")),
            "ft-full-fsdp": ("full", dict(dp_mode="fsdp"))}
FOUR_RANK = {"fsdp2-x-tp2": dict(dp=2, tp=2), "pp2-x-fsdp2": dict(dp=2, pp=2, microbatches=2)}


@pytest.fixture(scope="module")
def reference(dist_data, train_kw, tmp_path_factory):
    """Single-process losses for 5 steps, and the weights after them."""
    from cubelm.train.config import TrainConfig
    from cubelm.train.loop import Trainer
    t = Trainer(TrainConfig(**train_kw), dist_data, tmp_path_factory.mktemp("ref"), log=lambda m: None)
    t.model.train()
    losses = [t.train_step()["loss"] for _ in range(STEPS)]
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in t.model.state_dict().items()}}


@pytest.fixture(scope="module")
def masked_reference(dist_instruct_data, train_kw, tmp_path_factory):
    """Single-process losses on instruct data, where only response tokens carry loss."""
    from cubelm.train.config import TrainConfig
    from cubelm.train.loop import Trainer
    t = Trainer(TrainConfig(**train_kw), dist_instruct_data, tmp_path_factory.mktemp("mref"), log=lambda m: None)
    t.model.train()
    return [t.train_step()["loss"] for _ in range(STEPS)]


@pytest.fixture(scope="module")
def finetune_reference(finetune_kw, tmp_path_factory):
    """Single-process fine-tuning losses (LoRA, full) and the LoRA weights after them."""
    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.recipe import FinetuneConfig, finetune_train_config
    from cubelm.finetune.trainer import FinetuneTrainer
    ft, train = finetune_kw
    ref = {}
    for method in ("lora", "full"):
        t = FinetuneTrainer(finetune_train_config(method, **train), FinetuneConfig(**{**ft, "method": method},
                            lora=LoraConfig()), tmp_path_factory.mktemp(f"ft-{method}"), log=lambda m: None)
        t.model.train()
        ref[method] = [t.train_step()["loss"] for _ in range(STEPS)]
        if method == "lora":
            ref["adapter"] = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    return ref


def _finetune(name, method, parallel, kw, out, **extra):
    ft, train = kw
    return {"name": name, "kind": "finetune", "parallel": parallel, "finetune": {**ft, "method": method},
            "train": train, "out": str(out), **extra}


def _train(name, parallel, data, out, **extra):
    return {"name": name, "kind": "train", "parallel": parallel, "data": str(data), "out": str(out), **extra}


@pytest.fixture(scope="module")
def tied_config(tiny_config, tmp_path_factory) -> str:
    """The tiny model with tied embeddings (as the ``tiny`` preset): TP keeps the shared weight replicated."""
    import json
    cfg = json.loads(open(tiny_config).read()) | {"tie_word_embeddings": True}
    path = tmp_path_factory.mktemp("tied") / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def tied_reference(dist_data, train_kw, tied_config, tmp_path_factory):
    from cubelm.train.config import TrainConfig
    from cubelm.train.loop import Trainer
    t = Trainer(TrainConfig(**{**train_kw, "preset": tied_config}), dist_data, tmp_path_factory.mktemp("tref"),
                log=lambda m: None)
    t.model.train()
    return [t.train_step()["loss"] for _ in range(STEPS)]


@pytest.fixture(scope="module")
def two_ranks(dist_data, dist_instruct_data, train_kw, tied_config, finetune_kw, tmp_path_factory):
    work = tmp_path_factory.mktemp("two")
    tasks = [{"name": "ch14", "kind": "ch14"}]
    tasks += [_train(n, p, dist_data, work / n, train=train_kw, steps=STEPS) for n, p in TWO_RANK.items()]
    tied = {**train_kw, "preset": tied_config}
    tasks += [_train(f"tied-{n}", {"tp": 2, "sequence_parallel": sp}, dist_data, work / f"tied-{n}", train=tied,
                     steps=STEPS) for n, sp in (("tp", True), ("tp-no-sp", False))]
    tasks += [_train(n, p, dist_instruct_data, work / n, train=train_kw, steps=STEPS) for n, p in MASKED.items()]
    ck = work / "ckpt"
    tasks += [_train("fsdp-save", {"dp_mode": "fsdp"}, dist_data, ck, train=train_kw, steps=3, save=True),
              _train("fsdp-resume", {"dp_mode": "fsdp"}, dist_data, ck, train=train_kw, steps=2, resume=True,
                     export=True),
              {"name": "timing", "kind": "timing", "args": {"schedule": "1f1b", "microbatches": 4, "steps": 2}}]
    tasks += [_finetune(n, m, p, finetune_kw, work / n, steps=STEPS) for n, (m, p) in FINETUNE.items()]
    fck, fsdp = work / "ft-ckpt", {"dp_mode": "fsdp"}
    tasks += [_finetune("ft-fsdp-save", "lora", fsdp, finetune_kw, fck, steps=3, save=True),
              _finetune("ft-fsdp-resume", "lora", fsdp, finetune_kw, fck, steps=2, resume=True, export=True)]
    results = torchrun(2, tasks, work)
    return results, ck


@pytest.fixture(scope="module")
def four_ranks(dist_data, train_kw, two_ranks, tmp_path_factory):
    work = tmp_path_factory.mktemp("four")
    _, ck = two_ranks
    shutil.copytree(ck / "checkpoints", work / "resume4" / "checkpoints")
    tasks = [_train(n, p, dist_data, work / n, train=train_kw, steps=STEPS) for n, p in FOUR_RANK.items()]
    tasks.append(_train("fsdp4-resume", {"dp_mode": "fsdp"}, dist_data, work / "resume4", train=train_kw, steps=2,
                        resume=True))
    return torchrun(4, tasks, work)


def assert_losses_close(got, want):
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=RTOL, atol=0)


@pytest.mark.parametrize("name", list(TWO_RANK))
def test_two_rank_losses_match_single_process(two_ranks, reference, name):
    assert_losses_close(two_ranks[0][name]["losses"], reference["losses"])


@pytest.mark.parametrize("name", ["tp", "tp-no-sp"])
def test_tied_embeddings_tp_matches_single_process(two_ranks, tied_reference, name):
    assert_losses_close(two_ranks[0][f"tied-{name}"]["losses"], tied_reference)


@pytest.mark.parametrize("name", list(MASKED))
def test_masked_data_losses_match_single_process(two_ranks, masked_reference, dist_instruct_data, train_kw, name):
    """Each micro-batch's loss is the mean over all its response tokens, however they fall across the ranks."""
    from cubelm.data.packed import PackedData
    from cubelm.train.batches import IGNORE_INDEX, WindowSampler
    data = PackedData(dist_instruct_data)
    from cubelm.train.config import TrainConfig
    sampler = WindowSampler(data.train, train_kw["seq_len"], mask=data.train_mask, seed=TrainConfig(**train_kw).seed)
    B = train_kw["micro_batch_size"]
    counts = [[int((sampler.batch(s * B, B // 2, rank=r, world=2)[1] != IGNORE_INDEX).sum()) for r in (0, 1)]
              for s in range(STEPS)]
    assert any(a != b for a, b in counts), counts  # otherwise averaging per-rank means would pass too
    assert_losses_close(two_ranks[0][name]["losses"], masked_reference)


@pytest.mark.parametrize("name", list(FOUR_RANK))
def test_2d_mesh_losses_match_single_process(four_ranks, reference, name):
    assert_losses_close(four_ranks[name]["losses"], reference["losses"])


def test_ch14_column_and_row_parallel_linear(two_ranks):
    r = two_ranks[0]["ch14"]
    assert r["column"]["y"] == [6, 14, 27, 24]
    assert r["column"]["local"] == [[6, 14], [27, 24]]  # each rank: its two output columns, then all-gather
    assert r["row"]["y"] == [6, 14, 27, 24]
    assert r["row"]["local"] == [[7, 10, 19, 22], [-1, 4, 8, 2]]  # partial sums; the all-reduce adds them


def test_fsdp_checkpoint_resumes_on_2_ranks(two_ranks, reference):
    results, _ = two_ranks
    assert_losses_close(results["fsdp-save"]["losses"] + results["fsdp-resume"]["losses"], reference["losses"])


def test_fsdp_checkpoint_resumes_on_4_ranks(four_ranks, reference):
    assert_losses_close(four_ranks["fsdp4-resume"]["losses"], reference["losses"][3:])


def test_fsdp_checkpoint_resumes_in_one_process(two_ranks, reference, dist_data, train_kw, tmp_path):
    from cubelm.train.config import TrainConfig
    from cubelm.train.loop import Trainer
    _, ck = two_ranks
    shutil.copytree(ck / "checkpoints", tmp_path / "checkpoints")
    t = Trainer(TrainConfig(**train_kw), dist_data, tmp_path, resume=True, log=lambda m: None)
    assert t.state.step == 3 and t.state.samples == 3 * train_kw["micro_batch_size"]
    t.model.train()
    assert_losses_close([t.train_step()["loss"] for _ in range(2)], reference["losses"][3:])


def test_hf_export_loads_in_transformers(two_ranks, reference):
    from transformers import AutoModelForCausalLM

    from cubelm.model.hf_io import load_model
    _, ck = two_ranks
    ours = load_model(ck / "model")
    for k, v in ours.state_dict().items():  # the export is the single-process model after the same 5 steps
        torch.testing.assert_close(v, reference["state"][k], rtol=1e-4, atol=1e-6)
    hf = AutoModelForCausalLM.from_pretrained(ck / "model").eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FINETUNE))
def test_distributed_finetune_matches_single_process(two_ranks, finetune_reference, name):
    """LoRA (only adapters trainable; FSDP2 shards the frozen base too) and full fine-tuning, masked answers."""
    assert_losses_close(two_ranks[0][name]["losses"], finetune_reference[FINETUNE[name][0]])


def test_fsdp_lora_checkpoint_resumes_and_exports_the_same_adapter(two_ranks, finetune_reference):
    from cubelm.finetune.adapter import read_adapter_tensors
    results, _ = two_ranks
    assert_losses_close(results["ft-fsdp-save"]["losses"] + results["ft-fsdp-resume"]["losses"],
                        finetune_reference["lora"])
    exported = read_adapter_tensors(results["ft-fsdp-resume"]["export"])
    for module, parts in exported.items():
        for part, tensor in parts.items():
            torch.testing.assert_close(tensor, finetune_reference["adapter"][f"{module}.{part}.weight"],
                                       rtol=1e-4, atol=1e-6)


def test_fsdp_lora_checkpoint_resumes_in_one_process(two_ranks, finetune_reference, finetune_kw, tmp_path):
    from pathlib import Path

    from cubelm.finetune.config import LoraConfig
    from cubelm.finetune.recipe import FinetuneConfig, finetune_train_config
    from cubelm.finetune.trainer import FinetuneTrainer
    results, _ = two_ranks
    shutil.copytree(Path(results["ft-fsdp-save"]["checkpoint"]).parent, tmp_path / "checkpoints")
    ft, train = finetune_kw
    t = FinetuneTrainer(finetune_train_config("lora", **train), FinetuneConfig(**ft, lora=LoraConfig()), tmp_path,
                        resume=True, log=lambda m: None)
    assert t.state.step == 3
    t.model.train()
    assert_losses_close([t.train_step()["loss"] for _ in range(2)], finetune_reference["lora"][3:])


def test_pipeline_timing_reports_busy_and_idle(two_ranks):
    t = two_ranks[0]["timing"]
    assert [r["rank"] for r in t["ranks"]] == [0, 1]
    for r in t["ranks"]:
        assert 0 < r["busy_s"] <= r["step_s"] and r["idle_s"] >= 0
        kinds = sorted(e[0] for e in r["events"])
        assert kinds == ["B"] * 4 + ["F"] * 4  # 4 micro-batches, one stage per rank
    assert 0 < t["idle_fraction"] < 1
