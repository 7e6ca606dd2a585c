"""``cubelm train --nproc N``: a full pipeline-parallel run through the CLI, a dying rank, a hung rank; and the
config checks that need no processes (bad degrees, indivisible tensor-parallel sizes, stage split)."""

import json
import os
import subprocess
import sys

import pytest

from cubelm.errors import CubelmError


def cubelm_train(data, out, preset, *extra, env=None, timeout=180):
    cmd = [sys.executable, "-m", "cubelm", "train", "--data", str(data), "--out", str(out), "--preset", preset,
           "--seq-len=32", "--micro-batch-size=8", "--max-steps=4", "--warmup-steps=1", "--eval-interval=2",
           "--checkpoint-interval=2", "--eval-batches=2", "--lr=1e-3", "--no-progress", "--no-checkpoint-alpha",
           *extra]  # no spectral records: the single-process run would log them, the distributed one does not
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_nproc_pipeline_run_matches_single_process(dist_data, tiny_config, tmp_path):
    single = cubelm_train(dist_data, tmp_path / "one", tiny_config)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = cubelm_train(dist_data, tmp_path / "pp", tiny_config, "--nproc=2", "--pp=2",
                            "--schedule=interleaved-1f1b")
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = _records(tmp_path / "one"), _records(tmp_path / "pp")
    assert [r["kind"] for r in a] == [r["kind"] for r in b]
    for x, y in zip(a, b):  # train losses and pipeline-evaluated validation losses
        key = "loss" if x["kind"] == "train" else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5)
    assert (tmp_path / "pp" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "pp" / "checkpoints" / "step-000004" / "dcp" / ".metadata").is_file()


def test_dying_rank_fails_fast_naming_it(dist_data, tiny_config, tmp_path):
    # the collective timeout is 10 minutes and the run may take 3 (cubelm_train's timeout): finishing at all
    # means torchrun's agent noticed the death, not a collective timing out
    r = cubelm_train(dist_data, tmp_path, tiny_config, "--nproc=2", "--dist-timeout=600",
                        env={"CUBELM_FAULT_KILL": "1:2"})
    assert r.returncode == 2
    assert "cubelm: error: rank 1 of 2 failed first (killed by SIGKILL)" in r.stderr
    assert "Timed out" not in r.stderr


def test_hung_rank_fails_after_the_collective_timeout(dist_data, tiny_config, tmp_path):
    r = cubelm_train(dist_data, tmp_path, tiny_config, "--nproc=2", "--dist-timeout=4",
                        env={"CUBELM_FAULT_HANG": "1:2"})
    assert r.returncode == 2
    assert "Timed out" in r.stderr and "cubelm: error: rank 0 of 2 failed first" in r.stderr


def test_exit_rank_leaves_the_group_flushes_and_keeps_the_code(tmp_path):
    """A rank ends through ``exit_rank``: no interpreter finalization (see its docstring), but buffered output
    is still written, the process group is gone and the exit code is the one given."""
    script = f"""
import atexit, sys
import torch, torch.distributed as dist
from cubelm.parallel.mesh import exit_rank
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
t = torch.ones(3)
dist.all_reduce(t)
dist.barrier()
atexit.register(lambda: print("finalized"))
sys.stdout.write("done " + str(int(t.sum())))  # no newline, no flush: exit_rank must flush it
exit_rank(7)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 7, r.stderr[-2000:]
    assert r.stdout == "done 3"  # written, and the atexit handler (finalization) never ran


def test_parallel_config_errors():
    from cubelm.parallel.config import ParallelConfig
    with pytest.raises(CubelmError, match="virtual-stages 2"):
        ParallelConfig(pp=2, schedule="zbv", virtual_stages=3)
    with pytest.raises(CubelmError, match="one stage per rank"):
        ParallelConfig(pp=2, schedule="1f1b", virtual_stages=2)
    with pytest.raises(CubelmError, match="use --dp-mode fsdp"):
        ParallelConfig(tp=2, dp_mode="ddp")
    with pytest.raises(CubelmError, match="unknown pipeline schedule"):
        ParallelConfig(schedule="zb-h3")
    with pytest.raises(CubelmError, match="cannot hold"):
        ParallelConfig(tp=2, pp=2).resolved(6)
    assert ParallelConfig(tp=2).resolved(8).dp == 4


def test_tp_degree_must_divide_heads_and_sizes():
    from cubelm.model.config import ModelConfig
    from cubelm.parallel.tensor_parallel import check_tp_divisible
    cfg = ModelConfig(vocab_size=300, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2)
    check_tp_divisible(cfg, 2)
    with pytest.raises(CubelmError, match=r"--tp 4 does not divide num_attention_heads 6, num_key_value_heads 2;.*"
                                          r"\(here: 1, 2\)"):
        check_tp_divisible(cfg, 4)
    with pytest.raises(CubelmError, match="num_attention_heads 6.*hidden_size 96"):
        check_tp_divisible(cfg.replace(intermediate_size=320), 5)


def test_stage_split_balanced_and_placed():
    from cubelm.parallel.config import ParallelConfig
    from cubelm.parallel.pipeline import stage_layer_ranges, stages_of_rank
    assert [len(r) for r in stage_layer_ranges(10, 4)] == [3, 3, 2, 2]
    assert [list(r) for r in stage_layer_ranges(4, 4)] == [[0], [1], [2], [3]]
    with pytest.raises(CubelmError, match="cannot fill 8 pipeline stages"):
        stage_layer_ranges(4, 8)
    looped = ParallelConfig(pp=4, schedule="interleaved-1f1b", virtual_stages=2)
    assert [stages_of_rank(r, looped) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    v = ParallelConfig(pp=4, schedule="dualpipev")
    assert [stages_of_rank(r, v) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_parallel_flags_without_processes_is_a_clear_error(dist_data, tiny_config, tmp_path):
    r = cubelm_train(dist_data, tmp_path, tiny_config, "--tp=2")
    assert r.returncode == 2 and "add --nproc N or run under torchrun" in r.stderr
