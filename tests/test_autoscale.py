"""The autoscaling model: HPA decisions against hand-computed ones (tolerance, pods still starting, stabilization
window, per-period policies), the capacity curve, and a trace on which autoscaling needs fewer replica-hours than a
fixed fleet sized for the peak."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cubelm.errors import CubelmError
from cubelm.systems.autoscale import (Autoscaler, AutoscalerConfig, CapacityCurve, PodTiming, ScalingRules,
                                      cpu_replicas, external_replicas, read_trace, simulate, summarize)
from helpers import assert_clean_error, cli_in_process

RUNS = [{"request_throughput": 5.0, "p99_e2el_ms": 100.0, "completed": 50},
        {"request_throughput": 10.0, "p99_e2el_ms": 200.0, "completed": 50},
        {"request_throughput": 20.0, "p99_e2el_ms": 2000.0, "completed": 50}]


def test_tolerance_and_formulas():
    # CPU: ceil(ready * utilization / target) unless |ratio - 1| <= 0.1
    assert cpu_replicas(4, 0, 75.0, 70.0, 0.1, 4) == 4  # ratio 1.071: within tolerance
    assert cpu_replicas(4, 0, 80.0, 70.0, 0.1, 4) == 5  # ratio 1.143: ceil(4.57)
    assert cpu_replicas(4, 0, 30.0, 70.0, 0.1, 4) == 2  # ceil(1.71)
    # KEDA's AverageValue on the queue: ceil(total / target) unless |total / (target * current) - 1| <= 0.1
    assert external_replicas(35.0, 8.0, 0.1, 4) == 4  # 35 / 32 = 1.09
    assert external_replicas(40.0, 8.0, 0.1, 4) == 5
    assert external_replicas(0.0, 8.0, 0.1, 4) == 0  # the HPA then clamps to minReplicas


def test_starting_pods_count_at_zero_when_scaling_up():
    # 2 ready at 105 %, 2 starting: (105 * 2) / (70 * 4) = 0.75 < 1 reverses the direction -> no change
    assert cpu_replicas(2, 2, 105.0, 70.0, 0.1, 4) == 4
    # at 210 %: 210 * 2 / (70 * 4) = 1.5 -> ceil(1.5 * 4) = 6
    assert cpu_replicas(2, 2, 210.0, 70.0, 0.1, 4) == 6


def test_behavior_policies_and_stabilization_window():
    cfg = AutoscalerConfig(min_replicas=1, max_replicas=10,
                           scale_up=ScalingRules(stabilization_s=0, policies=[("Pods", 4, 60)]),
                           scale_down=ScalingRules(stabilization_s=300, policies=[("Pods", 1, 60)]))
    hpa = Autoscaler(cfg)
    assert hpa.decide(0, 4, 8) == 8  # +4 allowed in the period
    assert hpa.decide(15, 8, 10) == 8  # the 4 pods added at t=0 use up this 60-s period's surge
    assert hpa.decide(75, 8, 10) == 10  # a new period (and max 10)
    assert hpa.decide(90, 10, 3) == 10  # the 300-s window still holds recommendations of 10
    assert hpa.decide(200, 10, 3) == 10
    assert hpa.decide(380, 10, 3) == 9  # only 3s left in the window (t > 80): down, 1 pod per 60 s
    assert hpa.decide(395, 9, 3) == 9
    assert hpa.decide(441, 9, 3) == 8
    assert hpa.decide(456, 8, 12) == 10  # up again: clamped to maxReplicas


def test_capacity_curve_interpolation():
    curve = CapacityCurve.from_results(RUNS, "e2el")
    assert curve.capacity == 20.0
    assert curve.latency_ms(7.5) == pytest.approx(150.0)
    assert curve.max_load_within(1000.0) == pytest.approx(10 + 10 * 800 / 1800)
    assert curve.max_load_within(50.0) == 0.0 and curve.max_load_within(5000.0) == 20.0
    with pytest.raises(CubelmError):
        CapacityCurve.from_results(RUNS[:1], "e2el")


def test_fixed_fleet_has_no_queue_and_latency_from_the_curve():
    curve = CapacityCurve.from_results(RUNS, "e2el")
    tl = simulate(np.full(120, 30.0), curve, None, PodTiming(), fixed=3)  # 10 req/s per replica
    assert np.all(tl.replicas == 3) and np.all(tl.waiting == 0) and np.allclose(tl.latency_ms, 200.0)
    tl = simulate(np.full(10, 50.0), curve, None, PodTiming(), fixed=2)  # 10 req/s over capacity: a backlog
    assert tl.waiting[-1] == pytest.approx(100.0) and tl.latency_ms[-1] == pytest.approx(2000 + 1000 * 100 / 40)


def test_autoscaling_uses_fewer_replica_hours_than_a_fixed_fleet():
    curve = CapacityCurve.from_results(RUNS, "e2el")
    # 1 h quiet (20 req/s), a 30-min ramp to 100 req/s, 30 min at the peak, 1 h quiet again
    rates = np.concatenate([np.full(3600, 20.0), np.linspace(20, 100, 1800), np.full(1800, 100.0),
                            np.full(3600, 20.0)])
    per_replica = curve.max_load_within(1000.0)
    fixed = int(np.ceil(100 / per_replica))
    timing = PodTiming(image_pull_s=30, model_pull_s=10, load_s=5)
    cfg = AutoscalerConfig(name="hpa-cpu", metrics=("cpu",), cpu_target=50.0, max_replicas=10)
    auto = summarize(simulate(rates, curve, cfg, timing, cpu_limit_over_request=1.0), rates, 1000.0, 0.5)
    base = summarize(simulate(rates, curve, None, timing, fixed=fixed), rates, 1000.0, 0.5)
    assert base["slo_violation_s"] == 0 and base["replica_hours"] == pytest.approx(fixed * 3.0)
    assert auto["replica_hours"] < 0.8 * base["replica_hours"] and auto["cost_usd"] < base["cost_usd"]
    assert auto["max_replicas"] >= fixed and auto["min_replicas"] == 2
    assert auto["violated_fraction"] < 0.01
    # the scale-down waits for the 300-s window after the load drops at t = 7200
    tl = simulate(rates, curve, cfg, timing, cpu_limit_over_request=1.0)
    assert tl.replicas[7200 + 290] == tl.replicas[7199]
    assert tl.replicas[-1] < tl.replicas[7199]


def test_trace_csv(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("seconds,rate\n0,10\n4,30\n")
    assert read_trace(str(f)).tolist() == [10, 15, 20, 25, 30]
    f.write_text("0,10\n0,5\n")
    with pytest.raises(CubelmError):
        read_trace(str(f))


def test_cli_summary_and_bad_input(tmp_path, capsys):
    for i, r in enumerate(RUNS):
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    trace = tmp_path / "t.csv"
    trace.write_text("0,20\n1800,100\n3600,20\n")
    r = cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--trace", trace, "--json",
                       "--hourly-price", 2.0)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fixed_replicas"] == 7 and [p["policy"] for p in out["policies"]][-1] == "fixed 7"
    assert out["policies"][-1]["cost_usd"] == pytest.approx(7 * 2.0 * 3601 / 3600)
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate"), "--capacity")
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--slo", "p99"),
                       "--slo")
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path / "nope"), "nope")
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", trace), "not a bench serve")
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--policies", "x"),
                       "--policies")


def test_inflight_trigger_counts_running_by_littles_law_and_scales_before_the_queue_does(tmp_path, capsys):
    runs = [dict(r, mean_e2el_ms=m) for r, m in zip(RUNS, (80.0, 150.0, 1500.0))]
    curve = CapacityCurve.from_results(runs, "e2el")
    assert curve.inflight(10.0) == pytest.approx(10.0 * 0.150)  # 10 req/s x 150 ms
    assert curve.inflight(7.5) == pytest.approx(7.5 * 0.115)  # mean latency interpolated like the p99
    with pytest.raises(CubelmError, match="mean_e2el_ms"):
        CapacityCurve.from_results(RUNS, "e2el").inflight(1.0)
    # a steady 30 req/s on 2 ready replicas (capacity 20 each): 15 req/s each, in flight 2 x 15 x 0.825 s = 24.75,
    # nothing waits; the queue trigger sees 0 and stays, the in-flight one (target 8 per replica) asks for 4
    rates = np.full(61, 30.0)
    timing = PodTiming(image_pull_s=0, model_pull_s=0, load_s=0, probe_period_s=1)
    queue = simulate(rates, curve, AutoscalerConfig(name="q", metrics=("queue",)), timing)
    inflight = simulate(rates, curve, AutoscalerConfig(name="i", metrics=("inflight",), inflight_target=8.0), timing)
    assert queue.waiting.max() == 0 and queue.replicas.max() == 2
    assert inflight.replicas[15] == 4  # ceil(24.75 / 8), within the +2 pods per minute policy
    # the CLI: the default threshold is 70 % of what a replica holds at the SLO's load, and a result set without
    # mean latencies leaves the policy out unless asked for (then a one-line error)
    for i, r in enumerate(runs):
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    trace = tmp_path / "t.csv"
    trace.write_text("0,20\n1800,100\n3600,20\n")
    r = cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--trace", trace, "--json")
    out = json.loads(r.stdout)
    load = curve.max_load_within(1000.0)
    assert out["inflight_target"] == pytest.approx(0.7 * curve.inflight(load))
    assert "keda-inflight" in [p["policy"] for p in out["policies"]]
    for i, r in enumerate(RUNS):
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    r = cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--trace", trace, "--json")
    assert r.returncode == 0 and "keda-inflight" not in [p["policy"] for p in json.loads(r.stdout)["policies"]]
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path, "--trace", trace,
                                      "--policies", "keda-inflight"), "mean_e2el_ms")
    assert_clean_error(cli_in_process(capsys, "autoscale", "simulate", "--capacity", tmp_path,
                                      "--inflight-target", "0"), "--inflight-target")
