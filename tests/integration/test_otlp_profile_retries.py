"""Failed OTLP profile exports are retried (issue 13): a bounded queue, exponential backoff, bounded
attempts, one log line per failure streak, counted in /metrics and /status. The sink runs here
against receivers on the official stubs (real sockets); the proxy-level tests run a real proxy
whose continuous profiler exports to a collector that is down at start, or that refuses."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import grpc
import pytest

from sniproxy.telemetry.continuous_profiling import OtlpProfileSink
from sniproxy.telemetry.otlp_profiles import OtlpProfileExporter
from tests.integration.harness import ProxyProcess, base_config, free_port, free_ports, make_pki, tls_backend, wait_until
from tests.integration.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.integration.test_otlp_metrics import otlp_env, request
from tests.integration.test_profiler import burn_bin, burns, ebpf  # noqa: F401 - fixtures
from tests.unit.test_profile_outputs import make_profile

NAME = "a.test"


def profile_at(n: int):
    """A hand-built profile told apart from the others by its start time."""
    p = make_profile()
    return dataclasses.replace(p, start_time_ns=p.start_time_ns + n * 10**9)


def start_of(received) -> int:
    return received.request.resource_profiles[0].scope_profiles[0].profiles[0].time_unix_nano


def profile_id(received) -> bytes:
    return received.request.resource_profiles[0].scope_profiles[0].profiles[0].profile_id


def sink_for(endpoint: str, protocol: str = "grpc", **kw) -> OtlpProfileSink:
    exporter = OtlpProfileExporter.from_env(endpoint=endpoint, protocol=protocol, environ={})
    return OtlpProfileSink(exporter, {"service.name": "test"}, 1.0, first_retry_s=0.05, **kw)


def test_collector_down_then_up_the_queue_is_sent_in_order(caplog):
    port = free_port()
    sink = sink_for(f"http://127.0.0.1:{port}", queue_size=4, max_attempts=100)
    try:
        with caplog.at_level(logging.INFO, logger="sniproxy"):
            sink(profile_at(1))
            wait_until(lambda: sink.state.failures >= 3, 10, "three failed attempts")
            sink(profile_at(2))
            assert sink.state.status()["queued"] >= 1
            with GrpcReceiver(port=port) as receiver:
                got = receiver.wait_for(lambda items: items if len(items) >= 2 else None, 15, "both profiles")
                # Both exports answered, not only received: the receiver seeing profile 2
                # does not mean its export call returned (closing the receiver first would
                # fail that call, re-queue the profile and drop it at shutdown).
                wait_until(lambda: sink.state.streak == 0
                           and sink.state.status()["exports_ok"] == 2, 5,
                           "both exports acknowledged")
    finally:
        sink.close(2)
    assert [start_of(r) for r in got] == [profile_at(1).start_time_ns, profile_at(2).start_time_ns]
    status = sink.state.status()
    assert status["queued"] == 0 and status["dropped"] == {} and status["exports_ok"] == 2
    warnings = [r for r in caplog.records if "OTLP profiles export to" in r.getMessage()
                and "failed:" in r.getMessage()]
    assert len(warnings) == 1 and "profiling.otlp" in warnings[0].getMessage()    # once per streak
    assert sum("works again (after" in r.getMessage() for r in caplog.records) == 1


def test_bounded_queue_drops_the_oldest_and_attempts_are_bounded():
    port = free_port()
    sink = sink_for(f"http://127.0.0.1:{port}", queue_size=2, max_attempts=1000)
    try:
        for n in range(5):
            sink(profile_at(n))
        wait_until(lambda: sink.state.status()["dropped"].get("queue_full") == 3
                   and sink.state.status()["queued"] == 2, 10, "the three oldest dropped")
        with GrpcReceiver(port=port) as receiver:
            got = receiver.wait_for(lambda items: items if len(items) >= 2 else None, 15, "the two newest")
            wait_until(lambda: sink.state.status()["queued"] == 0, 5, "an empty queue")
    finally:
        sink.close(2)
    assert [start_of(r) for r in got] == [profile_at(3).start_time_ns, profile_at(4).start_time_ns]

    few = sink_for(f"http://127.0.0.1:{free_port()}", max_attempts=3)
    try:
        few(profile_at(0))
        wait_until(lambda: few.state.status()["dropped"].get("retries_exhausted") == 1, 10, "given up")
        assert few.state.failures == 3 and few.state.status()["queued"] == 0
    finally:
        few.close(1)


@pytest.mark.parametrize("protocol, refusal, retried", [
    ("grpc", grpc.StatusCode.UNAVAILABLE, True),
    ("http/protobuf", 503, True),
    ("http/protobuf", 400, False),          # a bad request is not sent again: dropped, counted
])
def test_refusals_are_retried_only_when_retryable(protocol, refusal, retried):
    receiver_type = GrpcReceiver if protocol == "grpc" else HttpReceiver
    with receiver_type() as receiver:
        receiver.fail_with = refusal
        sink = sink_for(f"http://127.0.0.1:{receiver.port}", protocol, max_attempts=100)
        try:
            sink(profile_at(1))
            if retried:
                receiver.wait_for(lambda _: len(receiver.refused) >= 3, 10, "three refused attempts")
                receiver.fail_with = None
                got = receiver.wait_for(lambda items: items, 10, "the profile, resent")
                assert profile_id(got[0]) == profile_id(receiver.refused[0])     # the same profile
                assert len({profile_id(r) for r in receiver.refused}) == 1
            else:
                wait_until(lambda: sink.state.status()["dropped"].get("rejected") == 1, 10, "dropped")
                assert len(receiver.refused) == 1 and not receiver.of("profiles")
        finally:
            sink.close(1)


# -- a real proxy --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME])


def start_proxy(tmp_path, backend: int, target: int | None, endpoint: str, protocol: str = "grpc") -> ProxyProcess:
    """A proxy profiling `target` (a burner: every interval has samples), or itself, to `endpoint`."""
    cfg = base_config(*free_ports(2), workers=2,
                      profiling={"enabled": True, "environment": "production", "export_interval_s": 1,
                                 "targets": [target] if target else "self",
                                                 "export_queue": 8, "export_attempts": 50},
                      otlp={"endpoint": endpoint, "protocol": protocol, "timeout_s": 2},
                      routes=[{"match": NAME, "backend": f"127.0.0.1:{backend}"}])
    return ProxyProcess(cfg, tmp_path, env=otlp_env()).start()


def test_proxy_profiles_queued_while_the_collector_is_down_arrive_once_it_is_up(ebpf, pki, tmp_path):
    """The proxy profiles itself (targets "self", the default) under a steady load of requests."""
    port = free_port()
    stop = threading.Event()
    with tls_backend(pki, [NAME], "A") as backend:
        p = start_proxy(tmp_path, backend, None, f"http://127.0.0.1:{port}")
        latencies: list[float] = []

        def load():      # keeps the workers on a CPU so every interval has samples (bounded)
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                latencies.append(request(p, pki))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            wait_until(lambda: p.status()["profiling"]["otlp"]["exports_failed"] >= 2, 20, "two failures")
            status = p.status()["profiling"]["otlp"]
            assert status["queued"] >= 1 and status["last_success"] is None, status
            assert p.metric("sniproxy_otlp_exports_total", signal="profiles", result="failure") >= 2
            assert p.metric("sniproxy_otlp_queued", signal="profiles") >= 1
            up_at_ns = time.time_ns()
            with GrpcReceiver(port=port) as receiver:
                got = receiver.wait_for(lambda items: items if len(items) >= 2 else None, 20, "queued profiles")
                wait_until(lambda: p.status()["profiling"]["otlp"]["failure_streak"] == 0, 10, "recovery")
                # Read now: once the receiver is gone the next export starts a new streak.
                log = p.log().splitlines()
            first = got[0].request.resource_profiles[0].scope_profiles[0].profiles[0]
            # The oldest profile comes first, and it was taken while the collector was down.
            assert first.time_unix_nano == min(start_of(r) for r in got)
            assert first.time_unix_nano + first.duration_nano < up_at_ns
            assert p.metric("sniproxy_otlp_dropped_total", signal="profiles") == 0
            own = {p.status()["pid"]} | {w["pid"] for w in p.status()["workers"]}
            for r in got:
                for rp in r.request.resource_profiles:
                    res = {kv.key: kv.value for kv in rp.resource.attributes}
                    assert res["process.pid"].int_value in own
                    assert res["service.name"].string_value == "sni-proxy"
            stop.set()
            loader.join(30)
            assert latencies and max(latencies) < 1.0, latencies      # proxying is not held up
            assert sum("OTLP profiles export to" in line and "failed:" in line for line in log) == 1
            assert sum("OTLP profiles export to" in line and "works again (after" in line for line in log) == 1
        finally:
            stop.set()
            loader.join(30)
            p.stop()


@pytest.mark.parametrize("protocol, refusal", [("grpc", grpc.StatusCode.UNAVAILABLE), ("http/protobuf", 503)])
def test_proxy_retries_a_profile_the_collector_refused(ebpf, burns, pki, tmp_path, protocol, refusal):
    receiver_type = GrpcReceiver if protocol == "grpc" else HttpReceiver
    burner = burns("ratio", 60)
    with tls_backend(pki, [NAME], "A") as backend, receiver_type() as receiver:
        receiver.fail_with = refusal
        p = start_proxy(tmp_path, backend, burner.pid, f"http://127.0.0.1:{receiver.port}", protocol)
        try:
            receiver.wait_for(lambda _: len(receiver.refused) >= 2, 20, "two refused attempts")
            refused_first = profile_id(receiver.refused[0])
            receiver.fail_with = None
            receiver.wait_for(lambda items: any(profile_id(i) == refused_first for i in items), 20,
                              "the refused profile, resent")
            assert p.status()["profiling"]["otlp"]["exports_failed"] >= 2
            assert p.metric("sniproxy_otlp_exports_total", signal="profiles", result="success") >= 1
        finally:
            p.stop()
