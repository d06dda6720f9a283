"""Prometheus metrics of one server, rendered for ``GET /metrics``.

Counters and histograms are fed by the HTTP layer as requests finish; gauges
(queue, instances, downloads) are read from ``server.status()`` at scrape time,
so they are never stale. Each :class:`Metrics` has its own registry, so several
apps in one process (tests) do not share series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lllms_core.server import ModelServer

INSTANCE_STATES = ("loading", "idle", "busy", "disposing")
MODEL_STATES = ("unprepared", "preparing", "ready", "error")

# generation takes seconds to minutes, far beyond prometheus_client's default buckets
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StatusCollector(Collector):
    """Gauges computed from the server's status report when scraped."""

    def __init__(self, server: "ModelServer"):
        self.server = server

    def collect(self) -> Iterator[Metric]:
        if self.server.pool is None:  # not started (or stopped): nothing to report yet
            return
        status = self.server.status()
        yield GaugeMetricFamily("lllms_ready", "1 when the models that must be loaded at start are", value=int(status["ready"]))
        yield GaugeMetricFamily("lllms_queued_requests", "Requests waiting for an instance", value=status["queued"])
        yield GaugeMetricFamily("lllms_processing_requests", "Requests being processed", value=status["processing"])
        if status["concurrency"] is not None:
            yield GaugeMetricFamily("lllms_concurrency_limit", "Requests processed at once at most", value=status["concurrency"])

        instances = GaugeMetricFamily("lllms_instances", "Model instances by state", labels=["model", "state"])
        slots = GaugeMetricFamily("lllms_slots", "Sequence slots of loaded instances, busy or free", labels=["model", "state"])
        counts = {(model, state): 0 for model in status["models"] for state in INSTANCE_STATES}
        slot_counts = {(model, state): 0 for model in status["models"] for state in ("busy", "free")}
        for instance in status["instances"]:
            key = (instance["model"], instance["state"])
            counts[key] = counts.get(key, 0) + 1
            for slot in instance["slots"]:
                slot_counts[(instance["model"], "busy" if slot["busy"] else "free")] += 1
        for (model, state), count in counts.items():
            instances.add_metric([model, state], count)
        for (model, state), count in slot_counts.items():
            slots.add_metric([model, state], count)
        yield instances
        yield slots

        model_state = GaugeMetricFamily(
            "lllms_model_state", "1 for the preparation state each model is in", labels=["model", "state"]
        )
        downloaded = GaugeMetricFamily(
            "lllms_download_bytes", "Bytes received by a model's running downloads", labels=["model"]
        )
        size = GaugeMetricFamily(
            "lllms_download_size_bytes", "Total size of a model's running downloads, where known", labels=["model"]
        )
        for model, report in status["models"].items():
            for state in MODEL_STATES:
                model_state.add_metric([model, state], int(report.get("state") == state))
            downloads = report.get("downloads") or []
            if downloads:
                downloaded.add_metric([model], sum(d["downloaded"] for d in downloads))
                size.add_metric([model], sum(d["total"] or 0 for d in downloads))
        yield model_state
        yield downloaded
        yield size
        yield from _prompt_cache_metrics(status)
        memory = status.get("memory")
        if memory:
            yield GaugeMetricFamily("lllms_memory_budget_bytes", "The server's memory budget", value=memory["budget_bytes"])
            yield GaugeMetricFamily(
                "lllms_memory_used_bytes", "Memory the server counts against its budget (itself, instances, prompt caches)",
                value=memory["used_bytes"],
            )


PROMPT_CACHE_GAUGES = (("bytes", "Bytes of saved states held"), ("entries", "Saved states held"))
PROMPT_CACHE_COUNTERS = (
    ("hits", "Lookups whose longest saved prefix was found in this tier"),
    ("misses", "Lookups that found no saved prefix in this tier longer than what the slots held"),
    ("restores", "Saved states restored into a slot from this tier"),
    ("tokens_saved", "Prompt tokens restored from this tier instead of evaluated"),
)


def _prompt_cache_metrics(status: dict) -> Iterator[Metric]:
    """Per model and tier (ram, disk), from the prompt caches' reports."""
    families = [
        GaugeMetricFamily(f"lllms_prompt_cache_{name}", text, labels=["model", "tier"]) for name, text in PROMPT_CACHE_GAUGES
    ] + [
        CounterMetricFamily(f"lllms_prompt_cache_{name}", text, labels=["model", "tier"]) for name, text in PROMPT_CACHE_COUNTERS
    ]
    names = [name for name, _ in PROMPT_CACHE_GAUGES + PROMPT_CACHE_COUNTERS]
    for model, report in status["models"].items():
        for tier, figures in (report.get("prompt_cache") or {}).items():
            for family, name in zip(families, names):
                family.add_metric([model, tier], figures[name])
    yield from families


class Metrics:
    """The metrics of one :class:`ModelServer`; the HTTP layer reports into it."""

    def __init__(self, server: "ModelServer"):
        self.server = server
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lllms_requests", "HTTP requests finished, by route and status", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "lllms_request_duration_seconds",
            "Time from receiving a request to its last byte, by route",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.first_token_seconds = Histogram(
            "lllms_time_to_first_token_seconds",
            "Time from receiving a completion request to its first generated token",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "lllms_tokens_generated", "Completion tokens generated, by model", ["model"], registry=self.registry
        )
        self.registry.register(_StatusCollector(server))

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        """``route``: the route pattern (``/v1/chat/completions``), not the raw path, so
        that the number of series stays bounded."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_seconds.labels(route=route).observe(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        self.first_token_seconds.labels(model=model).observe(seconds)

    def tokens_generated(self, model: str, count: int) -> None:
        self.tokens.labels(model=model).inc(count)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        # 0.0.4: what every Prometheus version and scraper reads; our names need nothing newer
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
