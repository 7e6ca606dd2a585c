"""Knowledge distillation (cubelm.compress.distill): the loss against torch's own KL / cross-entropy, its gradient
against the closed form, training that pulls the student toward the teacher, α = 0 as the scratch run itself, the
CLI's output directory and its one-line errors."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_clean_error, cli_in_process

from cubelm.compress.distill import DistillTrainer, ScratchTrainer, distill_kl, distill_loss
from cubelm.model.config import ModelConfig
from cubelm.model.hf_io import load_model
from cubelm.model.transformer import build_model
from cubelm.train.config import TrainConfig

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _logits(seed: int, shape=(3, 7, 96), scale=3.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _targets(seed: int = 5, shape=(3, 7), vocab=96) -> torch.Tensor:
    y = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    y[0, :3] = -100  # masked prompt tokens count in neither term
    y[2, 5] = -100
    return y


def test_kl_and_loss_are_zero_when_the_student_is_the_teacher():
    teacher = build_model(ModelConfig(**SMALL), seed=0)
    student = build_model(ModelConfig(**SMALL), seed=0)  # another instance, same weights
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    for temperature in (0.5, 1.0, 2.0, 4.0):
        assert distill_kl(s, t, y, temperature).item() == pytest.approx(0.0, abs=1e-6)
        assert distill_loss(s, t, y, alpha=1.0, temperature=temperature).total.item() == pytest.approx(0.0, abs=1e-5)
    other = build_model(ModelConfig(**SMALL), seed=1)
    with torch.no_grad():
        assert distill_kl(other(x), t, y, 2.0).item() > 1e-4  # and not zero for a different model


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (1.0, 1.0), (0.0, 3.0), (0.25, 0.7)])
def test_loss_equals_torch_kl_div_and_cross_entropy(alpha, temperature):
    s, t, y = _logits(0), _logits(1), _targets()
    valid = (y != -100).flatten()
    s_rows, t_rows = s.flatten(0, 1)[valid], t.flatten(0, 1)[valid]
    # kl_div(input=log q, target=log p) = sum p (log p - log q); batchmean divides by the number of rows (tokens)
    kl_ref = F.kl_div(F.log_softmax(s_rows / temperature, -1), F.log_softmax(t_rows / temperature, -1),
                      reduction="batchmean", log_target=True)
    ce_ref = F.cross_entropy(s_rows, y.flatten()[valid])
    loss = distill_loss(s, t, y, alpha=alpha, temperature=temperature)
    torch.testing.assert_close(loss.kl, kl_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.ce, ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.total, alpha * temperature ** 2 * kl_ref + (1 - alpha) * ce_ref,
                               rtol=1e-5, atol=1e-6)


def test_kl_gradient_is_the_closed_form():
    """d KL(p_T ‖ q_T) / d s = (q_T − p_T) / T per target token (/ tokens for the mean): why the loss has T²."""
    temperature = 2.5
    s, t, y = _logits(2).requires_grad_(True), _logits(3), _targets()
    distill_kl(s, t, y, temperature).backward()
    valid = (y != -100).unsqueeze(-1)
    expected = (F.softmax(s.detach() / temperature, -1) - F.softmax(t / temperature, -1)) / temperature
    expected = torch.where(valid, expected, torch.zeros_like(expected)) / valid.sum()
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-7)


# ---- training: a teacher directory (tokenizer included) and packed data with its tokenizer ----------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from compress_helpers import varied_model_dir
    return varied_model_dir(tmp_path_factory.mktemp("teacher"))  # std 0.1: a peaked, non-trivial distribution


@pytest.fixture(scope="module")
def packed(teacher_dir, tmp_path_factory):
    from cubelm.data.clean import CleanConfig
    from cubelm.data.prepare import PrepareConfig, prepare
    from cubelm.data.sources import resolve_source
    from cubelm.data.tokenizer import TokenizerConfig
    root = tmp_path_factory.mktemp("packed")
    corpus = resolve_source(str(Path(sysconfig.get_paths()["stdlib"]) / "json"))
    prepare(corpus, root, PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(),
                                        tokenizer_dir=str(teacher_dir), val_fraction=0.2), log=lambda *a: None)
    return root


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(preset="nano", seq_len=32, micro_batch_size=4, max_steps=steps, lr=3e-3, min_lr=3e-4,
                       warmup_steps=0, eval_interval=steps, eval_batches=2, checkpoint_interval=steps, keep_last=1,
                       seed=7, checkpoint_alpha=False, **kw)


def test_training_lowers_the_kl_to_the_teacher(teacher_dir, packed, tmp_path):
    common = dict(teacher=teacher_dir, student="nano", temperature=1.0)
    trainer = DistillTrainer(_cfg(30), packed, tmp_path / "run", alpha=1.0, model_out=tmp_path / "out", **common)
    assert trainer.model_config.vocab_size == load_model(teacher_dir).config.vocab_size
    before = trainer.evaluate()["val_kl"]
    trainer.run(progress=False)
    after = trainer.evals[-1]["val_kl"]
    # the random teacher is far beyond a 2-layer student's reach (its KL plateaus near 1.14 nats from 1.26), so
    # the reference is the same student trained for the same steps on the data alone
    scratch = ScratchTrainer(_cfg(30), packed, tmp_path / "scratch", model_out=tmp_path / "scratch-out", **common)
    scratch.run(progress=False)
    assert after < 0.95 * before and after < scratch.evals[-1]["val_kl"], (before, after, scratch.evals[-1])
    records = [r for r in trainer.metrics.records() if r["kind"] == "train"]
    assert records[-1]["kl"] < records[0]["kl"]  # the training-batch KL too
    assert records[0]["loss"] == pytest.approx(records[0]["kl"], rel=1e-6)  # α = 1, T = 1: the loss is the KL


def test_alpha_zero_is_the_scratch_run(teacher_dir, packed, tmp_path):
    """α = 0 drops the teacher term: the same weights, bit for bit, as the baseline's plain next-token training."""
    common = dict(teacher=teacher_dir, student="nano", temperature=2.0)
    distilled = DistillTrainer(_cfg(3), packed, tmp_path / "d", alpha=0.0, model_out=tmp_path / "d-out", **common)
    scratch = ScratchTrainer(_cfg(3), packed, tmp_path / "s", model_out=tmp_path / "s-out", **common)
    distilled.run(progress=False)
    scratch.run(progress=False)
    a, b = distilled.model.state_dict(), scratch.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert distilled.evals[-1]["val_kl"] == scratch.evals[-1]["val_kl"] > 0


def test_a_student_directory_starts_from_its_weights(teacher_dir, packed, tmp_path):
    trainer = DistillTrainer(_cfg(1), packed, tmp_path / "run", teacher=teacher_dir, student=str(teacher_dir),
                             alpha=0.5)
    assert trainer.evaluate()["val_kl"] == pytest.approx(0.0, abs=1e-6)  # self-distillation starts at KL 0


def test_cli_writes_a_model_dir_that_loads_and_generates(teacher_dir, packed, tmp_path, capsys):
    from cubelm import LLM, SamplingParams
    from cubelm.engine.reference import generate_tokens
    out = tmp_path / "student"
    r = cli_in_process(capsys, "compress", "distill", "--teacher", teacher_dir, "--student", "nano", "--data", packed,
                       "--out", out, "--max-steps", "2", "--seq-len", "32", "--micro-batch-size", "2",
                       "--eval-batches", "1", "--no-progress", "--baseline", "--held-out",
                       Path(sysconfig.get_paths()["stdlib"]) / "json" / "scanner.py")
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "distillation.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.json").read_bytes() == (teacher_dir / "tokenizer.json").read_bytes()
    summary = json.loads((out / "distillation.json").read_text())
    assert summary["distilled"]["steps"] == 2 and summary["alpha"] == 0.5 and summary["temperature"] == 2.0
    # --baseline: the scratch student saw the same tokens; the printed table has the three held-out figures
    assert summary["scratch"]["tokens"] == summary["distilled"]["tokens"] == 2 * 2 * 32
    bpb = summary["comparison"]["bpb"]
    assert set(bpb) == {"teacher", "distilled", "scratch"} and all(v > 0 for v in bpb.values())
    assert f"| distilled student | {summary['distilled']['params']:,} | {bpb['distilled']:.4f} |" in r.stdout
    model = load_model(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    prompt = [5, 9, 11, 7]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM(str(out), num_blocks=32, log=lambda m: None)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(got) == list(generate_tokens(model, prompt, params))


def _other_tokenizer(root: Path) -> Path:
    """A tokenizer of the same size as the teacher's, trained on other text: same vocab size, other ids."""
    from cubelm.data.tokenizer import TokenizerConfig, train_tokenizer
    train_tokenizer(["SELECT name FROM users WHERE id = 1;\n", "<html><body>hello</body></html>\n"] * 60,
                    TokenizerConfig(vocab_size=320)).save(root)
    return root


def test_cli_tokenizer_mismatch_is_one_line_exit_2(teacher_dir, packed, tmp_path, capsys):
    other = _other_tokenizer(tmp_path / "tok")
    student = tmp_path / "student"  # the teacher's weights and config with another tokenizer
    shutil.copytree(teacher_dir, student)
    shutil.copyfile(other / "tokenizer.json", student / "tokenizer.json")
    r = cli_in_process(capsys, "compress", "distill", "--teacher", teacher_dir, "--student", student, "--data", packed,
                       "--out", tmp_path / "o", "--max-steps", "1")
    assert_clean_error(r, "another tokenizer", "the student")
    data = tmp_path / "data"  # packed data whose tokenizer is not the teacher's
    shutil.copytree(packed, data)
    shutil.copyfile(other / "tokenizer.json", data / "tokenizer" / "tokenizer.json")
    r = cli_in_process(capsys, "compress", "distill", "--teacher", teacher_dir, "--student", "nano", "--data", data,
                       "--out", tmp_path / "o", "--max-steps", "1")
    assert_clean_error(r, "another tokenizer", "the data")
    assert not (tmp_path / "o").exists()


def test_tokens_set_the_steps():
    from cubelm.compress.distill_commands import DistillOptions
    o = DistillOptions(student="nano", out="x", tokens=1000, micro_batch_size=2, seq_len=32)
    assert o.steps == 16 and o.train_config().max_steps == 16  # ceil(1000 / 64)


@pytest.mark.parametrize("args,needle", [
    (["--student", "pico"], "unknown preset"),
    (["--student", "nano", "--alpha", "1.5"], "[0, 1]"),
    (["--student", "nano", "--alpha", "-0.1"], "[0, 1]"),
    (["--student", "nano", "--temperature", "0"], "positive"),
    (["--student", "nano", "--temperature", "-2"], "positive"),
    (["--student", "nano", "--max-steps", "5", "--tokens", "100"], "not both"),
])
def test_cli_bad_input_is_one_line(teacher_dir, tmp_path, capsys, args, needle):
    r = cli_in_process(capsys, "compress", "distill", "--teacher", teacher_dir, "--out", tmp_path / "o", *args)
    assert_clean_error(r, needle)
    assert not (tmp_path / "o").exists()
