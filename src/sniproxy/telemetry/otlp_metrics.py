"""OTLP metrics from the running proxy: the numbers of /metrics, sent to an OpenTelemetry collector.

One exporter, in the supervisor: at each export it reads the same registry /metrics renders (the
workers' prometheus_client multiprocess files merged, plus the kernel and exporter collectors),
maps every family to an OpenTelemetry metric (OTel names, UCUM units, semantic-convention
attributes; route *names* from the config, never client-chosen SNI strings), and hands the batch
to the OpenTelemetry SDK's OTLP exporter (gRPC or HTTP/protobuf), so every OTEL_EXPORTER_OTLP_*
variable works as the SDK defines it (endpoint, headers, TLS, compression, timeout, temporality).

Never in the way of proxying: exporting runs in one thread of the supervisor (the workers never
see it), holds no queue (each export reads the current totals, so an outage loses nothing for
cumulative temporality, and deltas are taken against the last *successful* export), retries with
a doubling wait bounded at MAX_BACKOFF_S, logs one line per failure streak, and counts every
attempt in /metrics (sniproxy_otlp_exports_total) and /status ("otlp").

    exporter = OtlpMetricsExporter.from_config(config, registry_factory)
    exporter.start(); ...; exporter.stop()
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from sniproxy import __version__

from .otlp_common import (
    ExportState,
    OtlpSetupError,
    SdkLogCapture,
    SignalSettings,
    build_resource,
    env_value,
    resolve_signal,
    sdk_disabled,
)

log = logging.getLogger("sniproxy")

SCOPE_NAME = "sniproxy"
#: A final export at stop waits at most this long (the supervisor is shutting down).
STOP_EXPORT_TIMEOUT_S = 2.0

COUNTER, UPDOWN, GAUGE, HISTOGRAM = "counter", "updowncounter", "gauge", "histogram"

# Prometheus label -> OTel attribute, for labels every family means the same way.
_TCP = (("network.transport", "tcp"),)


@dataclass(frozen=True)
class MetricSpec:
    """How one Prometheus family becomes one OTel metric."""

    name: str
    unit: str
    kind: str                                          # COUNTER, UPDOWN, GAUGE or HISTOGRAM
    attributes: dict[str, str] = field(default_factory=dict)   # prom label -> OTel attribute
    constant: tuple[tuple[str, str], ...] = ()
    #: (prom label, OTel attribute, {prom value: OTel value}): a derived semantic attribute
    derived: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()
    #: a prom label whose value becomes `error.type` unless it is one of these "no error" values
    error_from: tuple[str, tuple[str, ...]] | None = None
    #: prom labels holding a "host:port" (`listener`, `backend`): they become the semantic
    #: attributes `server.address`, `server.port` and, for an IP address, `network.type`
    address_from: tuple[str, ...] = ()


#: The proxy's own families, named by hand. Everything else goes through generic_spec().
KNOWN: dict[str, MetricSpec] = {
    "sniproxy_connections": MetricSpec(
        "sniproxy.connections", "{connection}", COUNTER,
        {"route": "sniproxy.route", "outcome": "sniproxy.outcome"}, _TCP,
        error_from=("outcome", ("ok",)), address_from=("listener",)),
    "sniproxy_active_connections": MetricSpec(
        "sniproxy.connection.active", "{connection}", UPDOWN, {}, _TCP, address_from=("listener",)),
    "sniproxy_bytes": MetricSpec(
        "sniproxy.io", "By", COUNTER, {"direction": "sniproxy.direction"}, _TCP,
        # network.io.direction is seen from the client's side of the proxy
        derived=(("direction", "network.io.direction",
                  (("client_to_backend", "receive"), ("backend_to_client", "transmit"))),),
        address_from=("listener",)),
    "sniproxy_client_hello_failures": MetricSpec(
        "sniproxy.client_hello.failures", "{failure}", COUNTER, {"reason": "error.type"}, _TCP),
    "sniproxy_upstream_connect_seconds": MetricSpec(
        "sniproxy.upstream.connect.duration", "s", HISTOGRAM, {"upstream": "sniproxy.upstream"}, _TCP,
        address_from=("backend",)),
    "sniproxy_upstream_connect_failures": MetricSpec(
        "sniproxy.upstream.connect.failures", "{failure}", COUNTER,
        {"upstream": "sniproxy.upstream", "kind": "error.type"}, _TCP, address_from=("backend",)),
    "sniproxy_connection_limit_reached": MetricSpec(
        "sniproxy.connection.limit_reached", "{event}", COUNTER),
    "sniproxy_accept_errors": MetricSpec(
        "sniproxy.accept.errors", "{error}", COUNTER, {"errno": "error.type"}, _TCP),
    "sniproxy_dns_cache_lookups": MetricSpec(
        "sniproxy.dns.cache.lookups", "{lookup}", COUNTER,
        {"level": "sniproxy.dns.cache.level", "result": "sniproxy.dns.cache.result"}),
    "sniproxy_relay_connections": MetricSpec(
        "sniproxy.relay.connections", "{connection}", COUNTER, {"relay": "sniproxy.relay"}),
    "sniproxy_config_reloads": MetricSpec(
        "sniproxy.config.reloads", "{reload}", COUNTER, {"result": "sniproxy.result"}),
    "sniproxy_worker_restarts": MetricSpec("sniproxy.worker.restarts", "{restart}", COUNTER),
    "sniproxy_otlp_exports": MetricSpec(
        "sniproxy.otlp.exports", "{export}", COUNTER,
        {"signal": "sniproxy.otlp.signal", "result": "sniproxy.result"}),
    "sniproxy_otlp_queued": MetricSpec(
        "sniproxy.otlp.queued", "1", GAUGE, {"signal": "sniproxy.otlp.signal"}),
    "sniproxy_otlp_dropped": MetricSpec(
        "sniproxy.otlp.dropped", "{count}", COUNTER, {"signal": "sniproxy.otlp.signal", "reason": "error.type"}),
    "sniproxy_otlp_last_success_timestamp_seconds": MetricSpec(
        "sniproxy.otlp.last_success_time", "s", GAUGE, {"signal": "sniproxy.otlp.signal"}),
    "ebpf_active_connections": MetricSpec(
        "sniproxy.ebpf.connection.active", "{connection}", UPDOWN),
    "ebpf_map_utilization": MetricSpec("sniproxy.ebpf.map.utilization", "1", GAUGE,
                                       {"map": "sniproxy.ebpf.map"}),
    "ebpf_dns_cache_hit_rate": MetricSpec("sniproxy.ebpf.dns_cache.hit_rate", "1", GAUGE),
    "ebpf_dns_cache_level_hit_rate": MetricSpec("sniproxy.ebpf.dns_cache.level_hit_rate", "1", GAUGE,
                                                {"level": "sniproxy.dns.cache.level"}),
}

#: Labels with a semantic-convention meaning wherever they appear (generic families).
_GENERIC_LABELS = {"reason": "error.type", "direction": "sniproxy.direction"}
#: Unit suffixes of Prometheus names -> UCUM units (OTel puts the unit beside the name).
_UNIT_SUFFIXES = (("_seconds", "s"), ("_bytes", "By"), ("_percent", "%"), ("_ratio", "1"))
_KINDS = {"counter": COUNTER, "gauge": GAUGE, "histogram": HISTOGRAM}


def generic_spec(family_name: str, family_type: str) -> MetricSpec | None:
    """`<component>_<rest>[_<unit>]` -> `sniproxy.<component>.<rest>` with the unit moved out:
    ebpf_sockmap_redirected_bytes -> sniproxy.ebpf.sockmap_redirected (By). None: not mapped
    (summaries and info families, which the proxy does not have)."""
    kind = _KINDS.get(family_type)
    if kind is None:
        return None
    base, unit = family_name, "1" if kind == GAUGE else "{count}"
    for suffix, ucum in _UNIT_SUFFIXES:
        if base.endswith(suffix):
            base, unit = base[: -len(suffix)], ucum
            break
    if base.startswith("sniproxy_"):
        name = "sniproxy." + base[len("sniproxy_"):]
    else:
        name = "sniproxy." + base.replace("_", ".", 1)
    return MetricSpec(name, unit, kind)


def spec_for(family_name: str, family_type: str) -> MetricSpec | None:
    spec = KNOWN.get(family_name)
    if spec is not None:
        return spec
    return generic_spec(family_name, family_type)


#: The configured-backend placeholder of a dynamic route ("$sni:443"): the host is the client's
#: SNI, which never becomes an attribute.
_DYNAMIC_HOST = "$sni"


def address_attributes(value: str) -> dict[str, object]:
    """"host:port" (IPv6 in brackets) -> server.address, server.port, network.type.

    network.type only for an IP address (a host name may resolve to either family); no
    server.address for a dynamic backend ("$sni:443"): its host is client-chosen."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return {"server.address": value}
    out: dict[str, object] = {}
    try:
        out["server.port"] = int(port)
    except ValueError:
        return {"server.address": value}
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == _DYNAMIC_HOST:
        return out
    out["server.address"] = host
    try:
        out["network.type"] = f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        pass
    return out


def attributes_of(spec: MetricSpec, labels: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = dict(spec.constant)
    for label, value in labels.items():
        if label in ("le", "pid"):
            continue
        if label in spec.address_from:
            out.update(address_attributes(value))
            continue
        key = spec.attributes.get(label) or _GENERIC_LABELS.get(label) or f"sniproxy.{label}"
        out[key] = value
    for label, key, table in spec.derived:
        if label in labels:
            out[key] = dict(table).get(labels[label], labels[label])
    if spec.error_from is not None:
        label, fine = spec.error_from
        if labels.get(label) not in fine and label in labels:
            out["error.type"] = labels[label]
    return out


# -- families -> series --------------------------------------------------------------------
@dataclass
class Series:
    """One time series at one export: a number, or a histogram (bounds, cumulative counts)."""

    spec: MetricSpec
    attributes: dict[str, str]
    value: float = 0.0
    bounds: list[float] = field(default_factory=list)
    cumulative_counts: list[float] = field(default_factory=list)   # per bound, then +Inf
    sum: float = 0.0
    count: float = 0.0


def _key(attributes: dict[str, str]) -> tuple:
    return tuple(sorted(attributes.items()))


def series_of(families: Iterable) -> dict[tuple[str, tuple], Series]:
    """Every series of the Prometheus families, keyed by (OTel name, attributes)."""
    out: dict[tuple[str, tuple], Series] = {}
    for family in families:
        spec = spec_for(family.name, family.type)
        if spec is None:
            continue
        for sample in family.samples:
            name = sample.name
            if spec.kind == HISTOGRAM:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                attrs = attributes_of(spec, labels)
                s = out.setdefault((spec.name, _key(attrs)), Series(spec, attrs))
                if name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    if le != float("inf"):
                        s.bounds.append(le)
                    s.cumulative_counts.append(sample.value)
                elif name.endswith("_sum"):
                    s.sum = sample.value
                elif name.endswith("_count"):
                    s.count = sample.value
                continue
            if name.endswith("_created"):
                continue
            attrs = attributes_of(spec, dict(sample.labels))
            key = (spec.name, _key(attrs))
            if key in out:                  # two prom series map to one (a dropped pid label)
                out[key].value += sample.value
            else:
                out[key] = Series(spec, attrs, value=sample.value)
    return out


def _bucket_counts(cumulative: list[float]) -> list[int]:
    counts, previous = [], 0.0
    for c in cumulative:
        counts.append(int(round(c - previous)))
        previous = c
    return counts


# -- the exporter --------------------------------------------------------------------------
def temporality_table(preference: str) -> dict:
    """The SDK's per-instrument temporality for a preference (the same table the SDK builds from
    OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE); used for the config file's value."""
    from opentelemetry.sdk.metrics import (Counter, Histogram, ObservableCounter, ObservableGauge,
                                           ObservableUpDownCounter, UpDownCounter)
    from opentelemetry.sdk.metrics.export import AggregationTemporality as T

    cumulative = {k: T.CUMULATIVE for k in (Counter, UpDownCounter, Histogram, ObservableCounter,
                                            ObservableUpDownCounter, ObservableGauge)}
    if preference == "delta":
        return cumulative | {Counter: T.DELTA, Histogram: T.DELTA, ObservableCounter: T.DELTA}
    if preference == "lowmemory":
        return cumulative | {Counter: T.DELTA, Histogram: T.DELTA}
    return cumulative


def make_sdk_exporter(settings: SignalSettings, preferred_temporality: dict | None):
    """The OTel SDK's OTLP metric exporter for these settings (it reads every OTEL_* variable)."""
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter(endpoint=settings.config_endpoint, headers=settings.config_headers or None,
                              timeout=settings.timeout_s, preferred_temporality=preferred_temporality)


class OtlpMetricsExporter:
    """Periodic OTLP export of a prometheus_client registry, in one background thread."""

    def __init__(self, settings: SignalSettings, registry_factory: Callable[[], object], *,
                 interval_s: float, temporality: str, temporality_source: str, resource,
                 start_time_ns: int | None = None, upstream_addresses: dict | None = None):
        self.settings = settings
        self.registry_factory = registry_factory
        self.interval_s = interval_s
        self.resource = resource
        self.start_time_ns = start_time_ns or time.time_ns()
        self.state = ExportState("metrics", settings.endpoint, interval_s)
        self._capture = SdkLogCapture()
        preferred = None if temporality_source.startswith("OTEL_") else temporality_table(temporality)
        self._sdk = make_sdk_exporter(settings, preferred)
        self._temporality_by_kind = self._kind_temporality(self._sdk._preferred_temporality)
        self.temporality = temporality
        self.temporality_source = temporality_source
        # Delta bookkeeping: values at the last *successful* export (a failed export's
        # increments travel with the next one).
        self._last_values: dict[tuple, object] = {}
        self._last_time_ns = self.start_time_ns
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._export_lock = threading.Lock()

    # -- construction from the config ------------------------------------------------------
    @classmethod
    def from_config(cls, config, registry_factory: Callable[[], object], *,
                    environ=None, start_time_ns: int | None = None) -> "OtlpMetricsExporter | None":
        """None when disabled (config or OTEL_* says so); OtlpSetupError when misconfigured."""
        environ = os.environ if environ is None else environ
        enabled, _why = enabled_by(config.otlp, environ)
        if not enabled:
            return None
        cfg = config.otlp
        settings = resolve_signal("metrics", cfg, environ)
        interval_env, interval_name = env_value(environ, "OTEL_METRIC_EXPORT_INTERVAL")
        interval_s = cfg.interval_s
        if interval_env is not None:
            try:
                interval_s = float(interval_env) / 1000.0
            except ValueError:
                raise OtlpSetupError(f"{interval_name}={interval_env!r}: expected milliseconds, "
                                     "e.g. 60000") from None
            if interval_s <= 0:
                raise OtlpSetupError(f"{interval_name}={interval_env!r}: must be more than 0 ms")
            settings.sources["interval_s"] = interval_name
        else:
            settings.sources["interval_s"] = "config otlp.interval_s"
        settings = apply_export_timeout(settings, environ)
        pref_env, pref_name = env_value(environ, "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        temporality = (pref_env or cfg.temporality).lower()
        source = pref_name or "config otlp.temporality"
        settings.sources["temporality"] = source
        return cls(settings, registry_factory, interval_s=interval_s, temporality=temporality,
                   temporality_source=source, resource=build_resource(cfg.resource),
                   start_time_ns=start_time_ns)

    @staticmethod
    def _kind_temporality(table: dict) -> dict:
        from opentelemetry.sdk.metrics import Histogram, ObservableCounter, ObservableUpDownCounter
        from opentelemetry.sdk.metrics.export import AggregationTemporality as T
        return {COUNTER: table.get(ObservableCounter, T.CUMULATIVE),
                UPDOWN: table.get(ObservableUpDownCounter, T.CUMULATIVE),
                HISTOGRAM: table.get(Histogram, T.CUMULATIVE)}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._capture.install()
        self._thread = threading.Thread(target=self._run, name="sni-proxy-otlp-metrics", daemon=True)
        self._thread.start()
        log.info("OTLP metrics: exporting every %gs over %s to %s (temporality %s)",
                 self.interval_s, self.settings.protocol, self.settings.endpoint, self.temporality)

    def stop(self, final_export: bool = True) -> None:
        """Stop the thread; one last export (bounded) so short runs are not lost."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(STOP_EXPORT_TIMEOUT_S)
            if thread.is_alive():      # stuck in an export: cut the SDK's retries short
                self._sdk.shutdown(timeout_millis=1000)
                thread.join(STOP_EXPORT_TIMEOUT_S)
        # One last export so a short run is not lost; not when the collector is known to be down.
        # Bounded: a collector that vanished must not hold the shutdown for a whole timeout
        # (shutting the SDK exporter down cuts its retries short).
        last = None
        if final_export and thread is not None and not thread.is_alive() and self.state.streak == 0:
            last = threading.Thread(target=self._final_export, name="sni-proxy-otlp-final", daemon=True)
            last.start()
            last.join(STOP_EXPORT_TIMEOUT_S)
        try:
            self._sdk.shutdown(timeout_millis=1000)
        except Exception as exc:  # noqa: BLE001 - already shut down, or a channel error
            log.debug("OTLP metrics exporter shutdown: %s", exc)
        if last is not None:
            last.join(1.0)
        self._capture.remove()

    def _final_export(self) -> None:
        try:
            self.export_once()
        except Exception as exc:  # noqa: BLE001 - at shutdown: note it, never raise
            log.debug("final OTLP metrics export: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.state.next_wait()):
            try:
                self.export_once()
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                self.state.failure(f"internal error: {exc!r}")
                log.debug("OTLP metrics export crashed", exc_info=True)

    # -- one export ------------------------------------------------------------------------
    def collect(self, now_ns: int | None = None):
        """(MetricsData for now, the values to remember if it is exported)."""
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram,
                                                      HistogramDataPoint, Metric, MetricsData,
                                                      NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum)
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        now = now_ns or time.time_ns()
        registry = self.registry_factory()
        series = series_of(registry.collect())
        remember: dict[tuple, object] = {}
        by_metric: dict[str, tuple] = {}
        for key, s in series.items():
            spec = s.spec
            temporality = self._temporality_by_kind.get(spec.kind)
            delta = temporality == AggregationTemporality.DELTA
            start = self._last_time_ns if delta else self.start_time_ns
            if spec.kind == HISTOGRAM:
                counts = _bucket_counts(s.cumulative_counts)
                total, count = s.sum, s.count
                remember[key] = (counts, total, count)
                if delta:
                    prev = self._last_values.get(key)
                    if prev is not None and prev[2] <= count and len(prev[0]) == len(counts):
                        counts = [c - p for c, p in zip(counts, prev[0])]
                        total, count = total - prev[1], count - prev[2]
                point = HistogramDataPoint(attributes=s.attributes, start_time_unix_nano=start,
                                           time_unix_nano=now, count=int(count), sum=total,
                                           bucket_counts=counts, explicit_bounds=s.bounds,
                                           min=None, max=None)
            else:
                value = s.value
                remember[key] = value
                if delta and spec.kind == COUNTER:
                    prev = self._last_values.get(key)
                    if prev is not None and prev <= value:   # else: a reset, the value is the delta
                        value -= prev
                if spec.kind == GAUGE:
                    start = 0
                point = NumberDataPoint(attributes=s.attributes, start_time_unix_nano=start,
                                        time_unix_nano=now, value=_number(value))
            by_metric.setdefault(spec.name, (spec, temporality, []))[2].append(point)
        metrics = []
        for name, (spec, temporality, points) in sorted(by_metric.items()):
            if spec.kind == HISTOGRAM:
                data = Histogram(data_points=points, aggregation_temporality=temporality)
            elif spec.kind == GAUGE:
                data = Gauge(data_points=points)
            else:
                data = Sum(data_points=points, aggregation_temporality=temporality,
                           is_monotonic=spec.kind == COUNTER)
            metrics.append(Metric(name=name, description=None, unit=spec.unit, data=data))
        scope = InstrumentationScope(SCOPE_NAME, __version__)
        data = MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(scope, metrics, "")], "")])
        return data, remember, now, sum(len(by_metric[m][2]) for m in by_metric)

    def export_once(self) -> bool:
        """Collect and export now (the thread's job; callable from tests). True on success."""
        from opentelemetry.sdk.metrics.export import MetricExportResult

        with self._export_lock:
            data, remember, now, points = self.collect()
            self._capture.take()
            try:
                result = self._sdk.export(data, timeout_millis=self.settings.effective_timeout_s * 1000)
            except Exception as exc:  # noqa: BLE001 - an SDK bug must not kill the thread
                result, error = MetricExportResult.FAILURE, repr(exc)
            else:
                error = self._capture.take() or "the exporter reported a failure"
            if result == MetricExportResult.SUCCESS:
                self._last_values, self._last_time_ns = remember, now
                self.state.success(points)
                return True
            self.state.failure(error)
            return False

    # -- views -----------------------------------------------------------------------------
    def status(self) -> dict:
        s = self.settings
        return {"enabled": True, "protocol": s.protocol, "interval_s": self.interval_s,
                "timeout_s": s.effective_timeout_s,
                "temporality": self.temporality, "headers": list(s.header_names),
                "sources": dict(s.sources), **self.state.status()}



def apply_export_timeout(settings: SignalSettings, environ) -> SignalSettings:
    """OTEL_METRIC_EXPORT_TIMEOUT (milliseconds, the SDK's "maximum allowed time to export
    data", read by its PeriodicExportingMetricReader): the export gives up after the shorter of
    it and the exporter's own timeout (OTEL_EXPORTER_OTLP_[METRICS_]TIMEOUT / otlp.timeout_s).

    The SDK's OTLP exporters ignore the `timeout_millis` given to export() (their deadline is
    the constructor's `timeout`, retries included), so the shorter bound is what we hand the
    constructor: a stalled collector then costs at most that much per attempt."""
    value, name = env_value(environ, "OTEL_METRIC_EXPORT_TIMEOUT")
    if value is None:
        return settings
    try:
        export_timeout_s = float(value) / 1000.0
    except ValueError:
        raise OtlpSetupError(f"{name}={value!r}: expected milliseconds, e.g. 30000") from None
    if export_timeout_s <= 0:
        raise OtlpSetupError(f"{name}={value!r}: must be more than 0 ms")
    sources = dict(settings.sources)
    if export_timeout_s < settings.effective_timeout_s:
        sources["timeout_s"] = name
        return replace(settings, timeout_s=export_timeout_s, effective_timeout_s=export_timeout_s,
                       sources=sources)
    return settings


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def enabled_by(cfg, environ) -> tuple[bool, str]:
    """Whether OTLP metrics run, and why not: config otlp.enabled, overridden by the env."""
    if sdk_disabled(environ):
        return False, "OTEL_SDK_DISABLED=true in the environment"
    choice = environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if choice == "none":
        return False, "OTEL_METRICS_EXPORTER=none in the environment"
    if choice and "otlp" in [c.strip() for c in choice.split(",")]:
        return True, "OTEL_METRICS_EXPORTER=otlp"
    if not cfg.enabled:
        return False, "otlp.enabled is false in the config (or set OTEL_METRICS_EXPORTER=otlp)"
    return True, "otlp.enabled"


def off_status(config, environ=None, error: str | None = None) -> dict:
    """The /status `otlp` object when no metrics exporter runs."""
    environ = os.environ if environ is None else environ
    if error is not None:
        return {"enabled": False, "reason": error}
    return {"enabled": False, "reason": enabled_by(config.otlp, environ)[1]}
