"""The server's Prometheus metrics, in one registry per app (no global state).

Counted by the server as requests pass: requests by endpoint and status, request latency, prompt and
generated tokens, time to first token. Read from the engine at each scrape (between steps, through
`InferenceService.stats`): steps, preemptions and KV swaps, bytes crossing to and from the device,
bytes sealed each way (`cc`, `pipellm`), PipeLLM's speculation hits and misses and what it sealed in
vain. The epsilon a split-inference client spends is not here: the client sanitizes and charges its
own ledger, and sends the server nothing about it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from veil.server.service import ServiceStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """What the server counts, and `render()` for `/metrics`. `stats` reads the engine's counters."""

    def __init__(self, stats: Callable[[], ServiceStats]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "veil_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.request_latency = Histogram(
            "veil_http_request_duration_seconds",
            "time from a request's arrival to the end of its response (streams included)",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "veil_prompt_tokens", "prompt tokens of requests that started", registry=r
        )
        self.generated_tokens = Counter("veil_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "veil_time_to_first_token_seconds",
            "time from a request's submission to its first generated token",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        """The registry in Prometheus' text format (reads the engine: call it off the event loop)."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The engine's counters, read at each scrape."""

    def __init__(self, stats: Callable[[], ServiceStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield _gauge("veil_engine_up", "1 while the engine runs, 0 once it stopped", float(s.running))
        yield _gauge("veil_engine_requests_in_flight", "requests added and not finished", s.loop.in_flight)
        yield _counter("veil_engine_steps", "engine steps", s.engine.steps)
        yield _counter("veil_engine_aborted_requests", "requests aborted (clients gone)", s.loop.aborted)
        yield _counter(
            "veil_engine_preemptions", "requests preempted (swapped or recomputed)", s.engine.preemptions
        )
        yield _counter(
            "veil_engine_preemptions_by_recompute",
            "preemptions that dropped the KV cache",
            s.engine.preempted_by_recompute,
        )
        yield _by_direction(
            "veil_kv_blocks_swapped",
            "KV blocks swapped",
            s.engine.blocks_swapped_out,
            s.engine.blocks_swapped_in,
            ("out", "in"),
        )
        yield _by_direction(
            "veil_kv_bytes_swapped",
            "KV bytes swapped",
            s.engine.bytes_swapped_out,
            s.engine.bytes_swapped_in,
            ("out", "in"),
        )
        if s.free_device_blocks is not None:
            yield _gauge("veil_kv_device_blocks_free", "free KV blocks on the device", s.free_device_blocks)
        yield from _transport(s)


def _transport(s: ServiceStats) -> Iterator[Metric]:
    t = s.transport
    if t is None:
        return
    yield _by_direction(
        "veil_transport_bytes", "bytes moved between host and device", t.h2d_bytes, t.d2h_bytes
    )
    if t.sealed is not None:
        yield _by_direction(
            "veil_sealed_bytes",
            "plaintext bytes sealed with AES-256-GCM on the bus",
            t.sealed.h2d.plaintext_bytes,
            t.sealed.d2h.plaintext_bytes,
        )
        yield _counter(
            "veil_sealed_integrity_failures",
            "sealed messages refused as forged or replayed",
            t.sealed.integrity_failures,
        )
    if t.pipellm is not None:
        spec = t.pipellm.speculator
        yield _counter("veil_pipellm_hits", "transfers sent from a pre-sealed ciphertext", spec.hits)
        yield _counter("veil_pipellm_misses", "transfers the speculator mispredicted", spec.misses)
        yield _counter("veil_pipellm_decisions", "transfers the speculator decided", spec.requests)
        rate = spec.hits / spec.requests if spec.requests else 0.0
        yield _gauge("veil_pipellm_hit_rate", "hits / decisions since the server started", rate)
        yield _counter("veil_pipellm_wasted_bytes", "bytes sealed ahead and then dropped", spec.bytes_wasted)
        yield _counter(
            "veil_pipellm_burned_ciphertexts",
            "dropped pre-sealed chunks emitted to burn their IV",
            t.pipellm.burned_ciphertexts,
        )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _by_direction(
    name: str, doc: str, first: float, second: float, labels: tuple[str, str] = ("h2d", "d2h")
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["direction"])
    family.add_metric([labels[0]], first)
    family.add_metric([labels[1]], second)
    return family
