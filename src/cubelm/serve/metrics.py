"""Prometheus metrics (§6.2.5), named after vLLM's with a ``cubelm:`` prefix so vLLM dashboards carry over.

Engine state (running / waiting requests, KV-cache usage, prefix-cache and token counters, preemptions, speculative
acceptance) is read from ``LLMEngine.stats()`` at scrape time by a custom collector, so the engine loop pays nothing
for it. Per-request latencies are observed by the server when a request finishes, from the engine's monotonic
timestamps: TTFT and end-to-end latency are measured from the moment the server received the request, so they
include admission and queueing, which is what a client sees.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # the *_created series only double the scrape size

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

_GAUGES = {"num_requests_running": "Requests in the running batch.",
           "num_requests_waiting": "Requests waiting to be scheduled.",
           "kv_cache_usage_perc": "Fraction of KV-cache blocks in use (0..1)."}
_COUNTERS = {"prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
             "prefix_cache_hits": "Prompt tokens found in the prefix cache.",
             "num_preemptions": "Sequences preempted for lack of KV blocks.",
             "prompt_tokens": "Prompt tokens admitted.",
             "generation_tokens": "Tokens generated.",
             "spec_decode_num_draft_tokens": "Speculative tokens proposed.",
             "spec_decode_num_accepted_tokens": "Speculative tokens accepted."}


class EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        if self.engine is None:
            return
        stats = self.engine.stats()  # NOTE: read from another thread; each value is a plain int/float read
        for name, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"cubelm:{name}", doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats[name]))
            yield g
        for name, doc in _COUNTERS.items():
            c = CounterMetricFamily(f"cubelm:{name}", doc, labels=["model_name"])
            c.add_metric([self.model_name], float(stats[name]))
            yield c


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.collector = EngineCollector(None, model_name)
        self.registry.register(self.collector)
        r, labels = self.registry, ["model_name"]
        self.request_success = Counter("cubelm:request_success", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.request_rejected = Counter("cubelm:request_rejected", "Requests refused before generation, by reason "
                                        "(rate_limit, queue_full, draining, auth, invalid, timeout, disconnect).",
                                        labels + ["reason"], registry=r)
        self.feature_lookups = Counter("cubelm:feature_lookups", "Feature-store lookups for chat requests with a "
                                       "user (--feature-store), by result (personalized, unknown_user, error).",
                                       labels + ["result"], registry=r)
        self.ttft = Histogram("cubelm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("cubelm:time_per_output_token_seconds", "Mean time per output token after the first, "
                              "per request.", labels, buckets=TPOT_BUCKETS, registry=r)
        self.itl = Histogram("cubelm:inter_token_latency_seconds", "Time between consecutive output tokens.", labels,
                             buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("cubelm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=r)

    def attach(self, engine) -> None:
        self.collector.engine = engine

    def rejected(self, reason: str) -> None:
        self.request_rejected.labels(self.model_name, reason).inc()

    def feature_lookup(self, result: str) -> None:
        self.feature_lookups.labels(self.model_name, result).inc()

    def observe_finished(self, out, received: float, finished: float, num_tokens: int) -> None:
        """Record one finished request (a ``RequestOutput``) that generated ``num_tokens``; ``received`` /
        ``finished`` are monotonic times."""
        m, name = out.metrics, self.model_name
        # one count per request, as vLLM does (with n > 1, the first sequence's reason)
        self.request_success.labels(name, out.outputs[0].finish_reason or "abort").inc()
        self.e2e.labels(name).observe(finished - received)
        if m is None or m.first_token_time is None:
            return
        ttft = m.first_token_time - received
        self.ttft.labels(name).observe(max(0.0, ttft))
        times = sorted(m.token_times)
        for a, b in zip(times, times[1:]):
            self.itl.labels(name).observe(b - a)
        if num_tokens > 1:
            self.tpot.labels(name).observe(max(0.0, (finished - received - ttft) / (num_tokens - 1)))
