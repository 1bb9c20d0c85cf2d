"""Where the proxy's continuous profiles go (OTLP, pprof files) and what /metrics shows of them.

The supervisor calls start_continuous_profiling(); sniproxy.observe.continuous does the sampling
and draining and knows nothing of these sinks.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable

from sniproxy.observe.config import create_recommended_config
from sniproxy.observe.continuous import ContinuousProfiler

from .otlp_common import ExportState, build_resource
from .otlp_profiles import OtlpProfileExporter
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


class OtlpProfileSink:
    """Exports each profile over OTLP; results counted in an ExportState (signal "profiles")."""

    def __init__(self, exporter: OtlpProfileExporter, resource_attributes: dict, interval_s: float):
        self.exporter = exporter
        self.resource_attributes = resource_attributes
        self.state = ExportState("profiles", exporter.endpoint, interval_s, log_failures=False)

    def __call__(self, profile) -> None:
        if not profile.samples:
            return
        try:
            self.exporter.export(profile, resource_attributes=self.resource_attributes)
        except Exception as exc:
            self.state.failure(str(exc))
            raise
        self.state.success(len(profile.samples))


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
        otlp_sink = sinks["otlp"] = OtlpProfileSink(exporter, attributes, pc.export_interval_s)
    if pc.pprof_dir is not None:
        sinks["pprof"] = PprofDirSink(pc.pprof_dir, pc.retention)
    cp = ContinuousProfiler(ebpf, interval_s=pc.export_interval_s, sinks=sinks, pids_provider=provider)
    cp.start()
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
