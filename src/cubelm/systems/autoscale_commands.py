"""``cubelm autoscale simulate``: replicas, SLO violations and cost of autoscaling ``cubelm serve`` over a day.

    cubelm bench serve --request-rate 7,14,21,inf --save-result --result-dir runs/    # one replica's capacity curve
    cubelm autoscale simulate --capacity runs/ --slo e2el:1000 --hourly-price 0.09 --plot autoscale.png

Policies (defaults from deploy/k8s): ``hpa-cpu`` = the base HorizontalPodAutoscaler (CPU at 70 % of the request);
``keda`` = the ScaledObject of components/keda (queue ``cubelm:num_requests_waiting`` at 8 per replica, and CPU);
``keda-queue`` = a ScaledObject with the queue trigger only; ``keda-inflight`` = the gpu overlay's (running +
waiting requests per replica, at the in-flight count one replica holds at the SLO's load unless
``--inflight-target`` says otherwise). Each is compared with a fixed fleet sized for the trace's peak at the SLO.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError

POLICIES = {"hpa-cpu": ("cpu",), "keda": ("queue", "cpu"), "keda-queue": ("queue",), "keda-inflight": ("inflight",)}


@dataclass(slots=True, kw_only=True)
class SimulateOptions:
    capacity: list[str] = opt([], metavar="PATH", help="cubelm bench serve --save-result JSON files or directories "
                                                        "of them (>= 2 rates; repeat the flag)")
    slo: str = opt("e2el:1000", help="METRIC:MS, the p99 that must hold (ttft, tpot, itl, e2el)")
    trace: str | None = opt(None, help="CSV of 'seconds,rate' rows; default: a built-in day (diurnal + 2 bursts)")
    peak_rate: float | None = opt(None, help="built-in trace: peak req/s (default: 6 replicas' load at the SLO)")
    trough_fraction: float = opt(0.2, help="built-in trace: the night's rate as a fraction of the peak")
    hours: float = opt(24.0, help="built-in trace: length in hours")
    seed: int = opt(0, help="seed of the built-in trace's Poisson counts")
    policies: str | None = opt(None, help="comma list of hpa-cpu, keda, keda-queue, keda-inflight (default: all; "
                                          "keda-inflight only when the results have mean_e2el_ms)")
    min_replicas: int = opt(2, help="minReplicas / minReplicaCount")
    max_replicas: int = opt(8, help="maxReplicas / maxReplicaCount")
    cpu_target: float = opt(70.0, help="CPU averageUtilization target, % of the request")
    queue_target: float = opt(8.0, help="KEDA threshold: waiting requests per replica")
    inflight_target: float | None = opt(None, help="KEDA threshold: running + waiting requests per replica (default: "
                                                   "70 % of what one replica holds at the SLO's load, by Little's "
                                                   "law)")
    tolerance: float = opt(0.1, help="HPA tolerance: no change while |metric/target - 1| <= this")
    sync_period: int = opt(15, help="seconds between HPA syncs")
    scale_up_window: int = opt(0, help="scaleUp stabilizationWindowSeconds")
    scale_down_window: int = opt(300, help="scaleDown stabilizationWindowSeconds")
    scale_up_pods: int = opt(2, help="scaleUp policy: at most this many pods per --scale-up-period")
    scale_up_period: int = opt(60, help="scaleUp policy periodSeconds")
    scale_down_pods: int = opt(1, help="scaleDown policy: at most this many pods per --scale-down-period")
    scale_down_period: int = opt(120, help="scaleDown policy periodSeconds")
    cpu_request: float = opt(0.5, help="the container's CPU request (cores; utilization is measured against it)")
    cpu_limit: float = opt(1.0, help="the container's CPU limit (cores; what a saturated replica uses)")
    image_pull_s: float = opt(60.0, help="pod start: image pull seconds")
    model_pull_s: float = opt(20.0, help="pod start: model pull into the cache (init container) seconds")
    load_s: float = opt(10.0, help="pod start: model load until /ready seconds")
    hourly_price: float | None = opt(None, help="USD per replica-hour: cost of each policy and of the fixed fleet")
    plot: str | None = opt(None, help="write a PNG: traffic, replicas and p99 latency over time")
    json_output: bool = opt(False, flag="--json", help="print the summary as JSON")

    def __post_init__(self) -> None:
        if not self.capacity:
            raise CubelmError("--capacity is required: bench serve JSON files (cubelm bench serve --save-result)")
        bad = [p for p in self.policy_list if p not in POLICIES]
        if bad or not self.policy_list:
            raise CubelmError(f"--policies takes {', '.join(POLICIES)}; got {self.policies!r}")
        for name in ("sync_period", "scale_up_period", "scale_down_period", "scale_up_pods", "scale_down_pods"):
            if getattr(self, name) < 1:
                raise CubelmError(f"--{name.replace('_', '-')} must be >= 1")
        if min(self.cpu_target, self.queue_target, self.cpu_request, self.cpu_limit, self.hours,
               1.0 if self.inflight_target is None else self.inflight_target) <= 0:
            raise CubelmError("--cpu-target, --queue-target, --inflight-target, --cpu-request, --cpu-limit and "
                              "--hours must be > 0")
        if min(self.image_pull_s, self.model_pull_s, self.load_s, self.tolerance) < 0 or self.scale_down_window < 0 \
                or self.scale_up_window < 0:
            raise CubelmError("pod start times, windows and --tolerance must be >= 0")
        if not 0 <= self.trough_fraction <= 1:
            raise CubelmError(f"--trough-fraction must be in [0, 1], got {self.trough_fraction}")
        self.slo_pair  # noqa: B018 - validates --slo

    @property
    def policy_list(self) -> list[str]:
        if self.policies is None:
            return list(POLICIES)
        return [p.strip() for p in self.policies.split(",") if p.strip()]

    @property
    def slo_pair(self) -> tuple[str, float]:
        name, _, ms = self.slo.partition(":")
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if name not in ("ttft", "tpot", "itl", "e2el") or not value > 0:
            raise CubelmError(f"--slo takes METRIC:MS with METRIC in ttft, tpot, itl, e2el and MS > 0; "
                              f"got {self.slo!r}")
        return name, value


def load_results(paths: list[str]) -> list[dict]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise CubelmError(f"--capacity {p}: no such file or directory")
    results = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CubelmError(f"{f} is not a bench serve JSON file ({type(e).__name__})") from None
        if not isinstance(r, dict) or "request_throughput" not in r:
            raise CubelmError(f"{f} is not a bench serve result (no request_throughput); use cubelm bench serve "
                              "--save-result")
        results.append(r)
    return results


def _config(o: SimulateOptions, name: str, inflight_target: float):
    from cubelm.systems.autoscale import AutoscalerConfig, ScalingRules
    return AutoscalerConfig(
        name=name, metrics=POLICIES[name], cpu_target=o.cpu_target, queue_target=o.queue_target,
        inflight_target=inflight_target,
        min_replicas=o.min_replicas, max_replicas=o.max_replicas, tolerance=o.tolerance, sync_period_s=o.sync_period,
        scale_up=ScalingRules(stabilization_s=o.scale_up_window, policies=[("Pods", o.scale_up_pods,
                                                                            o.scale_up_period)]),
        scale_down=ScalingRules(stabilization_s=o.scale_down_window, policies=[("Pods", o.scale_down_pods,
                                                                                o.scale_down_period)]))


def run_simulate(o: SimulateOptions) -> int:
    import numpy as np

    from cubelm.systems.autoscale import (CapacityCurve, PodTiming, diurnal_trace, read_trace, simulate,
                                          smoothed_peak, summarize)
    metric, slo_ms = o.slo_pair
    curve = CapacityCurve.from_results(load_results(o.capacity), metric)
    per_replica = curve.max_load_within(slo_ms)
    if per_replica <= 0:
        raise CubelmError(f"even the lightest measured load misses the SLO (p99 {metric} {curve.p99_ms[0]:.0f} ms > "
                          f"{slo_ms:g} ms): loosen --slo")
    rates = read_trace(o.trace) if o.trace else diurnal_trace(o.peak_rate or 6 * per_replica, hours=o.hours,
                                                              trough_fraction=o.trough_fraction, seed=o.seed)
    peak = smoothed_peak(rates)
    fixed = max(1, math.ceil(peak / per_replica))
    initial = math.ceil(float(rates[:60].mean()) / per_replica)  # start in the steady state of the first minute
    timing = PodTiming(image_pull_s=o.image_pull_s, model_pull_s=o.model_pull_s, load_s=o.load_s)
    policies = o.policy_list
    if o.policies is None and curve.mean_e2el_ms is None:
        policies.remove("keda-inflight")  # results without mean latencies: nothing to count in-flight requests from
    # the in-flight trigger's default aims below the SLO's edge, as the CPU target (70 %) does
    inflight_target = o.inflight_target or (0.7 * curve.inflight(per_replica) if "keda-inflight" in policies else 8.0)
    ratio = o.cpu_limit / o.cpu_request
    lines = [simulate(rates, curve, _config(o, p, inflight_target), timing, cpu_limit_over_request=ratio,
                      initial=initial) for p in policies]
    lines.append(simulate(rates, curve, None, timing, fixed=fixed))
    rows = [summarize(tl, rates, slo_ms, o.hourly_price) for tl in lines]
    fixed_hours = rows[-1]["replica_hours"]
    for r in rows:
        r["vs_fixed"] = r["replica_hours"] / fixed_hours
    info = {"slo": {metric: slo_ms}, "capacity_req_s": curve.capacity, "load_within_slo_req_s": per_replica,
            "peak_req_s": peak, "mean_req_s": float(rates.mean()), "seconds": len(rates),
            "fixed_replicas": fixed, "pod_ready_s": timing.ready_s, "inflight_target": inflight_target,
            "policies": rows}
    if o.json_output:
        print(json.dumps(info, indent=2))
    else:
        print(f"one replica: {curve.capacity:.2f} req/s at most, {per_replica:.2f} req/s within p99 {metric} <= "
              f"{slo_ms:g} ms; trace: {len(rates)} s, mean {rates.mean():.1f} req/s, peak {peak:.0f} req/s "
              "(1-min mean); "
              f"fixed fleet for the peak: {fixed} replicas; a new pod is ready after {timing.ready_s:g} s")
        if "keda-inflight" in policies:
            print(f"keda-inflight: threshold {inflight_target:.2f} running + waiting requests per replica")
        if fixed > o.max_replicas:
            print(f"note: the peak needs {fixed} replicas, more than --max-replicas {o.max_replicas}")
        print(markdown_table(rows))
    if o.plot:
        path = plot_timelines(lines, rates, curve, slo_ms, metric, o.plot)
        print(f"wrote {path}")
    return 0 if np.isfinite(rows[-1]["replica_hours"]) else 1


def markdown_table(rows: list[dict]) -> str:
    priced = rows[0]["cost_usd"] is not None
    head = ["policy", "replica-hours", "vs fixed", *(["cost USD"] if priced else []), "SLO-violation s",
            "violated requests", "replicas min-max", "scale events", "max waiting"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([
            r["policy"], f"{r['replica_hours']:.1f}", f"{r['vs_fixed']:.2f}",
            *([f"{r['cost_usd']:.2f}"] if priced else []), str(r["slo_violation_s"]),
            f"{r['violated_requests']:.0f} ({100 * r['violated_fraction']:.2f} %)",
            f"{r['min_replicas']}-{r['max_replicas']}", str(r["scale_events"]), f"{r['max_waiting']:.0f}"]) + " |")
    return "\n".join(out)


def plot_timelines(lines, rates, curve, slo_ms: float, metric: str, path: str) -> Path:
    """Three panels sharing a time axis in hours, each series as per-minute values (latency: the minute's max)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    minutes = len(rates) // 60
    per_min = lambda x, f=np.mean: f(np.asarray(x[:minutes * 60]).reshape(minutes, 60), axis=1)  # noqa: E731
    hours = np.arange(minutes) / 60
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.4), dpi=80, sharex=True)
    axes[0].plot(hours, per_min(rates), color="k", lw=0.8, label="arrivals")
    for i, tl in enumerate(lines):
        axes[0].plot(hours, per_min(tl.ready) * curve.capacity, lw=0.8, color=f"C{i}", label=f"capacity {tl.name}")
        axes[1].plot(hours, per_min(tl.replicas), lw=1.0, color=f"C{i}", label=tl.name)
        lat = np.minimum(per_min(tl.latency_ms, np.max), 1e6)
        axes[2].plot(hours, lat, lw=0.8, color=f"C{i}", label=tl.name)
    axes[2].axhline(slo_ms, color="r", ls="--", lw=0.8, label=f"SLO {slo_ms:g} ms")
    axes[0].set(ylabel="req/s", title="traffic and ready capacity")
    axes[1].set(ylabel="replicas (pods)", title="replicas, incl. starting pods")
    axes[2].set(ylabel=f"p99 {metric.upper()} ms", yscale="log", xlabel="hour", title="p99 latency (per-minute max)")
    for ax in axes:
        ax.legend(fontsize=6, ncol=3, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
