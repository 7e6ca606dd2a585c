"""The pipeline-schedule simulator against the literature's closed forms, plus schedule invariants and the CLI.

References: GPipe/1F1B (p-1)/(m+p-1); interleaved 1F1B bubble / v (Narayanan et al. 2021); ZB-H1 (p-1)(F+B-W) and
ZB-H2 (p-1)(F+B-2W) (Qi et al. 2024, Table 2); ZB-V 0 when F=B=W; DualPipe (PP/2-1)(F&B+B_full-3W) (DeepSeek-V3).
"""

import json
import subprocess
import sys
from collections import Counter

import pytest

from cubelm.errors import CubelmError
from cubelm.systems.pipeline_schedules import SCHEDULES, Task
from cubelm.systems.pipeline_sim import Costs, build_schedule, compare_with_measured, plot_timeline, run, simulate

EXACT = 1e-9
PM = [(2, 4), (2, 8), (4, 8), (4, 12), (8, 16), (8, 32)]
UNEQUAL = [Costs(forward=1, backward_input=1.2, backward_weight=0.8),
           Costs(forward=1, backward_input=2, backward_weight=0.5),
           Costs(forward=2, backward_input=1, backward_weight=1)]


def valid_cases():
    for name in SCHEDULES:
        for p, m in [(1, 2), (2, 4), (3, 6), (4, 8), (4, 9), (4, 16), (6, 12)]:
            for v in ([2, 3] if name == "interleaved-1f1b" else [None]):
                try:
                    yield name, p, m, v, build_schedule(name, p, m, v)
                except CubelmError:
                    pass  # e.g. dualpipe with odd p; the validation tests cover these


# ---- closed forms ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", PM)
@pytest.mark.parametrize("costs", [Costs(), *UNEQUAL])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name, p, m, costs):
    # NOTE: the book (13.1.2) prints (1-m)/(m+n-1); that is negative for m > 1, a misprint for (n-1)/(m+n-1).
    r = simulate(name, stages=p, microbatches=m, costs=costs)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=EXACT)
    assert r.closed_form.fraction == pytest.approx(r.bubble_fraction, abs=EXACT)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 3), (8, 16, 2), (8, 32, 4)])
@pytest.mark.parametrize("costs", [Costs(), *UNEQUAL])
def test_interleaved_bubble_is_1f1b_bubble_over_v(p, m, v, costs):
    r = simulate("interleaved-1f1b", stages=p, microbatches=m, virtual_stages=v, costs=costs)
    plain = simulate("1f1b", stages=p, microbatches=m, costs=costs)
    assert max(r.idle) == pytest.approx(max(plain.idle) / v, abs=EXACT)
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=EXACT)


@pytest.mark.parametrize("p,m", PM)
def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_costs(p, m):
    r, base = simulate("zb-h1", stages=p, microbatches=m), simulate("1f1b", stages=p, microbatches=m)
    assert max(r.idle) == pytest.approx(max(base.idle) / 3, abs=EXACT)
    assert r.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1), abs=EXACT)
    assert r.peak_inflight == base.peak_inflight  # ZB-H1 keeps 1F1B's memory


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2"])
@pytest.mark.parametrize("p,m", [(4, 8), (4, 16), (8, 32)])
@pytest.mark.parametrize("costs", UNEQUAL)
def test_zb_table_2_formulas_with_unequal_costs(name, p, m, costs):
    r = simulate(name, stages=p, microbatches=m, costs=costs)
    measured = r.steady_bubble_fraction if name == "zb-h2" else r.bubble_fraction
    assert measured == pytest.approx(r.closed_form.fraction, abs=EXACT)


@pytest.mark.parametrize("name", ["zb-h2", "zbv"])
@pytest.mark.parametrize("p", [2, 4, 8])
def test_zb_h2_and_zbv_have_zero_steady_bubble_once_m_reaches_2p_minus_1(name, p):
    for m in (2 * p - 1, 2 * p, 4 * p):
        r = simulate(name, stages=p, microbatches=m)
        assert r.steady_bubble_fraction == pytest.approx(0.0, abs=EXACT)
        # one flushed step still pays the ramp: F per hop (F/2 per chunk hop for ZB-V)
        ramp = (p - 1) * (1.0 if name == "zb-h2" else 0.5)
        assert max(r.idle) == pytest.approx(ramp, abs=EXACT)
    assert simulate(name, stages=p, microbatches=p).steady_bubble_fraction > 0  # m < 2p-1: not enough to fill


@pytest.mark.parametrize("name,p,m", [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 4, 16), ("dualpipe", 6, 12),
                                      ("dualpipe", 8, 32), ("dualpipev", 1, 2), ("dualpipev", 2, 4),
                                      ("dualpipev", 3, 12), ("dualpipev", 4, 16)])
@pytest.mark.parametrize("overlap", [None, 2.5, 2.0])
def test_dualpipe_matches_deepseek_formula_when_f_equals_b(name, p, m, overlap):
    for w in (1.0, 0.5, 0.0):
        costs = Costs(backward_weight=w, overlap=None if overlap is None else overlap - 1 + w)
        r = simulate(name, stages=p, microbatches=m, costs=costs)
        # the formula is the bubble of the idlest (middle) device; without a faster F&B all devices are equal
        assert max(r.idle) == pytest.approx(r.closed_form.bubble_time, abs=EXACT)


@pytest.mark.parametrize("name,p", [("dualpipe", 4), ("dualpipe", 8), ("dualpipev", 2), ("dualpipev", 4)])
@pytest.mark.parametrize("costs", UNEQUAL + [Costs(forward=1.5, backward_input=1, backward_weight=1)])
def test_dualpipe_formula_is_approximate_when_f_differs_from_b(name, p, costs):
    """Documented relationship (docs/pipeline-simulator.md): F > B adds (PP/2-1)(F-B)/k; B > F saves at most F/k
    (k = cost divisor: 1 for DualPipe, 2 for DualPipeV's half-size chunks; PP = p or 2p)."""
    r = simulate(name, stages=p, microbatches=4 * p, costs=costs)
    f, b = costs.forward, costs.backward_input
    pp, k = (p, 1) if name == "dualpipe" else (2 * p, 2)
    sim, formula = max(r.idle), r.closed_form.bubble_time
    if f > b:
        assert sim == pytest.approx(formula + (pp / 2 - 1) * (f - b) / k, abs=EXACT)
    else:
        assert formula - f / k - EXACT <= sim <= formula + EXACT


def test_comm_latency_adds_two_hops_per_stage_to_gpipe():
    base = simulate("gpipe", stages=4, microbatches=8)
    slow = simulate("gpipe", stages=4, microbatches=8, costs=Costs(comm=0.25))
    assert slow.step_time == pytest.approx(base.step_time + 2 * 3 * 0.25)


# ---- invariants ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,p,m,v,s", list(valid_cases()), ids=lambda x: "" if hasattr(x, "ops") else str(x))
def test_every_task_once_dependencies_respected_no_overlap(name, p, m, v, s):
    tasks = Counter(t for ops in s.ops for op in ops for t in op.tasks)
    assert all(n == 1 for n in tasks.values())
    expected = {Task(k, mb, st) for mb in range(m) for st in range(s.num_stages) for k in "FBW"}
    assert set(tasks) == expected
    for d, ops in enumerate(s.ops):
        assert all(s.device_of(t.microbatch, t.stage) == d for op in ops for t in op.tasks)
    rows = run(s, Costs(forward=1, backward_input=1.3, backward_weight=0.6, comm=0.1))
    end = {t: e for row in rows for op, _, e in row for t in op.tasks}
    start = {t: b for row in rows for op, b, _ in row for t in op.tasks}
    for t in expected:
        deps = []
        if t.kind == "F" and t.stage > 0:
            deps = [Task("F", t.microbatch, t.stage - 1)]
        if t.kind == "B":
            deps = [Task("F", t.microbatch, t.stage)]
            deps += [Task("B", t.microbatch, t.stage + 1)] if t.stage < s.num_stages - 1 else []
        if t.kind == "W":
            deps = [Task("B", t.microbatch, t.stage)]
        for dep in deps:
            if s.device_of(dep.microbatch, dep.stage) != s.device_of(t.microbatch, t.stage):
                assert start[t] >= end[dep] + 0.1 - EXACT
            else:
                assert start[t] >= end[dep] - EXACT or any(dep in op.tasks and t in op.tasks for ops in s.ops
                                                           for op in ops)
    for row in rows:
        for (_, _, e0), (_, b1, _) in zip(row, row[1:]):
            assert b1 >= e0 - EXACT  # one op at a time per device


def test_peak_activations():
    for p, m in [(2, 8), (4, 8), (4, 16), (8, 16)]:
        assert simulate("gpipe", stages=p, microbatches=m).peak_inflight == [m] * p
        one = simulate("1f1b", stages=p, microbatches=m).peak_inflight
        assert max(one) <= p and one == [min(p - d, m) for d in range(p)]
        assert max(simulate("zb-h2", stages=p, microbatches=m).peak_inflight) == min(2 * p - 1, m)
        assert simulate("zbv", stages=p, microbatches=m).peak_activations == [p] * p  # 2p half chunks = 1F1B's p
    assert simulate("1f1b", stages=8, microbatches=3).peak_inflight[0] == 3
    assert simulate("dualpipe", stages=8, microbatches=32).peak_activations == [9] * 8  # DeepSeek: PP+1


# ---- validation, PNG, comparison -------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (("interleaved-1f1b", 4, 6, 2), "multiple of --stages"),
    (("interleaved-1f1b", 4, 8, 1), "--virtual-stages >= 2"),
    (("1f1b", 4, 8, 2), "interleaved-1f1b"),
    (("zbv", 4, 8, 3), "exactly 2"),
    (("dualpipe", 3, 12, None), "even --stages"),
    (("dualpipe", 4, 6, None), ">= 2 x stages"),
    (("dualpipe", 4, 9, None), "even --microbatches"),
    (("dualpipev", 4, 7, None), ">= 2 x stages"),
    (("1f1b", 4, 0, None), ">= 1"),
])
def test_bad_inputs_raise_cubelm_error(args, needle):
    name, p, m, v = args
    with pytest.raises(CubelmError) as e:
        simulate(name, stages=p, microbatches=m, virtual_stages=v)
    assert needle in str(e.value)
    with pytest.raises(CubelmError):
        Costs(forward=0)


def test_png_is_written(tmp_path):
    for name in ("interleaved-1f1b", "dualpipe"):
        out = tmp_path / f"{name}.png"
        plot_timeline(simulate(name, stages=4, microbatches=8), str(out))
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_compare_with_measured_scales_to_seconds():
    r = simulate("1f1b", stages=2, microbatches=4)  # step 15, idle 3 per device
    cmp = compare_with_measured(r, [(1.2, 0.3), (1.2, 0.3)])
    assert cmp["devices"][0]["predicted_idle"] == pytest.approx(0.3)
    assert cmp["devices"][1]["ratio"] == pytest.approx(1.0)
    assert cmp["measured_bubble_fraction"] == pytest.approx(0.2) == pytest.approx(r.bubble_fraction)
    with pytest.raises(CubelmError):
        compare_with_measured(r, [(1.0, 0.0)])


# ---- CLI -------------------------------------------------------------------------------------------------------------
def cubelm(*args):
    return subprocess.run([sys.executable, "-m", "cubelm", "pipeline", "simulate", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_json_and_png(tmp_path):
    png = tmp_path / "t.png"
    r = cubelm("--stages", "4", "--microbatches", "8", "--schedule", "interleaved-1f1b", "--virtual-stages", "2",
               "--png", str(png), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bubble_fraction"] == pytest.approx(3 / 19) and png.exists()
    assert len(out["timelines"]) == 4 and out["closed_form"]["fraction"] == pytest.approx(3 / 19)
    r = cubelm("--stages", "4", "--microbatches", "8", "--schedule", "zb-h1", "--backward-weight-cost", "0.5")
    assert r.returncode == 0 and "bubble fraction" in r.stdout and "(p-1)(F+B-W)" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--stages", "3", "--microbatches", "8", "--schedule", "dualpipe"], "even --stages"),
    (["--stages", "4", "--microbatches", "6", "--schedule", "interleaved-1f1b"], "multiple"),
    (["--stages", "4", "--microbatches", "8", "--schedule", "1f1b", "--forward-cost", "-1"], "--forward-cost"),
    (["--stages", "4", "--microbatches", "8", "--schedule", "1f1b", "--png", "x.jpg"], ".png"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    r = cubelm(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("cubelm: error: ")
    assert needle in lines[0]
