"""``cubelm finetune``: LoRA trains adapters only and exports a peft adapter (same logits in cubelm and peft), a resumed
run equals an uninterrupted one, full fine-tuning exports an HF model, step 0 is the base's held-out answer loss,
and bad input is a one-line error with exit code 2."""

import json

import pytest
import torch
from helpers import assert_clean_error, cubelm

from cubelm.finetune.config import LoraConfig
from cubelm.finetune.recipe import FinetuneConfig, finetune_train_config
from cubelm.finetune.trainer import FinetuneTrainer
from cubelm.train.batches import IGNORE_INDEX

SMALL = dict(seq_len=96, micro_batch_size=4, max_steps=8, warmup_steps=1, eval_interval=4, checkpoint_interval=4,
             keep_last=3, lr=1e-2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random cubelm model with a cubelm tokenizer (chat template included), in HF format."""
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    from cubelm.model.config import ModelConfig
    from cubelm.model.hf_io import save_model
    from cubelm.model.transformer import build_model
    path = tmp_path_factory.mktemp("base")
    corpus = ["def add(a, b):\n    return a + b\n", "Add 12 and 30. The sum is 42.", "hello world"] * 40
    tok = train_tokenizer(corpus, TokenizerConfig(vocab_size=300))
    tok.save(path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    save_model(build_model(cfg, seed=0), path)
    return path


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """All three row shapes."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    out = []
    for i in range(30):
        a, b = i * 7 % 50, i * 3 % 40
        if i % 3 == 0:
            out.append({"instruction": f"Add {a} and {b}.", "output": f"The sum is {a + b}."})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                                     {"role": "assistant", "content": f"The sum is {a + b}."}]})
        else:
            out.append({"prompt": f"Add {a} and {b}.", "completion": f" The sum is {a + b}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return str(path)


def _ft(base, rows, method="lora", **kw):
    return FinetuneConfig(model=str(base), data=rows, method=method, val_fraction=0.2,
                          lora=LoraConfig(r=4, lora_alpha=8), **kw)


def _records(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _losses(run):
    return {r["step"]: r["loss"] for r in _records(run, "train")}


@pytest.fixture(scope="module")
def lora_run(base, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    trainer = FinetuneTrainer(finetune_train_config("lora", **SMALL), _ft(base, rows), out, log=lambda m: None)
    trainer.run(progress=False)
    return out, trainer


def test_lora_trains_adapters_only_and_exports_a_peft_adapter(lora_run, base):
    from cubelm.finetune.adapter import load_adapter
    from cubelm.finetune.lora import lora_layers
    from cubelm.model.hf_io import load_model, load_state_dict
    out, trainer = lora_run
    losses = _losses(out)
    assert list(losses) == list(range(1, 9)) and losses[8] < losses[1]
    assert [r["step"] for r in _records(out, "eval")] == [0, 4, 8]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "data_report.json").is_file()
    frozen = load_state_dict(base)
    for name, p in trainer.model.named_parameters():  # the base is untouched, only adapters moved
        if "lora_" not in name:
            assert not p.requires_grad and torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    assert any(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(trainer.model))
    reloaded = load_model(base)
    load_adapter(reloaded, out / "adapter")
    x = torch.randint(0, trainer.model_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), trainer.model(x), rtol=0, atol=0)


def test_peft_loads_the_exported_adapter_with_the_same_logits(lora_run, base):
    import peft
    import transformers
    out, trainer = lora_run
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out / "adapter")
    x = torch.randint(0, trainer.model_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, trainer.model(x), rtol=1e-4, atol=1e-4)


def test_step_zero_is_the_base_models_held_out_answer_loss(lora_run, base):
    from cubelm.model.hf_io import load_model
    out, trainer = lora_run
    model, total, count = load_model(base), 0.0, 0
    with torch.no_grad():
        for ex in trainer.val_batches.examples:  # each held-out example alone, summed over its answer tokens
            logits = model(torch.tensor(ex.ids[None, :-1]))
            target = torch.tensor(ex.ids[1:]).masked_fill(torch.tensor(ex.mask[1:] == 0), IGNORE_INDEX)
            total += float(torch.nn.functional.cross_entropy(logits[0], target, reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    step0 = _records(out, "eval")[0]
    assert step0["val_tokens"] == count
    assert step0["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_resumed_lora_run_equals_an_uninterrupted_one(lora_run, base, rows, tmp_path):
    from cubelm.finetune.adapter import read_adapter_tensors
    from cubelm.train.checkpoint import list_checkpoints
    out, _ = lora_run
    cfg = finetune_train_config("lora", **SMALL)
    FinetuneTrainer(finetune_train_config("lora", **SMALL, stop_after=3), _ft(base, rows), tmp_path,
                    log=lambda m: None).run(progress=False)
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert ckpt.name == "step-000003" and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()  # the frozen base is not in the checkpoint
    resumed = FinetuneTrainer(cfg, _ft(base, rows), tmp_path, resume=True, log=lambda m: None)
    assert resumed.state.step == 3
    resumed.run(progress=False)
    assert _losses(tmp_path) == _losses(out)  # every step, exact float equality
    a, b = read_adapter_tensors(tmp_path / "adapter"), read_adapter_tensors(out / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k][p], b[k][p]) for k in a for p in a[k])


def test_resume_with_other_adapter_settings_is_refused(lora_run, base, rows, tmp_path):
    import shutil

    from cubelm.errors import CubelmError
    out, _ = lora_run
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    other = FinetuneConfig(model=str(base), data=rows, val_fraction=0.2, lora=LoraConfig(r=8, lora_alpha=8))
    with pytest.raises(CubelmError, match="different config"):
        FinetuneTrainer(finetune_train_config("lora", **SMALL), other, tmp_path, resume=True, log=lambda m: None)


def test_full_finetune_exports_an_hf_model_with_the_tokenizer(base, rows, tmp_path):
    from cubelm.model.hf_io import load_model, load_state_dict
    cfg = finetune_train_config("full", **{**SMALL, "max_steps": 4, "lr": 1e-3})
    trainer = FinetuneTrainer(cfg, _ft(base, rows, method="full"), tmp_path, log=lambda m: None)
    assert trainer.num_trainable == sum(p.numel() for p in trainer.model.parameters())
    model_dir = trainer.run(progress=False)
    assert model_dir == tmp_path / "model" and (model_dir / "tokenizer.json").is_file()
    losses = _losses(tmp_path)
    assert losses[4] < losses[1]
    tuned, original = load_state_dict(model_dir), load_state_dict(base)
    assert all(not torch.equal(tuned[k], original[k]) for k in original if "norm" not in k)
    assert load_model(model_dir).config.vocab_size == trainer.model_config.vocab_size




def test_cli_runs_and_bad_input_is_one_line_exit_2(base, rows, tmp_path):
    ok = cubelm("finetune", "--model", str(base), "--data", rows, "--out", str(tmp_path / "run"), "--max-steps=2",
                "--seq-len=96", "--micro-batch-size=2", "--no-progress", "--lora-r=2")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no answer here"}\n{broken\n')
    assert_clean_error(cubelm("finetune", "--model", str(base), "--data", str(empty), "--out", str(tmp_path / "e")),
                       "no usable rows")
    assert_clean_error(cubelm("finetune", "--model", str(base), "--data", rows, "--out", str(tmp_path / "t"),
                              "--target-modules", "q_proj,qkv_proj"), "qkv_proj", "no such projection")
    no_template = tmp_path / "no_template"
    no_template.mkdir()
    for f in base.iterdir():
        (no_template / f.name).write_bytes(f.read_bytes())
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert_clean_error(cubelm("finetune", "--model", str(no_template), "--data", rows, "--out", str(tmp_path / "n")),
                       "chat template")


def test_build_default_instruct_adapter_installs_caches_and_follows_the_base(base, rows, tmp_path, monkeypatch):
    import shutil

    from cubelm.finetune.adapter import read_adapter_config
    from cubelm.model.hf_io import load_model, save_model
    from cubelm.train.default_model import build_instruct_adapter
    monkeypatch.setenv("CUBELM_HOME", str(tmp_path))
    shutil.copytree(base, tmp_path / "models" / "default")
    logs = []
    path = build_instruct_adapter(max_steps=2, data=rows, log=logs.append)
    assert path == tmp_path / "models" / "default-instruct" and read_adapter_config(path).r == 16
    first = json.loads((path / "training_summary.json").read_text())["base_sha256"]
    assert build_instruct_adapter(max_steps=2, data=rows, log=logs.append) == path and "cached" in logs[-1]
    model = load_model(tmp_path / "models" / "default")
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # the default model was rebuilt: its adapter must be too
    save_model(model, tmp_path / "models" / "default")
    build_instruct_adapter(max_steps=2, data=rows, log=logs.append)
    assert "cached" not in logs[-1]
    assert json.loads((path / "training_summary.json").read_text())["base_sha256"] != first
