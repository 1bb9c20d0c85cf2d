"""Where the proxy's continuous profiles go (OTLP, pprof files) and what /metrics shows of them.

The supervisor calls start_continuous_profiling(); sniproxy.observe.continuous does the sampling
and draining and knows nothing of these sinks.
"""
from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sniproxy.observe.config import create_recommended_config
from sniproxy.observe.continuous import ContinuousProfiler

from .otlp_common import MAX_BACKOFF_S, ExportState, build_resource
from .otlp_profiles import OtlpProfileExporter, ProfileExportError, to_otlp_request
from .pprof import to_pprof

log = logging.getLogger("sniproxy")

PPROF_NAME = re.compile(r"cpu-\d{8}T\d{6}Z-\d{6}\.pb\.gz\Z")


class PprofDirSink:
    """Writes each profile as `cpu-<UTC time>-<seq>.pb.gz` (atomically) and keeps the newest
    `retention` files: the directory's size is bounded."""

    def __init__(self, directory: str, retention: int):
        self.directory = directory
        self.retention = retention
        self.seq = 0
        os.makedirs(directory, exist_ok=True)
        self.written: list[str] = []

    def __call__(self, profile) -> None:
        if not profile.samples:
            return
        self.seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(profile.start_time_ns / 1e9))
        path = os.path.join(self.directory, f"cpu-{stamp}-{self.seq:06d}.pb.gz")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(to_pprof(profile))
        os.replace(tmp, path)
        self.prune()

    def prune(self) -> None:
        files = sorted(name for name in os.listdir(self.directory) if PPROF_NAME.match(name))
        for name in files[: max(0, len(files) - self.retention)]:
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass


#: First wait before resending a profile the collector did not take; doubled per failure in a
#: row, up to the export interval (a collector down for long is tried about once per profile).
FIRST_RETRY_S = 1.0
#: At stop, pending profiles get this long to leave (not when the collector is failing).
STOP_FLUSH_S = 5.0


@dataclass
class _Pending:
    request: object            # the ExportProfilesServiceRequest, built once
    samples: int
    attempts: int = 0


class OtlpProfileSink:
    """Exports each profile over OTLP from its own thread, so a slow or absent collector never
    holds the profiler's drains. Profiles wait in a bounded queue (`queue_size`; when full the
    oldest is dropped and counted); one that fails in a retryable way (unreachable, UNAVAILABLE,
    HTTP 503, timeout) is resent after a backoff (FIRST_RETRY_S, doubled per failure in a row,
    at most the export interval), at most `max_attempts` times; one the collector rejects is
    dropped at once. Results: the ExportState of signal "profiles" (/metrics, /status), one log
    line per failure streak."""

    def __init__(self, exporter: OtlpProfileExporter, resource_attributes: dict, interval_s: float, *,
                 queue_size: int = 16, max_attempts: int = 8, first_retry_s: float = FIRST_RETRY_S):
        self.exporter = exporter
        self.resource_attributes = resource_attributes
        self.queue_size = queue_size
        self.max_attempts = max_attempts
        self.first_retry_s = first_retry_s
        self.max_backoff_s = max(first_retry_s, min(interval_s, MAX_BACKOFF_S))
        self.state = ExportState("profiles", exporter.endpoint, interval_s,
                                 status_path='"profiling.otlp"', max_backoff_s=self.max_backoff_s)
        self.state.set_queued(0)
        #: CPU time of this sink's thread (serializing, sending): part of the profiling overhead
        self.cpu_ns = 0
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._retry_at = 0.0            # monotonic time before which nothing is sent (backoff)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sni-proxy-otlp-profiles", daemon=True)
        self._thread.start()

    def __call__(self, profile) -> None:
        """Queue a profile (the profiler's thread: never waits for the collector)."""
        if not profile.samples:
            return
        request = to_otlp_request(profile, resource_attributes=self.resource_attributes)
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.state.drop("queue_full")
            self._queue.append(_Pending(request, len(profile.samples)))
            self.state.set_queued(len(self._queue))
            self._cond.notify_all()

    def backoff(self, streak: int) -> float:
        return min(self.first_retry_s * 2 ** min(max(streak - 1, 0), 30), self.max_backoff_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing and (not self._queue or self.state.streak):
                        # Stopping: what the failing collector did not take is given up, counted.
                        if self._queue:
                            self.state.drop("shutdown", len(self._queue))
                            self._queue.clear()
                            self.state.set_queued(0)
                        return
                    wait = self._retry_at - time.monotonic()
                    if self._queue and wait <= 0:
                        break
                    self._cond.wait(wait if self._queue else None)
                item = self._queue.popleft()
                self.state.set_queued(len(self._queue))
            self._send(item)

    def _send(self, item: _Pending) -> None:
        item.attempts += 1
        t0 = time.thread_time_ns()
        try:
            self.exporter.export(item.request)
        except Exception as exc:  # noqa: BLE001 - the sender thread must survive anything
            self.cpu_ns += time.thread_time_ns() - t0
            retryable = isinstance(exc, ProfileExportError) and exc.retryable
            self.state.failure(str(exc) if isinstance(exc, ProfileExportError) else repr(exc),
                               retryable=retryable)
            with self._cond:
                self._retry_at = time.monotonic() + self.backoff(self.state.streak)
                if not retryable:
                    self.state.drop("rejected")
                elif item.attempts >= self.max_attempts:
                    self.state.drop("retries_exhausted")
                elif len(self._queue) >= self.queue_size:
                    self.state.drop("queue_full")      # it is the oldest
                else:
                    self._queue.appendleft(item)       # first in line for the next attempt
                self.state.set_queued(len(self._queue))
            return
        self.cpu_ns += time.thread_time_ns() - t0
        self.state.success(item.samples)
        with self._cond:
            self._retry_at = 0.0

    def close(self, timeout_s: float = STOP_FLUSH_S) -> None:
        """Send what is queued (bounded; nothing more when the collector is failing), then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        self.exporter.close()


class ProfilingCollector:
    """prometheus_client collector: the continuous profiler's cost and counts, for /metrics."""

    def __init__(self, cp: ContinuousProfiler):
        self.cp = cp

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.cp.status()
        yield GaugeMetricFamily("ebpf_profiler_overhead_cpu_percent",
                                "CPU used by continuous profiling (BPF program, draining, symbolizing, "
                                "exporting) in percent of all CPUs, over the last export interval",
                                value=s["overhead_cpu_percent"])
        yield GaugeMetricFamily("ebpf_profiler_overhead_memory_bytes",
                                "Memory of continuous profiling: BPF maps and symbol caches",
                                value=s["overhead_memory_bytes"])
        yield CounterMetricFamily("ebpf_profiler_samples", "CPU samples taken by continuous profiling",
                                  value=s["samples"])
        yield CounterMetricFamily("ebpf_profiler_dropped_samples",
                                  "Samples dropped: max_samples distinct stacks reached in an interval",
                                  value=s["dropped"])
        yield CounterMetricFamily("ebpf_profiler_drains", "Profiles taken (one per export interval)",
                                  value=s["drains"])


def profiler_config(config, own_pids: Callable[[], Iterable[int]]):
    """(EbpfConfig, pids provider or None) for the `profiling` section."""
    pc = config.profiling
    ebpf = create_recommended_config(pc.environment)
    if pc.max_samples is not None:
        ebpf = ebpf.with_max_samples(pc.max_samples)
    targets = pc.targets
    if targets == "self":
        return ebpf.with_pids(*sorted(set(own_pids()))), own_pids
    if isinstance(targets, str) and targets.startswith("cgroup:"):
        return ebpf.with_cgroup(targets[len("cgroup:"):]), None
    return ebpf.with_pids(*targets), None


def start_continuous_profiling(config, own_pids: Callable[[], Iterable[int]]):
    """Start it; returns (ContinuousProfiler, [collectors for /metrics]); `cp.otlp_state` is the
    ExportState of the OTLP sink (or None) for the caller's ExportStateCollector. Raises ProfilerError /
    ConfigValidationError / OtlpSetupError: the caller logs them and proxies anyway."""
    pc = config.profiling
    ebpf, provider = profiler_config(config, own_pids)
    sinks: dict = {}
    collectors: list = []
    otlp_sink = None
    if pc.otlp:
        exporter = OtlpProfileExporter.from_env(config.otlp)
        attributes = dict(build_resource(config.otlp.resource).attributes)
        otlp_sink = sinks["otlp"] = OtlpProfileSink(exporter, attributes, pc.export_interval_s,
                                                    queue_size=pc.export_queue,
                                                    max_attempts=pc.export_attempts)
    if pc.pprof_dir is not None:
        sinks["pprof"] = PprofDirSink(pc.pprof_dir, pc.retention)
    cp = ContinuousProfiler(ebpf, interval_s=pc.export_interval_s, sinks=sinks, pids_provider=provider)
    try:
        cp.start()
    except BaseException:
        if otlp_sink is not None:
            otlp_sink.close(0)
        raise
    collectors.append(ProfilingCollector(cp))
    cp.otlp_state = otlp_sink.state if otlp_sink is not None else None
    return cp, collectors


def profiling_status(cp: ContinuousProfiler | None, config, error: str | None) -> dict:
    if cp is None:
        reason = error or "profiling.enabled is false in the config"
        return {"enabled": False, "reason": reason}
    status = cp.status()
    state = getattr(cp, "otlp_state", None)
    if state is not None:
        status["otlp"] = state.status()
    if config.profiling.pprof_dir is not None:
        status["pprof_dir"] = config.profiling.pprof_dir
    return status
