"""The proxy's Prometheus metrics, aggregated over worker processes.

Workers write their samples to memory-mapped files (prometheus_client's
multiprocess mode); the supervisor's /metrics merges them. Each process builds
its own `ProxyMetrics` on a private registry: no global state.
"""
from __future__ import annotations

import bisect
import fcntl
import glob
import os
import shutil
import tempfile
from collections import defaultdict

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


_DIR_LOCK = ".alive"


def hold_multiprocess_dir() -> int | None:
    """A shared lock on the metrics directory, held by the supervisor and each worker for
    their lifetime (fd, or None).

    When the supervisor is gone (SIGKILL) the workers remove the directory themselves: the
    one that can then take the lock exclusively is the last process using it. flock() locks
    belong to the open file, which a fork shares: each process opens its own, and a worker
    closes the supervisor's copy it inherited.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return None
    try:
        fd = os.open(os.path.join(directory, _DIR_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def release_multiprocess_dir(fd: int | None, *, remove_if_last: bool) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if fd is not None:
        os.close(fd)
    if not remove_if_last or not directory:
        return
    try:
        fd = os.open(os.path.join(directory, _DIR_LOCK), os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return                     # already removed by another worker
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return                     # another worker still runs: it removes the directory
    finally:
        os.close(fd)
    remove_multiprocess_dir(directory)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay summed)."""
    multiprocess.mark_process_dead(pid)


class _SizedFilesCollector(multiprocess.MultiProcessCollector):
    """MultiProcessCollector that skips .db files not yet sized.

    prometheus_client creates a process's file before it sizes it (client_python issue
    #1199): a scrape in that window, for instance while a worker starts, raised struct.error
    and /metrics and /status answered 500. Such a file holds nothing yet.
    """

    def collect(self):
        files = [f for f in glob.glob(os.path.join(self._path, "*.db")) if _has_header(f)]
        return self.merge(files, accumulate=True)


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8
    except OSError:
        return False        # gone between the glob and now (a dead worker's live gauge)


def aggregated_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    _SizedFilesCollector(registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return prometheus_client.generate_latest(registry)


class ProxyMetrics:
    """Every metric a worker updates."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.registry = r
        # `listener` is the listen address the client reached (host:port as bound, one per
        # listen_addr); `backend` is the route's *configured* backend ("10.0.0.5:443",
        # "$sni:443"): both bounded by the config, never by what clients send.
        self.connections = Counter(
            "sniproxy_connections", "Connections handled, by route, outcome and listener",
            ["route", "outcome", "listener"], registry=r)
        self.active = Gauge(
            "sniproxy_active_connections", "Connections open now (all workers), by listener",
            ["listener"], registry=r, multiprocess_mode="livesum")
        self.bytes = Counter(
            "sniproxy_bytes", "Bytes relayed, counted when a connection ends",
            ["direction", "listener"], registry=r)
        self.hello_failures = Counter(
            "sniproxy_client_hello_failures", "ClientHellos that could not be routed, by reason",
            ["reason"], registry=r)
        self.connect_seconds = Histogram(
            "sniproxy_upstream_connect_seconds",
            "Time to connect to the backend (incl. DNS and SOCKS5 negotiation)",
            ["upstream", "backend"], buckets=CONNECT_BUCKETS, registry=r)
        self.connect_failures = Counter(
            "sniproxy_upstream_connect_failures",
            "Failed backend connections, by upstream, configured backend and kind",
            ["upstream", "backend", "kind"], registry=r)
        self.limit_reached = Counter(
            "sniproxy_connection_limit_reached",
            "Times max_connections was reached and accepting paused", registry=r)
        self.accept_errors = Counter(
            "sniproxy_accept_errors", "accept() failures by errno (EMFILE: out of fds)",
            ["errno"], registry=r)
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


class HotPath:
    """Per-connection counts kept in plain Python and published once a second.

    In multiprocess mode every metric update is an mmap write behind a lock plus a
    getpid() syscall; a connection made ~15 of them. Summing here and flushing deltas
    made the per-connection metrics cost negligible; /metrics lags by at most a second.
    """

    def __init__(self, metrics: ProxyMetrics):
        self.metrics = metrics
        #: open connections by listener (a listener stays once seen: its gauge reads 0, not absent)
        self.active: dict[str, int] = defaultdict(int)
        self._active_published: dict[str, int] = {}
        self._connections: dict[tuple[str, str, str], int] = defaultdict(int)
        self._relays: dict[str, int] = defaultdict(int)
        self._bytes: dict[tuple[str, str], int] = defaultdict(int)
        bounds = list(CONNECT_BUCKETS) + [float("inf")]
        self._bounds = bounds
        self._connect: dict[tuple[str, str], list] = {}

    def opened(self, listener: str) -> None:
        self.active[listener] += 1

    def closed(self, listener: str) -> None:
        self.active[listener] -= 1

    def connection_done(self, route: str, outcome: str, bytes_up: int, bytes_down: int,
                        listener: str) -> None:
        self._connections[(route, outcome, listener)] += 1
        if bytes_up:
            self._bytes[("client_to_backend", listener)] += bytes_up
        if bytes_down:
            self._bytes[("backend_to_client", listener)] += bytes_down

    def relay_chosen(self, kind: str) -> None:
        self._relays[kind] += 1

    def connect_time(self, upstream: str, backend: str, seconds: float) -> None:
        key = (upstream, backend)
        entry = self._connect.get(key)
        if entry is None:
            entry = self._connect[key] = [[0] * len(self._bounds), 0.0]
        entry[0][bisect.bisect_left(self._bounds, seconds)] += 1
        entry[1] += seconds

    def flush(self) -> None:
        m = self.metrics
        for listener, n in self.active.items():
            if self._active_published.get(listener) != n:
                m.active.labels(listener).set(n)
                self._active_published[listener] = n
        if self._connections:
            for (route, outcome, listener), n in self._connections.items():
                m.connections.labels(route, outcome, listener).inc(n)
            self._connections.clear()
        for kind, n in self._relays.items():
            m.relay_mode.labels(kind).inc(n)
        self._relays.clear()
        for (direction, listener), n in self._bytes.items():
            m.bytes.labels(direction, listener).inc(n)
        self._bytes.clear()
        for (upstream, backend), (counts, total) in self._connect.items():
            hist = m.connect_seconds.labels(upstream, backend)
            buckets = getattr(hist, "_buckets", None)
            if buckets is not None and len(buckets) == len(counts):
                # Histogram stores per-bucket (non-cumulative) counts: add ours in one go.
                for value, n in zip(buckets, counts):
                    if n:
                        value.inc(n)
                hist._sum.inc(total)
            else:   # prometheus_client changed its internals: the slow, public way
                for bound, n in zip(self._bounds, counts):
                    for _ in range(n):
                        hist.observe(min(bound, total))
        self._connect.clear()
