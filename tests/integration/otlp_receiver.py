"""OTLP receivers for tests, built on the official generated stubs (opentelemetry-proto).

No OpenTelemetry Collector can be installed here; these receivers accept exactly what a collector
accepts on the wire: a `grpc.server` with MetricsServiceServicer / ProfilesServiceServicer
subclasses, and an `http.server` that parses Export*ServiceRequest bodies at the OTLP/HTTP paths.
Every request is kept with its headers (gRPC metadata) for the tests to inspect.
"""
from __future__ import annotations

import gzip
import http.server
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)


@dataclass
class Received:
    kind: str                 # "metrics" or "profiles"
    request: object           # ExportMetricsServiceRequest / ExportProfilesServiceRequest
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class _Store:
    def __init__(self) -> None:
        self.items: list[Received] = []
        self.cond = threading.Condition()
        self.delay_s = 0.0            # a slow (or, with a long delay, stalled) collector
        self._closing = threading.Event()     # cuts every delay short when the receiver stops
        self.fail_with: grpc.StatusCode | int | None = None
        self.refused: list[Received] = []     # requests answered with fail_with

    def add(self, item: Received) -> None:
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def refuse(self, item: Received) -> None:
        with self.cond:
            self.refused.append(item)
            self.cond.notify_all()

    def stall(self) -> None:
        """Hold a request for delay_s (or until the receiver stops)."""
        if self.delay_s:
            self._closing.wait(self.delay_s)

    def of(self, kind: str) -> list[Received]:
        with self.cond:
            return [i for i in self.items if i.kind == kind]

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "an export"):
        """Wait until predicate(list of received) is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = predicate(list(self.items))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; "
                                       f"received {len(self.items)} requests")
                self.cond.wait(min(left, 0.2))


class _MetricsServicer(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: _Store):
        self.store = store

    def Export(self, request, context):  # noqa: N802 - the generated name
        self.store.stall()
        if isinstance(self.store.fail_with, grpc.StatusCode):
            self.store.refuse(Received("metrics", request, dict(context.invocation_metadata())))
            context.abort(self.store.fail_with, "test receiver refuses")
        self.store.add(Received("metrics", request, dict(context.invocation_metadata())))
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _ProfilesServicer(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self, store: _Store):
        self.store = store

    def Export(self, request, context):  # noqa: N802
        self.store.stall()
        if isinstance(self.store.fail_with, grpc.StatusCode):
            self.store.refuse(Received("profiles", request, dict(context.invocation_metadata())))
            context.abort(self.store.fail_with, "test receiver refuses")
        self.store.add(Received("profiles", request, dict(context.invocation_metadata())))
        return profiles_service_pb2.ExportProfilesServiceResponse()


class GrpcReceiver(_Store):
    """OTLP/gRPC on 127.0.0.1; TLS when given (cert, key) PEM files."""

    def __init__(self, port: int = 0, tls: tuple[str, str] | None = None, host: str = "127.0.0.1"):
        super().__init__()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsServicer(self), self.server)
        profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(_ProfilesServicer(self), self.server)
        if tls is None:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        else:
            with open(tls[0], "rb") as c, open(tls[1], "rb") as k:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.server.add_secure_port(f"{host}:{port}", creds)
        if not self.port:
            raise OSError(f"cannot bind the gRPC receiver to {host}:{port}")

    def __enter__(self) -> "GrpcReceiver":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.server.stop(grace=None)


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    PATHS = {"/v1/metrics": ("metrics", metrics_service_pb2.ExportMetricsServiceRequest,
                             metrics_service_pb2.ExportMetricsServiceResponse),
             "/v1development/profiles": ("profiles", profiles_service_pb2.ExportProfilesServiceRequest,
                                         profiles_service_pb2.ExportProfilesServiceResponse)}

    def do_POST(self):  # noqa: N802
        store: _Store = self.server.store
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        route = self.PATHS.get(self.path)
        if route is None or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(404 if route is None else 415)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        kind, request_type, response_type = route
        request = request_type()
        request.ParseFromString(body)
        store.stall()
        if isinstance(store.fail_with, int):
            store.refuse(Received(kind, request, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(store.fail_with)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        store.add(Received(kind, request, {k.lower(): v for k, v in self.headers.items()}))
        payload = response_type().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class HttpReceiver(_Store):
    """OTLP/HTTP (protobuf) on 127.0.0.1."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        super().__init__()
        self.httpd = http.server.ThreadingHTTPServer((host, port), _HttpHandler)
        self.httpd.daemon_threads = True
        self.httpd.store = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "HttpReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# -- reading what arrived ------------------------------------------------------------------
def attrs(key_values) -> dict:
    """KeyValue list -> {key: python value}."""
    out = {}
    for kv in key_values:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def metrics_of(request) -> dict[str, object]:
    """{metric name: Metric} of an ExportMetricsServiceRequest (one resource, one scope)."""
    out = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = m
    return out


def points_of(metric) -> list:
    kind = metric.WhichOneof("data") if metric is not None else None
    return list(getattr(metric, kind).data_points) if kind else []


def value_of(point) -> float:
    which = point.WhichOneof("value")
    return float(getattr(point, which)) if which else 0.0
