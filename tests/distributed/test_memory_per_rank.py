"""Per-rank memory estimates (``cubelm plan --dp/--tp/--pp``): the ratios each parallelism must produce."""

import json
import subprocess
import sys

import pytest

from cubelm.errors import CubelmError
from cubelm.model.config import preset
from cubelm.systems.parallel_memory import ParallelLayout, per_rank_memory


def _rank(**layout):
    return per_rank_memory(preset("llama-2-7b"), ParallelLayout(**layout), dtype="bf16", context=4096, batch=8)


def test_single_rank_is_16_bytes_per_param():
    r = _rank()
    assert r.params == preset("llama-2-7b").num_params()
    assert r.states == 16 * r.params and r.gathered == 0


def test_ddp_replicates_states_fsdp_shards_them():
    one, ddp, fsdp = _rank(), _rank(dp=8, dp_mode="ddp"), _rank(dp=8, dp_mode="fsdp")
    assert ddp.states == one.states and fsdp.states == pytest.approx(one.states / 8, abs=8)
    assert fsdp.gathered > 0 and ddp.activations == fsdp.activations == pytest.approx(one.activations / 8, rel=0.01)


def test_tp_divides_weights_and_sequence_parallel_the_rest():
    one, tp, no_sp = _rank(), _rank(tp=8), _rank(tp=8, sequence_parallel=False)
    assert tp.params == pytest.approx(one.params / 8, rel=1e-3)
    assert tp.activations < no_sp.activations < one.activations


def test_pp_divides_layers_and_gpipe_holds_more_microbatches_than_1f1b():
    one = _rank()
    f1b, gpipe = _rank(pp=4, microbatches=8), _rank(pp=4, microbatches=8, schedule="gpipe")
    assert f1b.params < one.params / 3
    assert ParallelLayout(pp=4, microbatches=8).in_flight() == 4
    assert ParallelLayout(pp=4, microbatches=8, schedule="gpipe").in_flight() == 8
    assert gpipe.activations > f1b.activations and gpipe.states == f1b.states


def test_bad_layout_is_a_clear_error():
    with pytest.raises(CubelmError, match="schedule"):
        ParallelLayout(pp=2, schedule="zb-h9")


def test_cli_plan_per_rank_json():
    r = subprocess.run([sys.executable, "-m", "cubelm", "plan", "--model", "llama-2-7b", "--mode", "full",
                        "--dtype", "bf16", "--batch", "8", "--dp", "2", "--tp", "4", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    per_rank = json.loads(r.stdout)["per_rank"]
    assert per_rank["layout"]["tp"] == 4 and per_rank["total"] == (per_rank["states"] + per_rank["gathered"]
                                                                   + per_rank["activations"])
    bad = subprocess.run([sys.executable, "-m", "cubelm", "plan", "--model", "llama-2-7b", "--tp", "2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "add --mode full" in bad.stderr
