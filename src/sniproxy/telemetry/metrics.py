"""The proxy's Prometheus metrics, aggregated over worker processes.

Workers write their samples to memory-mapped files (prometheus_client's
multiprocess mode); the supervisor's /metrics merges them. Each process builds
its own `ProxyMetrics` on a private registry: no global state.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess, values

# Connect latency buckets: loopback (sub-ms) to slow SOCKS chains and timeouts.
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def enable_multiprocess(directory: str | None = None) -> str:
    """Switch prometheus_client to multiprocess mode (must run before any metric exists)."""
    directory = directory or tempfile.mkdtemp(prefix="sni-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue()
    return directory


def remove_multiprocess_dir(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay summed)."""
    multiprocess.mark_process_dead(pid)


def aggregated_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return prometheus_client.generate_latest(registry)


class ProxyMetrics:
    """Every metric a worker updates."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.registry = r
        self.connections = Counter(
            "sniproxy_connections", "Connections handled, by route and outcome",
            ["route", "outcome"], registry=r)
        self.active = Gauge(
            "sniproxy_active_connections", "Connections open now (all workers)",
            registry=r, multiprocess_mode="livesum")
        self.bytes = Counter(
            "sniproxy_bytes", "Bytes relayed, counted when a connection ends",
            ["direction"], registry=r)
        self.hello_failures = Counter(
            "sniproxy_client_hello_failures", "ClientHellos that could not be routed, by reason",
            ["reason"], registry=r)
        self.connect_seconds = Histogram(
            "sniproxy_upstream_connect_seconds",
            "Time to connect to the backend (incl. DNS and SOCKS5 negotiation)",
            ["upstream"], buckets=CONNECT_BUCKETS, registry=r)
        self.connect_failures = Counter(
            "sniproxy_upstream_connect_failures", "Failed backend connections, by upstream and kind",
            ["upstream", "kind"], registry=r)
        self.limit_reached = Counter(
            "sniproxy_connection_limit_reached",
            "Times max_connections was reached and accepting paused", registry=r)
        self.dns_lookups = Counter(
            "sniproxy_dns_cache_lookups", "DNS cache lookups by level and result",
            ["level", "result"], registry=r)
        self.relay_mode = Counter(
            "sniproxy_relay_connections", "Connections by relay path (sockmap, splice, copy)",
            ["relay"], registry=r)
        self.reloads = Counter(
            "sniproxy_config_reloads", "Config reloads by result", ["result"], registry=r)
        self.worker_restarts = Counter(
            "sniproxy_worker_restarts", "Worker processes restarted after dying", registry=r)
