"""OTLP metrics from the running proxy (issue 13), received by receivers built on the official
stubs: names, units, attributes, resource, temporality, headers, TLS, equality with /metrics,
and a collector that is down, slow or refusing while the proxy keeps serving."""
from __future__ import annotations

import socket
import ssl
import time

import pytest
from opentelemetry.proto.metrics.v1 import metrics_pb2
from prometheus_client.parser import text_string_to_metric_families

from sniproxy.telemetry.otlp_metrics import HISTOGRAM, series_of
from tests.integration.harness import ProxyProcess, base_config, free_port, free_ports, make_pki, tls_backend, wait_until
from tests.integration.otlp_receiver import GrpcReceiver, HttpReceiver, attrs, metrics_of, points_of, value_of

CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
NAME = "a.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME, "localhost"])


@pytest.fixture(scope="module")
def backend(pki):
    with tls_backend(pki, [NAME], "A") as port:
        yield port


@pytest.fixture
def proxies(tmp_path):
    started: list[ProxyProcess] = []

    def start(otlp: dict, env: dict | None = None, workers: int = 1, backend_port: int = 0,
              wait: bool = True, listen: list[str] | None = None, routes: list[dict] = ()) -> ProxyProcess:
        cfg = base_config(*free_ports(2), workers=workers, otlp=otlp,
                          routes=[{"match": NAME, "backend": f"127.0.0.1:{backend_port}", "name": "web"},
                                  *routes])
        if listen:
            cfg["listen_addr"] = listen
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        p = ProxyProcess(cfg, workdir, env=env)
        started.append(p)
        return p.start(wait=wait)

    yield start
    for p in started:
        p.stop()


def request(p: ProxyProcess, pki, listen: str | None = None) -> float:
    """One HTTPS request through the proxy (its first listener, or `listen`); returns its latency
    in seconds."""
    listen = listen or (p.config["listen_addr"] if isinstance(p.config["listen_addr"], str)
                        else p.config["listen_addr"][0])
    host, port = listen.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    t0 = time.monotonic()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET /whoami HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:100]
    return time.monotonic() - t0


def otlp_env(**extra) -> dict:
    """A clean OTEL_* environment (the developer's own variables must not leak in)."""
    import os
    env = {k: "" for k in os.environ if k.startswith("OTEL_")}
    env.update(extra)
    return env


def metrics_series(p: ProxyProcess) -> dict:
    return series_of(text_string_to_metric_families(p.metrics()))


def otlp_points(request_) -> dict:
    """{(name, sorted attributes): point} of one export."""
    out = {}
    for name, metric in metrics_of(request_).items():
        for point in points_of(metric):
            out[(name, tuple(sorted((k, str(v)) for k, v in attrs(point.attributes).items())))] = point
    return out


def connections_in(received) -> float:
    m = metrics_of(received.request).get("sniproxy.connections")
    return sum(value_of(pt) for pt in points_of(m)) if m else -1


VOLATILE = ("sniproxy.otlp.",)     # change with every export by design


def assert_export_equals_metrics(export, series) -> int:
    points = otlp_points(export.request)
    compared = 0
    for (name, key), s in series.items():
        if name.startswith(VOLATILE):
            continue
        point = points.get((name, tuple((k, str(v)) for k, v in key)))
        assert point is not None, f"{name} {dict(key)} is on /metrics but not in the OTLP export"
        if s.spec.kind == HISTOGRAM:
            assert point.count == s.count and point.sum == pytest.approx(s.sum), name
            assert list(point.explicit_bounds) == s.bounds, name
            assert sum(point.bucket_counts) == point.count, name
        else:
            assert value_of(point) == s.value, (name, dict(key))          # exactly
        compared += 1
    return compared


# -----------------------------------------------------------------------------------------
def refused_hello(listen: str, name: str) -> None:
    """A TLS client whose route's backend refuses: the proxy closes the connection."""
    host, port = listen.rsplit(":", 1)
    ctx = ssl.create_default_context()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname=name)


def test_grpc_export_equals_metrics_with_two_workers(proxies, pki, backend):
    n, n6, refused = 20, 6, 3
    env = otlp_env(OTEL_SERVICE_NAME="edge-proxy",
                   OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test,team=net%20ops",
                   OTEL_EXPORTER_OTLP_HEADERS="x-api-key=s3cret,x-tenant=blue")
    port4, port6, closed = free_ports(3)
    listen4, listen6 = f"127.0.0.1:{port4}", f"[::1]:{port6}"
    with GrpcReceiver() as receiver:
        p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{receiver.port}",
                     "interval_s": 0.3, "resource": {"team": "config-loses", "region": "eu"}},
                    env=env, workers=2, backend_port=backend, listen=[listen4, listen6],
                    routes=[{"match": "down.test", "backend": f"127.0.0.1:{closed}", "name": "down"}])
        for _ in range(n):
            request(p, pki, listen4)
        for _ in range(n6):
            request(p, pki, listen6)
        for _ in range(refused):
            refused_hello(listen6, "down.test")
        total = n + n6 + refused
        wait_until(lambda: p.metric("sniproxy_connections_total") == total, 10, "/metrics to count them")
        mark = time.monotonic()
        export = receiver.wait_for(
            lambda items: next((i for i in reversed(items) if i.at > mark + 0.05
                                and connections_in(i) == total), None), 15,
            f"an export with {total} connections")
        series = metrics_series(p)
        compared = assert_export_equals_metrics(export, series)
        assert compared >= 8
    # Prometheus labels (listener, backend) and their OTel attributes, per listener and backend.
    assert p.metric("sniproxy_connections_total", listener=listen4, outcome="ok") == n
    assert p.metric("sniproxy_connections_total", listener=listen6, outcome="ok") == n6
    assert p.metric("sniproxy_upstream_connect_failures_total", backend=f"127.0.0.1:{closed}",
                    kind="refused") == refused
    assert p.metric("sniproxy_upstream_connect_seconds_count", backend=f"127.0.0.1:{backend}") == n + n6
    server4 = {"server.address": "127.0.0.1", "server.port": port4, "network.type": "ipv4"}
    server6 = {"server.address": "::1", "server.port": port6, "network.type": "ipv6"}
    to_backend = {"server.address": "127.0.0.1", "server.port": backend, "network.type": "ipv4"}
    m = metrics_of(export.request)

    def points_where(metric: str, **match) -> list:
        return [pt for pt in points_of(m[metric]) if match.items() <= attrs(pt.attributes).items()]

    assert sum(value_of(pt) for pt in points_where("sniproxy.connections", **server4)) == n
    assert sum(value_of(pt) for pt in points_where("sniproxy.connections", **server6,
                                                   **{"sniproxy.outcome": "ok"})) == n6
    assert sum(value_of(pt) for pt in points_where("sniproxy.connections", **server6,
                                                   **{"error.type": "connect_failed"})) == refused
    for server in (server4, server6):
        assert points_where("sniproxy.io", **server, **{"network.io.direction": "transmit"})
        assert value_of(points_where("sniproxy.connection.active", **server)[0]) == 0
    (hist,) = points_of(m["sniproxy.upstream.connect.duration"])
    assert attrs(hist.attributes) == {"sniproxy.upstream": "direct", "network.transport": "tcp", **to_backend}
    assert hist.count == n + n6
    (fail,) = points_of(m["sniproxy.upstream.connect.failures"])
    assert attrs(fail.attributes) == {"sniproxy.upstream": "direct", "network.transport": "tcp",
                                      "error.type": "refused", "server.address": "127.0.0.1",
                                      "server.port": closed, "network.type": "ipv4"}
    assert value_of(fail) == refused

    req = export.request
    assert len(req.resource_metrics) == 1
    resource = attrs(req.resource_metrics[0].resource.attributes)
    assert resource["service.name"] == "edge-proxy"                 # OTEL_SERVICE_NAME wins
    assert resource["deployment.environment.name"] == "test"
    assert resource["team"] == "net ops"                            # env over config, URL-decoded
    assert resource["region"] == "eu"                               # config otlp.resource
    assert resource["process.pid"] == p.status()["pid"]             # one exporter: the supervisor
    for key in ("service.version", "service.instance.id", "host.name"):
        assert resource[key]
    assert req.resource_metrics[0].scope_metrics[0].scope.name == "sniproxy"
    assert export.headers["x-api-key"] == "s3cret" and export.headers["x-tenant"] == "blue"

    conns = m["sniproxy.connections"]
    assert conns.unit == "{connection}" and conns.sum.is_monotonic
    assert conns.sum.aggregation_temporality == CUMULATIVE
    point = points_where("sniproxy.connections", **server4)[0]
    a = attrs(point.attributes)
    assert a == {"sniproxy.route": "web", "sniproxy.outcome": "ok", "network.transport": "tcp", **server4}
    assert point.start_time_unix_nano < point.time_unix_nano
    io = {}
    for pt in points_of(m["sniproxy.io"]):
        direction = attrs(pt.attributes)["network.io.direction"]
        io[direction] = io.get(direction, 0) + value_of(pt)
    assert m["sniproxy.io"].unit == "By" and io["receive"] > 0 and io["transmit"] > 0
    hist = m["sniproxy.upstream.connect.duration"]
    assert hist.unit == "s" and hist.histogram.aggregation_temporality == CUMULATIVE
    active = m["sniproxy.connection.active"]
    assert not active.sum.is_monotonic
    assert m["sniproxy.relay.connections"].unit == "{connection}"
    # No SNI anywhere: route names only.
    for metric in m.values():
        for pt in points_of(metric):
            assert NAME not in attrs(pt.attributes).values()

    status = p.status()["otlp"]
    assert status["enabled"] and status["protocol"] == "grpc"
    assert status["endpoint"] == f"http://127.0.0.1:{receiver.port}"
    assert status["last_success"] and status["exports_ok"] >= 1 and status["failure_streak"] == 0
    assert status["headers"] == ["x-api-key", "x-tenant"] and "s3cret" not in str(p.status())
    assert p.metric("sniproxy_otlp_exports_total", signal="metrics", result="success") >= 1


def test_worker_restart_with_the_grpc_exporter_running(proxies, pki, backend):
    """Workers are forked by a supervisor that runs gRPC threads: a restarted worker must serve."""
    import os
    import signal
    with GrpcReceiver() as receiver:
        p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{receiver.port}", "interval_s": 0.1},
                    env=otlp_env(), workers=2, backend_port=backend)
        receiver.wait_for(lambda items: items, 10, "a first export")
        victim = p.status()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: all(w["alive"] and w["pid"] != victim for w in p.status()["workers"]
                               if w["index"] == 0), 15, "the worker to be restarted")
        for _ in range(10):        # both workers (SO_REUSEPORT spreads the connections)
            request(p, pki)
        wait_until(lambda: p.metric("sniproxy_connections_total") == 10, 10, "/metrics to count them")
        receiver.wait_for(lambda items: connections_in(items[-1]) == 10, 10, "an export with them")
        assert p.metric("sniproxy_worker_restarts_total") == 1


def test_http_delta_temporality_from_env(proxies, pki, backend):
    env = otlp_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                   OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta")
    with HttpReceiver() as receiver:
        # The config says grpc to a dead port: the environment must win on both.
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}"
        p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{free_port()}", "interval_s": 0.3},
                    env=env, backend_port=backend)
        for _ in range(5):
            request(p, pki)
        wait_until(lambda: p.metric("sniproxy_connections_total") == 5, 10, "/metrics to count them")
        receiver.wait_for(lambda items: sum(connections_in(i) for i in items if connections_in(i) > 0) >= 5,
                          15, "deltas adding up to 5 connections")
        for _ in range(3):
            request(p, pki)
        receiver.wait_for(lambda items: sum(connections_in(i) for i in items if connections_in(i) > 0) >= 8,
                          15, "deltas adding up to 8 connections")
        time.sleep(0.7)   # two more intervals: exports with nothing new must add nothing
        items = receiver.of("metrics")
    total = sum(connections_in(i) for i in items if connections_in(i) > 0)
    assert total == 8 == p.metric("sniproxy_connections_total")
    m = metrics_of(items[-1].request)
    assert m["sniproxy.connections"].sum.aggregation_temporality == DELTA
    assert m["sniproxy.upstream.connect.duration"].histogram.aggregation_temporality == DELTA
    # An up-down counter stays cumulative under the delta preference (the SDK's table).
    assert m["sniproxy.connection.active"].sum.aggregation_temporality == CUMULATIVE
    hist_total = sum(pt.count for i in items
                     for pt in points_of(metrics_of(i.request).get("sniproxy.upstream.connect.duration")))
    assert hist_total == 8
    assert p.status()["otlp"]["protocol"] == "http/protobuf"
    assert p.status()["otlp"]["sources"]["temporality"] == "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"


def test_tls_to_the_collector_with_a_test_ca(proxies, pki, backend):
    crt, key = pki.cert_for("localhost")
    with GrpcReceiver(tls=(str(crt), str(key))) as receiver:
        env = otlp_env(OTEL_EXPORTER_OTLP_CERTIFICATE=str(pki.ca_path))
        p = proxies({"enabled": True, "endpoint": f"https://localhost:{receiver.port}", "interval_s": 0.3},
                    env=env, backend_port=backend)
        receiver.wait_for(lambda items: items, 15, "an export over TLS")
        assert p.status()["otlp"]["failure_streak"] == 0
    # Without the CA the same collector is refused: TLS really is verified.
    with GrpcReceiver(tls=(str(crt), str(key))) as receiver:
        p2 = proxies({"enabled": True, "endpoint": f"https://localhost:{receiver.port}", "interval_s": 0.3,
                      "timeout_s": 1}, env=otlp_env(), backend_port=backend)
        wait_until(lambda: p2.status()["otlp"]["exports_failed"] >= 1, 15, "a failed TLS export")
        assert not receiver.of("metrics")


def test_collector_down_at_start_then_up(proxies, pki, backend):
    port = free_port()
    p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{port}", "interval_s": 0.2,
                 "timeout_s": 1}, env=otlp_env(), backend_port=backend)
    wait_until(lambda: p.status()["otlp"]["exports_failed"] >= 3, 20, "three failed exports")
    # The proxy serves meanwhile (its workers never wait for the exporter).
    latencies = [request(p, pki) for _ in range(10)]
    assert max(latencies) < 1.0, latencies            # an export attempt alone takes up to 1 s
    status = p.status()["otlp"]
    assert status["last_success"] is None and status["last_error"]
    assert p.metric("sniproxy_otlp_exports_total", signal="metrics", result="failure") >= 3
    assert p.log().count("OTLP metrics export to") == 1        # one line per failure streak
    with GrpcReceiver(port=port) as receiver:
        export = receiver.wait_for(lambda items: next((i for i in items if connections_in(i) == 10), None),
                                   30, "the first export once the collector is up")
        assert export is not None
        wait_until(lambda: p.status()["otlp"]["last_success"], 10, "last_success in /status")
    assert "works again" in p.log()
    assert p.status()["otlp"]["failure_streak"] == 0


def test_slow_collector_does_not_slow_proxying(proxies, pki, backend):
    with HttpReceiver() as receiver:
        receiver.delay_s = 3.0
        p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{receiver.port}",
                     "protocol": "http/protobuf", "interval_s": 0.2, "timeout_s": 10},
                    env=otlp_env(), workers=2, backend_port=backend)
        time.sleep(0.5)     # an export is now stuck in the receiver for 3 s (not synchronisation)
        latencies = [request(p, pki) for _ in range(10)]
        assert max(latencies) < 1.0, latencies
        assert p.get("/metrics")[0] == 200 and p.status()["otlp"]["enabled"]
        receiver.delay_s = 0
        receiver.wait_for(lambda items: items, 15, "the slow export to land")


@pytest.mark.parametrize("protocol, variable, value", [
    ("grpc", "OTEL_METRIC_EXPORT_TIMEOUT", "500"),                   # milliseconds (the SDK's reader)
    ("http/protobuf", "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "0.5"),  # seconds (the Python exporters)
])
def test_stalled_collector_export_gives_up_at_the_env_timeout(proxies, pki, backend, protocol, variable, value):
    receiver_type = GrpcReceiver if protocol == "grpc" else HttpReceiver
    with receiver_type() as receiver:
        receiver.delay_s = 120.0          # takes the request, never answers (until the test ends)
        # otlp.timeout_s says 30 s: only the variable can make three attempts fit in 10 s
        # (interval 0.2 s, doubled after each failure: about 0.7 + 1.1 + 1.5 s with a 0.5 s timeout).
        p = proxies({"enabled": True, "endpoint": f"http://127.0.0.1:{receiver.port}", "protocol": protocol,
                     "interval_s": 0.2, "timeout_s": 30}, env=otlp_env(**{variable: value}),
                    workers=2, backend_port=backend)
        wait_until(lambda: p.status()["otlp"]["exports_failed"] >= 3, 10,
                   f"three exports given up after {variable}={value}")
        latencies = [request(p, pki) for _ in range(10)]     # proxying is not held up meanwhile
        status = p.status()["otlp"]
        assert status["timeout_s"] == 0.5 and status["sources"]["timeout_s"] == variable, status
        assert status["last_success"] is None and status["failure_streak"] >= 3 and status["last_error"]
        assert p.metric("sniproxy_otlp_exports_total", signal="metrics", result="failure") >= 3
        assert p.log().count("OTLP metrics export to") == 1, p.log()   # one line per failure streak
        assert max(latencies) < 1.0, latencies
        assert not receiver.of("metrics")


def test_bad_environment_disables_otlp_but_not_the_proxy(proxies, pki, backend):
    p = proxies({"enabled": True}, env=otlp_env(OTEL_EXPORTER_OTLP_PROTOCOL="http/json"), backend_port=backend)
    request(p, pki)
    status = p.status()["otlp"]
    assert status["enabled"] is False and "http/json" in status["reason"]
    assert "OTLP metrics disabled" in p.log()
    p2 = proxies({"enabled": True}, env=otlp_env(OTEL_SDK_DISABLED="true"), backend_port=backend)
    assert "OTEL_SDK_DISABLED" in p2.status()["otlp"]["reason"]
