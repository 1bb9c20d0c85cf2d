"""What the OTLP metrics and profiles exporters share: settings, resource, export bookkeeping.

Precedence, for every setting: the standard `OTEL_*` variable (signal-specific first, then the
generic one) when it is set and not empty, else the config file's `otlp` section, else the
OpenTelemetry SDK's default. The SDK exporters read the variables themselves, so where a variable
is set we pass nothing and let the SDK apply it exactly as it documents.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from sniproxy import __version__

log = logging.getLogger("sniproxy")

PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_SERVICE_NAME = "sni-proxy"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
#: URL path of each signal on an OTLP/HTTP receiver (appended to a base endpoint).
HTTP_PATHS = {"metrics": "/v1/metrics", "profiles": "/v1development/profiles"}
#: Longest wait between two attempts while the collector keeps failing.
MAX_BACKOFF_S = 300.0
#: Why a queued item was given up (label values of sniproxy_otlp_dropped_total).
DROP_REASONS = ("queue_full", "retries_exhausted", "rejected", "shutdown")
#: One id per proxy run, shared by both signals so a backend can join them.
INSTANCE_ID = str(uuid.uuid4())


class OtlpSetupError(Exception):
    """The OTLP settings cannot be used; the message says which variable or key, and the fix."""


def env_value(environ: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
    """The first of `names` set to a non-empty value: (value, name), else (None, None)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value, name
    return None, None


def signal_vars(signal: str, what: str) -> tuple[str, str]:
    """(signal-specific, generic) variable names, e.g. OTEL_EXPORTER_OTLP_METRICS_ENDPOINT."""
    return f"OTEL_EXPORTER_OTLP_{signal.upper()}_{what}", f"OTEL_EXPORTER_OTLP_{what}"


@dataclass(frozen=True)
class SignalSettings:
    """Effective connection settings of one signal, and where each came from."""

    signal: str
    protocol: str
    endpoint: str                 # what the exporter connects to (full URL for HTTP)
    config_endpoint: str | None   # to pass to the SDK (None: an OTEL_* variable decides)
    config_headers: dict | None   # likewise
    header_names: tuple[str, ...]
    timeout_s: float | None       # None: an OTEL_* variable decides
    effective_timeout_s: float
    sources: dict[str, str] = field(default_factory=dict)


def resolve_signal(signal: str, cfg, environ: Mapping[str, str] | None = None,
                   protocol: str | None = None, endpoint: str | None = None) -> SignalSettings:
    """Settings of `signal` ("metrics" or "profiles") from the otlp config section and the env.

    `protocol` / `endpoint` given here (a command-line flag) win over everything.
    """
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    env_proto, env_proto_name = env_value(environ, *signal_vars(signal, "PROTOCOL"))
    if protocol is not None:
        sources["protocol"] = "command line"
    elif env_proto is not None:
        protocol, sources["protocol"] = env_proto, env_proto_name
    else:
        protocol = cfg.protocol if cfg is not None else "grpc"
        sources["protocol"] = "config otlp.protocol" if cfg is not None else "default"
    if protocol not in PROTOCOLS:
        raise OtlpSetupError(
            f"{sources['protocol']}={protocol!r}: this exporter speaks {' or '.join(PROTOCOLS)} "
            "(the Python SDK has no http/json); set it to one of these")

    specific, generic = signal_vars(signal, "ENDPOINT")
    env_specific = env_value(environ, specific)[0]
    env_generic = env_value(environ, generic)[0]
    path = HTTP_PATHS[signal] if protocol == "http/protobuf" else ""
    config_endpoint = None
    if endpoint is not None:
        effective = endpoint.rstrip("/") + path if path and not _has_path(endpoint) else endpoint
        config_endpoint, sources["endpoint"] = effective, "command line"
    elif env_specific is not None:
        effective, sources["endpoint"] = env_specific, specific     # used as is, as the SDK does
    elif env_generic is not None:
        effective, sources["endpoint"] = env_generic.rstrip("/") + path, generic
    else:
        base = (cfg.endpoint if cfg is not None else None) or (
            DEFAULT_HTTP_ENDPOINT if protocol == "http/protobuf" else DEFAULT_GRPC_ENDPOINT)
        effective = base.rstrip("/") + path
        config_endpoint = effective
        sources["endpoint"] = "config otlp.endpoint" if cfg is not None and cfg.endpoint else "default"

    env_headers, env_headers_name = env_value(environ, *signal_vars(signal, "HEADERS"))
    if env_headers is not None:
        config_headers = None
        header_names = tuple(sorted(parse_headers(env_headers)))
        sources["headers"] = env_headers_name
    else:
        config_headers = dict(cfg.headers) if cfg is not None else {}
        header_names = tuple(sorted(config_headers))
        sources["headers"] = "config otlp.headers" if config_headers else "default"

    env_timeout, env_timeout_name = env_value(environ, *signal_vars(signal, "TIMEOUT"))
    if env_timeout is not None:
        try:
            effective_timeout = float(env_timeout)
        except ValueError:
            raise OtlpSetupError(f"{env_timeout_name}={env_timeout!r}: expected seconds, e.g. 10") from None
        timeout_s, sources["timeout_s"] = None, env_timeout_name
    else:
        timeout_s = effective_timeout = cfg.timeout_s if cfg is not None else 10.0
        sources["timeout_s"] = "config otlp.timeout_s" if cfg is not None else "default"
    return SignalSettings(signal, protocol, effective, config_endpoint, config_headers, header_names,
                          timeout_s, effective_timeout, sources)


def _has_path(url: str) -> bool:
    rest = url.split("://", 1)[-1]
    return "/" in rest.rstrip("/")


def parse_headers(text: str) -> dict[str, str]:
    """`k1=v1,k2=v2` (values URL-encoded), the OTEL_EXPORTER_OTLP_HEADERS format."""
    from opentelemetry.util.re import parse_env_headers
    return parse_env_headers(text, liberal=True)


def sdk_disabled(environ: Mapping[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def build_resource(config_attributes: Mapping[str, str] | None = None, pid: int | None = None,
                   extra: Mapping[str, object] | None = None):
    """The OTel Resource: our defaults < `extra` < config `otlp.resource` < OTEL_RESOURCE_ATTRIBUTES
    < OTEL_SERVICE_NAME (the environment wins, as everywhere here; the SDK's detector parses it)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    base = {
        "service.name": DEFAULT_SERVICE_NAME,
        "service.version": __version__,
        "service.instance.id": INSTANCE_ID,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid() if pid is None else pid,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
    }
    try:
        from opentelemetry.sdk.version import __version__ as sdk_version
        base["telemetry.sdk.version"] = sdk_version
    except ImportError:   # pragma: no cover
        pass
    base.update(extra or {})
    base.update(config_attributes or {})
    return Resource(base).merge(OTELResourceDetector().detect())


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class ExportState:
    """Success/failure bookkeeping of one signal: counts, backoff, one log line per failure streak.

    Thread-safe: the exporter thread writes, /status and /metrics read.
    """

    def __init__(self, signal: str, endpoint: str, interval_s: float, log_failures: bool = True, *,
                 status_path: str = '"otlp"', max_backoff_s: float | None = None):
        self.signal = signal
        self.log_failures = log_failures
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.status_path = status_path            # where /status shows this state (for the log line)
        self.max_backoff_s = max(interval_s, MAX_BACKOFF_S) if max_backoff_s is None else max_backoff_s
        #: items waiting to be sent (a signal with a queue: profiles), None for one without
        self.queued: int | None = None
        #: items given up, by reason (queue_full, retries_exhausted, rejected, shutdown)
        self.dropped: dict[str, int] = {}
        self.successes = 0
        self.failures = 0
        self.streak = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.items_exported = 0
        self._lock = threading.Lock()

    def success(self, items: int = 0) -> None:
        with self._lock:
            recovered, streak = self.streak > 0, self.streak
            self.successes += 1
            self.items_exported += items
            self.streak = 0
            self.last_success = time.time()
        if recovered and self.log_failures:
            log.info("OTLP %s export to %s works again (after %d failed attempts)",
                     self.signal, self.endpoint, streak)

    def failure(self, error: str, *, retryable: bool = True) -> None:
        with self._lock:
            first = self.streak == 0
            self.failures += 1
            self.streak += 1
            self.last_error = error
            self.last_error_at = time.time()
        if first and self.log_failures:   # one line per streak; /status and /metrics count the rest
            then = (f"retrying with backoff (up to {self.max_backoff_s:.0f} s)" if retryable else
                    "the collector rejected it: not sent again (fix the request or the collector)")
            log.warning("OTLP %s export to %s failed: %s; %s, proxying is not affected; logged "
                        "once until it works again, see /status %s and "
                        "sniproxy_otlp_exports_total", self.signal, self.endpoint, error, then,
                        self.status_path)

    def next_wait(self) -> float:
        """Seconds until the next attempt: the interval, doubled per failure in a row, bounded."""
        with self._lock:
            streak = self.streak
        if streak == 0:
            return self.interval_s
        return min(self.interval_s * 2 ** min(streak - 1, 16), self.max_backoff_s)

    def drop(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def set_queued(self, n: int) -> None:
        with self._lock:
            self.queued = n

    def status(self) -> dict:
        with self._lock:
            extra = {} if self.queued is None else {"queued": self.queued, "dropped": dict(self.dropped)}
            return {**extra,
                "endpoint": self.endpoint,
                "exports_ok": self.successes,
                "exports_failed": self.failures,
                "failure_streak": self.streak,
                "last_success": _iso(self.last_success),
                "last_error": self.last_error,
                "last_error_at": _iso(self.last_error_at),
            }


class ExportStateCollector:
    """prometheus_client collector: export results of every signal, for /metrics."""

    def __init__(self, states: list[ExportState]):
        self.states = states

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        exports = CounterMetricFamily("sniproxy_otlp_exports", "OTLP export attempts by signal and result",
                                      labels=["signal", "result"])
        last = GaugeMetricFamily("sniproxy_otlp_last_success_timestamp_seconds",
                                 "Unix time of the last successful OTLP export, by signal",
                                 labels=["signal"])
        queued = GaugeMetricFamily("sniproxy_otlp_queued", "Items waiting to be exported (profiles), "
                                   "by signal", labels=["signal"])
        dropped = CounterMetricFamily("sniproxy_otlp_dropped", "Items given up by the OTLP exporter, by "
                                      "signal and reason (queue_full, retries_exhausted, rejected, "
                                      "shutdown)", labels=["signal", "reason"])
        for state in self.states:
            s = state.status()
            exports.add_metric([state.signal, "success"], s["exports_ok"])
            exports.add_metric([state.signal, "failure"], s["exports_failed"])
            last.add_metric([state.signal], state.last_success or 0.0)
            if "queued" in s:
                queued.add_metric([state.signal], s["queued"])
                for reason in DROP_REASONS:
                    dropped.add_metric([state.signal, reason], s["dropped"].get(reason, 0))
        yield exports
        yield last
        if queued.samples:
            yield queued
            yield dropped


class SdkLogCapture(logging.Handler):
    """Takes the OTel exporters' own log records (one per retry and per failure) off the log and
    keeps the last one as the error text: our ExportState logs once per failure streak instead."""

    LOGGER = "opentelemetry.exporter.otlp"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None
        self._logger = logging.getLogger(self.LOGGER)
        self._saved_propagate = self._logger.propagate

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.last = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break exporting
            self.last = str(record.msg)

    def take(self) -> str | None:
        last, self.last = self.last, None
        return last

    def install(self) -> "SdkLogCapture":
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def remove(self) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._saved_propagate
