"""Prometheus families -> OTel metrics, and where each OTLP setting comes from (no network)."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sniproxy.config import parse_config
from sniproxy.telemetry.otlp_common import ExportState, OtlpSetupError, resolve_signal
from sniproxy.telemetry.otlp_metrics import (COUNTER, GAUGE, HISTOGRAM, UPDOWN, generic_spec, series_of,
                                             spec_for)

BASE = {"routes": [{"match": "a.example.com", "backend": "10.0.0.1:443"}]}


def otlp_cfg(**otlp):
    return parse_config({**BASE, "otlp": otlp}).otlp


def test_generic_names_move_the_unit_out_of_the_name():
    assert generic_spec("ebpf_sockmap_redirected_bytes", "counter").name == "sniproxy.ebpf.sockmap_redirected"
    assert generic_spec("ebpf_sockmap_redirected_bytes", "counter").unit == "By"
    spec = generic_spec("ebpf_profiler_overhead_cpu_percent", "gauge")
    assert (spec.name, spec.unit, spec.kind) == ("sniproxy.ebpf.profiler_overhead_cpu", "%", GAUGE)
    assert generic_spec("sniproxy_new_thing_seconds", "histogram").unit == "s"
    assert generic_spec("x_info", "info") is None
    assert spec_for("sniproxy_active_connections", "gauge").kind == UPDOWN


class _Kernel:
    def collect(self):
        c = CounterMetricFamily("ebpf_sockmap_fallbacks", "f", labels=["reason"])
        c.add_metric(["map_full"], 3)
        yield c
        yield GaugeMetricFamily("ebpf_dns_cache_hit_rate", "h", value=0.5)


def test_series_of_a_registry_with_every_kind():
    r = CollectorRegistry()
    conns = Counter("sniproxy_connections", "c", ["route", "outcome"], registry=r)
    conns.labels("web", "ok").inc(5)
    conns.labels("web", "connect_failed").inc(2)
    Gauge("sniproxy_active_connections", "a", registry=r).set(4)
    h = Histogram("sniproxy_upstream_connect_seconds", "h", ["upstream"], buckets=(0.1, 1), registry=r)
    for v in (0.05, 0.5, 5):
        h.labels("direct").observe(v)
    byts = Counter("sniproxy_bytes", "b", ["direction"], registry=r)
    byts.labels("client_to_backend").inc(700)
    r.register(_Kernel())
    s = series_of(r.collect())
    ok = s[("sniproxy.connections", (("network.transport", "tcp"), ("sniproxy.outcome", "ok"),
                                      ("sniproxy.route", "web")))]
    assert ok.value == 5 and ok.spec.kind == COUNTER
    failed = [x for (name, _), x in s.items() if name == "sniproxy.connections" and x.value == 2][0]
    assert failed.attributes["error.type"] == "connect_failed"      # semconv: only on errors
    hist = [x for (name, _), x in s.items() if name == "sniproxy.upstream.connect.duration"][0]
    assert hist.spec.kind == HISTOGRAM and hist.bounds == [0.1, 1.0]
    assert hist.cumulative_counts == [1, 2, 3] and hist.count == 3 and hist.sum == pytest.approx(5.55)
    io = [x for (name, _), x in s.items() if name == "sniproxy.io"][0]
    assert io.attributes["network.io.direction"] == "receive" and io.spec.unit == "By"
    fb = [x for (name, _), x in s.items() if name == "sniproxy.ebpf.sockmap_fallbacks"][0]
    assert fb.attributes == {"error.type": "map_full"} and fb.value == 3
    assert [x for (name, _), x in s.items() if name == "sniproxy.ebpf.dns_cache.hit_rate"][0].spec.unit == "1"
    assert not any(name.endswith("_created") for name, _ in s)


def test_settings_precedence_env_over_config_over_default():
    cfg = otlp_cfg(endpoint="http://collector:4317", protocol="grpc", headers={"a": "1"}, timeout_s=3)
    s = resolve_signal("metrics", cfg, {})
    assert (s.protocol, s.endpoint, s.config_headers, s.timeout_s) == ("grpc", "http://collector:4317",
                                                                       {"a": "1"}, 3)
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c2:4318/",
           "OTEL_EXPORTER_OTLP_HEADERS": "b=2", "OTEL_EXPORTER_OTLP_TIMEOUT": "7"}
    s = resolve_signal("metrics", cfg, env)
    assert s.protocol == "http/protobuf" and s.endpoint == "http://c2:4318/v1/metrics"
    assert s.config_endpoint is None and s.config_headers is None and s.header_names == ("b",)
    assert s.timeout_s is None and s.effective_timeout_s == 7
    env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"] = "http://c3:9999/custom"
    assert resolve_signal("metrics", cfg, env).endpoint == "http://c3:9999/custom"   # as is
    assert resolve_signal("profiles", cfg, env).endpoint == "http://c2:4318/v1development/profiles"
    assert resolve_signal("metrics", otlp_cfg(protocol="http/protobuf"), {}).endpoint == \
        "http://localhost:4318/v1/metrics"
    assert resolve_signal("metrics", None, {}).endpoint == "http://localhost:4317"
    with pytest.raises(OtlpSetupError, match="http/json"):
        resolve_signal("metrics", cfg, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_backoff_doubles_and_is_bounded():
    state = ExportState("metrics", "http://x", 2.0)
    assert state.next_wait() == 2.0
    waits = []
    for _ in range(12):
        state.failure("down")
        waits.append(state.next_wait())
    assert waits[:4] == [2, 4, 8, 16] and max(waits) == 300
    state.success()
    assert state.next_wait() == 2.0 and state.status()["failure_streak"] == 0


def test_listener_and_backend_labels_become_semconv_server_attributes():
    from sniproxy.telemetry.otlp_metrics import address_attributes
    assert address_attributes("127.0.0.1:8443") == {"server.address": "127.0.0.1", "server.port": 8443,
                                                    "network.type": "ipv4"}
    assert address_attributes("[::1]:443") == {"server.address": "::1", "server.port": 443,
                                               "network.type": "ipv6"}
    # A host name may resolve to either family: no network.type rather than a guess.
    assert address_attributes("backend.internal:443") == {"server.address": "backend.internal",
                                                          "server.port": 443}
    # A dynamic route's host is the client's SNI: never an attribute (cardinality).
    assert address_attributes("$sni:443") == {"server.port": 443}

    r = CollectorRegistry()
    conns = Counter("sniproxy_connections", "c", ["route", "outcome", "listener"], registry=r)
    conns.labels("web", "ok", "[::1]:8443").inc(3)
    fails = Counter("sniproxy_upstream_connect_failures", "f", ["upstream", "backend", "kind"], registry=r)
    fails.labels("direct", "10.0.0.5:443", "refused").inc()
    s = series_of(r.collect())
    (conn,) = [x for (name, _), x in s.items() if name == "sniproxy.connections"]
    assert conn.attributes == {"sniproxy.route": "web", "sniproxy.outcome": "ok", "network.transport": "tcp",
                               "server.address": "::1", "server.port": 8443, "network.type": "ipv6"}
    (fail,) = [x for (name, _), x in s.items() if name == "sniproxy.upstream.connect.failures"]
    assert fail.attributes == {"sniproxy.upstream": "direct", "error.type": "refused",
                               "network.transport": "tcp", "server.address": "10.0.0.5",
                               "server.port": 443, "network.type": "ipv4"}


def test_metric_export_timeout_bounds_the_exporter_timeout():
    from sniproxy.telemetry.otlp_metrics import apply_export_timeout
    cfg = otlp_cfg(timeout_s=3)
    base = resolve_signal("metrics", cfg, {})
    shorter = apply_export_timeout(base, {"OTEL_METRIC_EXPORT_TIMEOUT": "250"})        # milliseconds
    assert shorter.timeout_s == shorter.effective_timeout_s == 0.25
    assert shorter.sources["timeout_s"] == "OTEL_METRIC_EXPORT_TIMEOUT"
    assert apply_export_timeout(base, {"OTEL_METRIC_EXPORT_TIMEOUT": "30000"}) is base   # the SDK default
    env = {"OTEL_EXPORTER_OTLP_METRICS_TIMEOUT": "2", "OTEL_METRIC_EXPORT_TIMEOUT": "1000"}
    both = apply_export_timeout(resolve_signal("metrics", cfg, env), env)
    assert both.effective_timeout_s == 1 and both.timeout_s == 1     # passed to the SDK: the shorter
    for bad in ("soon", "0"):
        with pytest.raises(OtlpSetupError, match="OTEL_METRIC_EXPORT_TIMEOUT"):
            apply_export_timeout(base, {"OTEL_METRIC_EXPORT_TIMEOUT": bad})
