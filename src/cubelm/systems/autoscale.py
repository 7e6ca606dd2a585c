"""Autoscaling model (§6.2.2): replicas of ``cubelm serve`` under the Kubernetes HPA, driven by CPU or by KEDA's
queue metric, over a traffic trace, second by second, against a fixed fleet sized for the peak.

The parts, each from something measured or specified:

- ``CapacityCurve``: one replica's p99 latency against the request rate it serves, from ``cubelm bench serve``
  JSON runs at several rates; its capacity is the highest request throughput measured.
- The fleet as a fluid queue: each second ``A`` requests arrive, ready replicas serve up to ``ready * capacity``
  of them, the rest wait (``num_requests_waiting``). Latency is the curve at the per-replica load, plus the time
  to drain the backlog when there is one. CPU utilization of a pod = its busy fraction (load / capacity) * limit /
  request, as the HPA measures it against the container's CPU *request*.
- ``Autoscaler``: the HPA controller's algorithm (kubernetes pkg/controller/podautoscaler): every sync period
  desired = ceil(ready * utilization / target) for CPU (pods still starting are left out, or counted at 0 % when
  scaling up) and ceil(total / target) for an external AverageValue metric (KEDA's Prometheus trigger on the queue,
  or on running + waiting requests); no change while |ratio - 1| <= tolerance; the largest over metrics; then the
  behavior: the scale-down recommendation is the max over the stabilization window, the scale-up one the min over
  its window, and the change per period is capped by the policies (Pods or Percent, selectPolicy Max), within
  min/max replicas.
- Pod start: a new pod serves after image pull + model pull + load, rounded up to the readiness probe period.
  Scale-down removes starting pods first, then the newest (the ReplicaSet's order); they stop serving at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cubelm.errors import CubelmError


# ---- one replica ------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class CapacityCurve:
    load: np.ndarray  # request rate served per replica (req/s), ascending
    p99_ms: np.ndarray  # p99 of the SLO metric at that load
    capacity: float  # the most req/s one replica served
    mean_e2el_ms: np.ndarray | None = None  # mean end-to-end latency at each load (for in-flight counts)

    @classmethod
    def from_results(cls, results: list[dict], metric: str) -> "CapacityCurve":
        key = f"p99_{metric}_ms"
        pts = sorted((r["request_throughput"], r[key]) for r in results if r.get(key) is not None and r["completed"])
        if len(pts) < 2:
            raise CubelmError(f"the capacity curve needs >= 2 bench serve runs with {key} (at different rates); "
                              f"got {len(pts)}: run `cubelm bench serve --request-rate R1,R2,inf --save-result`")
        load, p99 = map(np.asarray, zip(*pts))
        means = sorted((r["request_throughput"], r.get("mean_e2el_ms")) for r in results
                       if r.get(key) is not None and r["completed"])
        mean = None if any(m is None for _, m in means) else np.maximum.accumulate(np.asarray([m for _, m in means]))
        return cls(load=load, p99_ms=np.maximum.accumulate(p99), capacity=float(load[-1]),  # latency never falls
                   mean_e2el_ms=mean)

    def latency_ms(self, load: float) -> float:
        return float(np.interp(load, self.load, self.p99_ms))  # below the first point: its (unloaded) value

    def inflight(self, load: float) -> float:
        """Requests in flight (running + waiting) in one replica serving ``load`` req/s: Little's law, load x the
        mean end-to-end latency there."""
        if self.mean_e2el_ms is None:
            raise CubelmError("in-flight counts need mean_e2el_ms in the bench serve results (cubelm bench serve "
                              "--save-result writes it)")
        return load * float(np.interp(load, self.load, self.mean_e2el_ms)) / 1000.0

    def max_load_within(self, slo_ms: float) -> float:
        """The highest per-replica request rate whose p99 stays within ``slo_ms`` (0 if even the lightest fails)."""
        if self.p99_ms[0] > slo_ms:
            return 0.0
        if self.p99_ms[-1] <= slo_ms:
            return self.capacity
        i = int(np.searchsorted(self.p99_ms, slo_ms, side="right"))  # p99[i-1] <= slo < p99[i]
        x0, x1, y0, y1 = self.load[i - 1], self.load[i], self.p99_ms[i - 1], self.p99_ms[i]
        return float(x0 + (x1 - x0) * (slo_ms - y0) / (y1 - y0)) if y1 > y0 else float(x0)


# ---- the HPA controller -----------------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class ScalingRules:
    """One direction of ``spec.behavior`` (autoscaling/v2)."""
    stabilization_s: int
    policies: list[tuple[str, int, int]]  # (Pods | Percent, value, periodSeconds)
    select: str = "Max"  # Max | Min | Disabled


@dataclass(slots=True, kw_only=True)
class AutoscalerConfig:
    """Defaults: deploy/k8s (base/autoscaling.yaml and components/keda/scaledobject.yaml)."""
    name: str = "hpa-cpu"
    metrics: tuple[str, ...] = ("cpu",)  # cpu, queue, inflight
    cpu_target: float = 70.0  # averageUtilization, % of the CPU request
    queue_target: float = 8.0  # KEDA Prometheus trigger threshold: waiting requests per replica (AverageValue)
    inflight_target: float = 8.0  # the same for running + waiting requests per replica
    min_replicas: int = 2
    max_replicas: int = 8
    tolerance: float = 0.1  # kube-controller-manager --horizontal-pod-autoscaler-tolerance
    sync_period_s: int = 15  # --horizontal-pod-autoscaler-sync-period
    scale_up: ScalingRules = field(default_factory=lambda: ScalingRules(stabilization_s=0,
                                                                         policies=[("Pods", 2, 60)]))
    scale_down: ScalingRules = field(default_factory=lambda: ScalingRules(stabilization_s=300,
                                                                           policies=[("Pods", 1, 120)]))

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise CubelmError(f"replicas: need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if not set(self.metrics) <= {"cpu", "queue", "inflight"} or not self.metrics:
            raise CubelmError(f"autoscaler metrics are cpu, queue and/or inflight, got {self.metrics}")
        if min(self.queue_target, self.inflight_target) <= 0:
            raise CubelmError("the queue and in-flight targets must be > 0")


def cpu_replicas(ready: int, starting_running: int, util_ready: float, target: float, tolerance: float,
                 current: int) -> int:
    """The HPA's resource-utilization recommendation (calcPlainMetricReplicas): average over ready pods; pods
    still starting (Running, not ready) count at 0 % when that would scale up, and must not flip the direction."""
    if ready == 0:
        return current
    ratio = util_ready / target
    if starting_running == 0 or ratio <= 1.0:
        return current if abs(1.0 - ratio) <= tolerance else math.ceil(ratio * ready)
    new_ratio = util_ready * ready / (target * (ready + starting_running))
    if abs(1.0 - new_ratio) <= tolerance or new_ratio < 1.0:
        return current
    return max(current, math.ceil(new_ratio * (ready + starting_running)))


def external_replicas(total: float, target: float, tolerance: float, current: int) -> int:
    """An External metric with an AverageValue target (what KEDA's ScaledObject creates): ceil(total / target)."""
    ratio = total / (target * current)
    return current if abs(1.0 - ratio) <= tolerance else math.ceil(total / target)


class Autoscaler:
    """The decisions of one HPA object: ``decide`` is one sync of the controller (recommendation → stabilization →
    rate limits → min/max), with the recommendation history and scale events it keeps between syncs."""

    def __init__(self, cfg: AutoscalerConfig) -> None:
        self.cfg = cfg
        self.recommendations: list[tuple[float, int]] = []
        self.up_events: list[tuple[float, int]] = []
        self.down_events: list[tuple[float, int]] = []

    def decide(self, now: float, current: int, desired: int) -> int:
        c = self.cfg
        if current > c.max_replicas or current < c.min_replicas:
            target = min(max(current, c.min_replicas), c.max_replicas)
        else:
            target = self._rate_limit(now, current, self._stabilize(now, current, desired))
        if target != current:
            (self.up_events if target > current else self.down_events).append((now, abs(target - current)))
        return target

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_cut, down_cut = now - self.cfg.scale_up.stabilization_s, now - self.cfg.scale_down.stabilization_s
        up = min([r for t, r in self.recommendations if t > up_cut] + [desired])
        down = max([r for t, r in self.recommendations if t > down_cut] + [desired])
        keep = max(self.cfg.scale_up.stabilization_s, self.cfg.scale_down.stabilization_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep] + [(now, desired)]
        return min(max(current, up), down)

    def _change_in_period(self, events, now: float, period: int) -> int:
        return sum(n for t, n in events if t > now - period)

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        c = self.cfg
        if desired > current:
            limits = []
            for kind, value, period in c.scale_up.policies:
                start = current - self._change_in_period(self.up_events, now, period) \
                    + self._change_in_period(self.down_events, now, period)
                limits.append(start + value if kind == "Pods" else math.ceil(start * (1 + value / 100)))
            limit = current if c.scale_up.select == "Disabled" else (
                max(limits) if c.scale_up.select == "Max" else min(limits))
            return min(desired, max(limit, current), c.max_replicas)
        if desired < current:
            limits = []
            for kind, value, period in c.scale_down.policies:
                start = current - self._change_in_period(self.up_events, now, period) \
                    + self._change_in_period(self.down_events, now, period)
                limits.append(start - value if kind == "Pods" else int(start * (1 - value / 100)))
            limit = current if c.scale_down.select == "Disabled" else (
                min(limits) if c.scale_down.select == "Max" else max(limits))
            return max(desired, min(limit, current), c.min_replicas)
        return desired


# ---- the simulation ---------------------------------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class PodTiming:
    image_pull_s: float = 60.0  # the CPU image (torch wheel) on a node that does not have it cached
    model_pull_s: float = 20.0  # init container: the store's pull into the PVC cache (a hit when it is warm)
    load_s: float = 10.0  # cubelm serve: load weights, warm up
    probe_period_s: float = 5.0  # startup / readiness probe period (deploy/k8s/base/serve.yaml)

    @property
    def pending_s(self) -> float:  # Pending phase: the HPA ignores the pod entirely
        return self.image_pull_s + self.model_pull_s

    @property
    def ready_s(self) -> float:
        return math.ceil((self.pending_s + self.load_s) / self.probe_period_s) * self.probe_period_s


@dataclass(slots=True)
class Timeline:
    name: str
    replicas: np.ndarray  # pods that exist (and cost), per second
    ready: np.ndarray
    latency_ms: np.ndarray  # p99 of the SLO metric for requests arriving that second (inf: nobody serving)
    waiting: np.ndarray  # requests queued at the end of the second
    scale_events: int


def simulate(rates: np.ndarray, curve: CapacityCurve, cfg: AutoscalerConfig | None, timing: PodTiming, *,
             cpu_limit_over_request: float = 2.0, cpu_window_s: int = 30, fixed: int | None = None,
             initial: int | None = None, latency_window_s: int = 10) -> Timeline:
    """Per-second fleet under ``cfg`` (or ``fixed`` replicas, never scaled). ``rates``: arrivals per second.
    ``initial``: replicas at t=0 (clamped to min/max; default min), ready since long before."""
    n = len(rates)
    start = fixed if cfg is None else min(max(initial or cfg.min_replicas, cfg.min_replicas), cfg.max_replicas)
    pods = [-1e9] * start  # creation times; the initial pods are long ready
    scaler = Autoscaler(cfg) if cfg is not None else None
    out_rep, out_ready, out_lat, out_wait = (np.zeros(n) for _ in range(4))
    util_hist: list[float] = []
    queue = 0.0
    for t in range(n):
        ready = sum(1 for c in pods if t - c >= timing.ready_s)
        cap = ready * curve.capacity
        demand = rates[t] + queue
        queue = max(0.0, demand - cap)
        if ready == 0:
            lat = math.inf
        elif queue > 1e-9:
            lat = curve.latency_ms(curve.capacity) + 1000.0 * queue / cap  # the backlog drains at capacity
        else:  # the curve's p99 is over a run: read it at the recent mean load, not one second's Poisson count
            lat = curve.latency_ms(float(np.mean(rates[max(0, t - latency_window_s + 1):t + 1])) / ready)
        util_hist.append(min(1.0, demand / cap) * cpu_limit_over_request * 100 if cap else 0.0)
        if scaler is not None and t % cfg.sync_period_s == 0 and t > 0:
            running = sum(1 for c in pods if timing.pending_s <= t - c < timing.ready_s)
            desired = 0
            if "cpu" in cfg.metrics:
                util = float(np.mean(util_hist[-cpu_window_s:]))
                desired = max(desired, cpu_replicas(ready, running, util, cfg.cpu_target, cfg.tolerance, len(pods)))
            if "queue" in cfg.metrics:
                desired = max(desired, external_replicas(queue, cfg.queue_target, cfg.tolerance, len(pods)))
            if "inflight" in cfg.metrics:
                # running (Little's law at this second's per-replica load) + waiting: the gauges as KEDA polls them
                total = ready * curve.inflight(min(demand, cap) / ready) + queue if ready else queue
                desired = max(desired, external_replicas(total, cfg.inflight_target, cfg.tolerance, len(pods)))
            target = scaler.decide(float(t), len(pods), desired)
            if target > len(pods):
                pods += [float(t)] * (target - len(pods))
            elif target < len(pods):
                pods = sorted(pods, key=lambda c: (t - c >= timing.ready_s, -c))[len(pods) - target:]
        out_rep[t], out_ready[t], out_lat[t], out_wait[t] = len(pods), ready, lat, queue
    name = cfg.name if cfg is not None else f"fixed {fixed}"
    return Timeline(name, out_rep, out_ready, out_lat, out_wait, len(scaler.up_events) + len(scaler.down_events)
                    if scaler else 0)


def summarize(tl: Timeline, rates: np.ndarray, slo_ms: float, hourly_price: float | None) -> dict:
    bad = tl.latency_ms > slo_ms
    hours = float(tl.replicas.sum()) / 3600
    return {"policy": tl.name, "replica_hours": hours, "slo_violation_s": int(bad.sum()),
            "violated_requests": float(rates[bad].sum()), "requests": float(rates.sum()),
            "violated_fraction": float(rates[bad].sum() / max(rates.sum(), 1e-9)),
            "min_replicas": int(tl.replicas.min()), "max_replicas": int(tl.replicas.max()),
            "scale_events": tl.scale_events, "max_waiting": float(tl.waiting.max()),
            "cost_usd": hours * hourly_price if hourly_price is not None else None}


# ---- traffic ----------------------------------------------------------------------------------------------------
def diurnal_trace(peak: float, *, hours: float = 24.0, trough_fraction: float = 0.2, low_hour: float = 4.0,
                  bursts: tuple[tuple[float, float, float], ...] = ((9.5, 10.0, 1.4), (20.0, 10.0, 1.3)),
                  seed: int = 0) -> np.ndarray:
    """Arrivals per second: a day's cosine from ``trough_fraction * peak`` (at ``low_hour``) to ``peak`` 12 h later,
    times each burst's factor during (start hour, minutes), clipped to ``peak``; then Poisson counts."""
    t = np.arange(int(hours * 3600)) / 3600.0
    level = trough_fraction + (1 - trough_fraction) * (1 - np.cos(2 * np.pi * (t - low_hour) / 24.0)) / 2
    for start, minutes, factor in bursts:
        level[(t >= start) & (t < start + minutes / 60)] *= factor
    return np.random.default_rng(seed).poisson(np.minimum(level, 1.0) * peak).astype(float)


def smoothed_peak(rates: np.ndarray, window_s: int = 60) -> float:
    """The highest ``window_s`` moving average: the peak a fleet is sized for (a queue absorbs per-second noise)."""
    w = min(window_s, len(rates))
    return float(np.convolve(rates, np.ones(w) / w, mode="valid").max())


def read_trace(path: str) -> np.ndarray:
    """A CSV of ``seconds,rate`` rows (a header line is skipped), interpolated to one value per second."""
    import csv
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    except OSError as e:
        raise CubelmError(f"cannot read the trace {path}: {e.strerror}") from None
    try:
        float(rows[0][0])
    except (ValueError, IndexError):
        rows = rows[1:]  # a header
    try:
        pts = np.asarray([(float(r[0]), float(r[1])) for r in rows])
    except (ValueError, IndexError):
        raise CubelmError(f"{path}: every row must be 'seconds,rate' (two numbers)") from None
    if len(pts) < 2 or np.any(np.diff(pts[:, 0]) <= 0) or np.any(pts[:, 1] < 0):
        raise CubelmError(f"{path}: need >= 2 rows, increasing seconds and rates >= 0")
    return np.interp(np.arange(pts[0, 0], pts[-1, 0] + 1), pts[:, 0], pts[:, 1])
