"""``GET /metrics``: Prometheus text for the server and its engine.

Each app has its own ``CollectorRegistry`` (several servers can live in one process, as in tests).
The engine's live numbers (queue depth, running rows, tokens/s, generated tokens, per-expert
counts) are read from ``engine.stats()`` at scrape time; the request histograms and counters are
kept here. The process collector adds ``process_resident_memory_bytes`` (the load test reads it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class EngineCollector(Collector):
    """Gauges read from ``engine.stats()`` (an ``EngineStats``) when Prometheus scrapes."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        get = stats.get if isinstance(stats, dict) else lambda k, d=None: getattr(stats, k, d)
        gauges = {
            "queue_depth": ("peftkit_queue_depth", "requests waiting for a batch slot"),
            "running": ("peftkit_running_rows", "requests decoding in the running batch"),
            "tokens_per_second": ("peftkit_tokens_per_second", "generated tokens per second (recent window)"),
        }
        for key, (name, doc) in gauges.items():
            value = get(key)
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        counters = (
            ("generated_tokens", "peftkit_generated_tokens", "tokens generated since start"),
            ("finished_requests", "peftkit_finished_requests", "requests finished since start"),
        )
        for key, name, doc in counters:
            value = get(key)
            if value is not None:
                yield CounterMetricFamily(name, doc, value=float(value))
        per_expert = get("requests_by_expert") or {}
        if per_expert:
            family = CounterMetricFamily(
                "peftkit_engine_expert_requests", "requests the engine has admitted, per expert", labels=["expert"]
            )
            for expert, count in per_expert.items():
                family.add_metric([str(expert)], float(count))
            yield family


class ServerMetrics:
    """The server's own metrics: request latency and time to first token, and per-expert counts."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        ProcessCollector(registry=self.registry)
        self.latency = Histogram(
            "peftkit_request_latency_seconds", "request latency, arrival to last token", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "peftkit_time_to_first_token_seconds", "request arrival to its first token", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "peftkit_requests", "finished requests, per expert and finish reason", ["expert", "finish_reason"],
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter("peftkit_http_errors", "error answers, per status", ["status"], registry=self.registry)

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
