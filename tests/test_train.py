"""Trainer: exact resume, crash safety under SIGKILL, activation checkpointing parity, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cubelm.data.clean import CleanConfig
from cubelm.data.prepare import PrepareConfig, prepare
from cubelm.data.sources import resolve_source
from cubelm.data.tokenizer import TokenizerConfig
from cubelm.errors import CubelmError
from cubelm.train.checkpoint import list_checkpoints, load_checkpoint
from cubelm.train.config import TrainConfig
from cubelm.train.loop import Trainer

SMALL = dict(preset="tiny", seq_len=32, micro_batch_size=4, max_steps=8, warmup_steps=2, eval_interval=4,
             eval_batches=1, checkpoint_interval=4, keep_last=3, lr=1e-3, min_lr=1e-4)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import sysconfig
    root = tmp_path_factory.mktemp("data")
    corpus = resolve_source(str(Path(sysconfig.get_paths()["stdlib"]) / "json"))
    prepare(corpus, root, PrepareConfig(clean=CleanConfig(), tokenizer=TokenizerConfig(vocab_size=300),
                                        val_fraction=0.2), log=lambda *a: None)
    return root


def _losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from cubelm.model.hf_io import load_state_dict
    return load_state_dict(model_dir)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    Trainer(TrainConfig(**SMALL), data_dir, out, log=lambda m: None).run(progress=False)
    return out


def test_loss_decreases_and_exports(uninterrupted):
    losses = _losses(uninterrupted)
    assert list(losses) == list(range(1, 9))
    assert losses[8] < losses[1]
    evals = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals and all(e["val_bpb"] > 0 and e["val_ppl"] > 1 for e in evals)
    assert (uninterrupted / "curves.png").stat().st_size > 1000
    assert (uninterrupted / "model" / "tokenizer.json").is_file()


def test_checkpoints_log_the_spectral_alpha(uninterrupted):
    from cubelm.compress.spectral import alpha_summary
    from cubelm.model.hf_io import load_model
    records = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    spectral = [r for r in records if r["kind"] == "spectral"]
    assert [r["step"] for r in spectral] == [4, 8]  # one per checkpoint
    assert all(len(r["alpha_per_layer"]) == 4 and r["seconds"] >= 0 for r in spectral)
    final = alpha_summary(load_model(uninterrupted / "model"))  # the exported weights are the step-8 weights
    assert spectral[-1]["alpha_mean"] == pytest.approx(final["alpha_mean"], rel=1e-6)
    assert spectral[-1]["alpha_per_layer"] == pytest.approx(final["alpha_per_layer"], rel=1e-6)


def test_resume_is_bit_exact(data_dir, uninterrupted, tmp_path):
    Trainer(TrainConfig(**SMALL, stop_after=3), data_dir, tmp_path, log=lambda m: None).run(progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000003"]
    Trainer(TrainConfig(**SMALL), data_dir, tmp_path, resume=True, log=lambda m: None).run(progress=False)
    assert _losses(tmp_path) == _losses(uninterrupted)  # every step, exact float equality
    _assert_same_weights(tmp_path / "model", uninterrupted / "model")


def test_checkpoint_loads_with_weights_only(uninterrupted):
    ckpt = list_checkpoints(uninterrupted / "checkpoints")[-1]
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert "state" in state and "param_groups" in state
    meta = json.loads((ckpt / "trainer_state.json").read_text())
    assert meta["step"] == 8 and meta["samples"] == 8 * SMALL["micro_batch_size"]


def test_sigkill_during_checkpoint_write_keeps_previous(data_dir, uninterrupted, tmp_path):
    cmd = [sys.executable, "-m", "cubelm", "train", "--data", str(data_dir), "--out", str(tmp_path),
           "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()] + ["--checkpoint-interval=2"]
    env = dict(os.environ, CUBELM_FAULT_CHECKPOINT_SLEEP="2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # wait until step 2 is complete and step 4 is being written
            if list_checkpoints(ckpts) and list(ckpts.glob("step-000004.tmp-*")):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the trainer never started writing the second checkpoint")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-000002"]
    assert list(ckpts.glob("step-000004.tmp-*"))  # the half-written one is there, but not taken for complete
    trainer = Trainer(TrainConfig(**{**SMALL, "checkpoint_interval": 2}), data_dir, tmp_path, resume=True,
                      log=lambda m: None)
    assert trainer.state.step == 2 and not list(ckpts.glob("*.tmp-*"))
    trainer.run(progress=False)
    assert _losses(tmp_path) == _losses(uninterrupted)
    _assert_same_weights(tmp_path / "model", uninterrupted / "model")


def test_activation_checkpointing_same_gradients(data_dir, tmp_path):
    from cubelm.train.activation_checkpointing import apply_activation_checkpointing
    from cubelm.train.loop import lm_loss
    grads = []
    for ac in (False, True):
        trainer = Trainer(TrainConfig(**SMALL), data_dir, tmp_path / str(ac), log=lambda m: None)
        if ac:
            apply_activation_checkpointing(trainer.model)
        x, y = trainer.train_batches.batch(0, 4)
        lm_loss(trainer.model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_corrupt_checkpoint_is_a_clear_error(data_dir, uninterrupted, tmp_path):
    import shutil
    ckpt = tmp_path / "checkpoints" / "step-000008"
    shutil.copytree(list_checkpoints(uninterrupted / "checkpoints")[-1], ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"not a checkpoint")
    trainer = Trainer(TrainConfig(**SMALL), data_dir, tmp_path / "x", log=lambda m: None)
    with pytest.raises(CubelmError, match="corrupt"):
        load_checkpoint(ckpt, trainer.model, trainer.optimizer)
    r = subprocess.run([sys.executable, "-m", "cubelm", "train", "--data", str(data_dir), "--out", str(tmp_path),
                        "--resume", "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cubelm: error:") and "corrupt" in r.stderr


def test_resume_with_changed_config_is_refused(data_dir, uninterrupted, tmp_path):
    import shutil
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CubelmError, match="different config"):
        Trainer(TrainConfig(**{**SMALL, "lr": 5e-3}), data_dir, tmp_path, resume=True, log=lambda m: None)


def test_lm_loss_mean_matches_cross_entropy_and_an_all_prompt_batch_is_zero():
    import torch.nn.functional as F

    from cubelm.train.batches import IGNORE_INDEX
    from cubelm.train.loop import lm_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, :3] = IGNORE_INDEX
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(lm_loss(logits, y), want)
    masked = torch.full_like(y, IGNORE_INDEX)  # a window that is all prompt: F.cross_entropy gives NaN here
    loss = lm_loss(logits, masked)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
