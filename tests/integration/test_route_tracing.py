"""ebpf.tracing.network in the proxy: kernel-measured TCP figures per route on /metrics.

A real proxy (subprocess, two workers) routes ClientHellos to a plain TCP backend and to a
closed port; the kernel's per-route counters must match what the clients did: one connect
latency sample per relayed connection, one `refused` per connection to the closed port, one
RTT-at-close sample per socket on each side. Without CAP_BPF the proxy runs on and /status
says why the figures are missing.
"""
from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import (ProxyProcess, RawBackend, base_config, client_hello_bytes,
                                       free_port, free_ports, wait_until)
from tests.integration.netns import Topology, nsexec, run_in

pytestmark = pytest.mark.ebpf

N_OK, N_REFUSED = 20, 5


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


def _proxy(tmp_path, backend_port: int, closed_port: int, argv_prefix=None,
           **extra) -> ProxyProcess:
    cfg = base_config(*free_ports(2), workers=2, routes=[
        {"match": "good.example", "backend": f"127.0.0.1:{backend_port}", "name": "good"},
        {"match": "refused.example", "backend": f"127.0.0.1:{closed_port}", "name": "refused"},
    ], ebpf={"tracing": {"network": True}}, **extra)
    return ProxyProcess(cfg, tmp_path, argv_prefix=argv_prefix).start()


def _through(p: ProxyProcess, name: str) -> bytes:
    port = int(p.config["listen_addr"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(client_hello_bytes(name))
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_route_metrics_count_the_proxys_own_connections(tmp_path):
    backend = RawBackend(reply_bytes=1000)
    # continuous profiling on as well: the overhead report must show both parts
    p = _proxy(tmp_path, backend.port, free_port(),
               profiling={"enabled": True, "otlp": False, "pprof_dir": str(tmp_path / "pprof")})
    try:
        status = p.status()["tracing"]["network"]
        assert status["state"] == "active", status
        for _ in range(N_OK):
            assert len(_through(p, "good.example")) == 1000
        for _ in range(N_REFUSED):
            _through(p, "refused.example")
        backend.wait_sessions(N_OK)

        def settled() -> bool:    # both sides of every connection closed in the kernel
            return (p.metric("sniproxy_route_tcp_srtt_at_close_seconds_count", route="good",
                             side="client") == N_OK and
                    p.metric("sniproxy_route_tcp_srtt_at_close_seconds_count", route="good",
                             side="backend") == N_OK)
        wait_until(settled, 20, "per-route close counts")
        assert p.metric("sniproxy_route_backend_connect_seconds_count", route="good") == N_OK
        assert p.metric("sniproxy_route_backend_connect_seconds_bucket", route="good",
                        le="+Inf") == N_OK
        assert 0 < p.metric("sniproxy_route_backend_connect_seconds_sum", route="good") < 1
        assert p.metric("sniproxy_route_backend_connect_failures_total", route="refused",
                        reason="refused") == N_REFUSED
        assert p.metric("sniproxy_route_backend_connect_failures_total", route="good") == 0
        assert p.metric("sniproxy_route_backend_connect_seconds_count", route="refused") == 0
        assert p.metric("sniproxy_route_tcp_retransmits_total", route="good") == 0
        assert p.metric("sniproxy_route_tcp_srtt_at_close_seconds_sum", route="good",
                        side="backend") > 0
        status = p.status()
        assert status["tracing"]["network"]["bpf_run_count"] > 0
        # one overhead report with every running part: the CPU profiler and the tracer
        report = status["ebpf_overhead"]
        parts = {part["name"]: part for part in report["parts"]}
        assert set(parts) == {"cpu profiler", "route network tracer"}, report
        assert parts["route network tracer"]["bpf_run_time_ns"] > 0
        assert report["cpu_percent"] == pytest.approx(sum(x["cpu_percent"]
                                                          for x in parts.values()))
        assert report["memory_bytes"] == sum(x["memory_bytes"] for x in parts.values()) > 0
    finally:
        p.stop()
        backend.close()


def test_without_cap_bpf_the_proxy_runs_and_says_why(tmp_path):
    backend = RawBackend(reply_bytes=10)
    drop = "-bpf,-perfmon,-sys_admin"
    p = _proxy(tmp_path, backend.port, free_port(),
               argv_prefix=["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"])
    try:
        status = p.status()["tracing"]["network"]
        assert status["state"] == "degraded"
        assert "CAP_BPF" in status["reason"] and "setcap" in status["reason"]
        assert len(_through(p, "good.example")) == 10       # the proxy itself works
        assert "sniproxy_route_backend_connect_seconds" not in p.metrics()
    finally:
        p.stop()
        backend.close()


def test_strict_fallback_refuses_to_start_without_the_tracer(tmp_path):
    drop = "-bpf,-perfmon,-sys_admin"
    cfg = base_config(*free_ports(2), fallback_mode="strict",
                      routes=[{"match": "a.example", "backend": f"127.0.0.1:{free_port()}"}],
                      ebpf={"tracing": {"network": True}})
    p = ProxyProcess(cfg, tmp_path, argv_prefix=["setpriv", f"--inh-caps={drop}",
                                                 f"--bounding-set={drop}"]).start(wait=False)
    try:
        assert p.proc.wait(timeout=30) == 3
        assert "ebpf.tracing.network cannot run" in p.log() and "CAP_BPF" in p.log()
    finally:
        p.stop()


def _drop_data_object(tmp_path) -> str:
    from pathlib import Path
    out = tmp_path / "drop_data.bpf.o"
    here = Path(__file__).resolve().parent
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf",
                    f"-I{here.parents[1] / 'src/sniproxy/ebpf/bpf'}", "-c",
                    str(here / "drop_data.bpf.c"), "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return str(out)


def _retrans_segs(ns: str) -> int:
    lines = [ln.split() for ln in nsexec(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("RetransSegs")])


def test_route_retransmits_under_loss_equal_the_proxys_retranssegs(tmp_path):
    """Client -- proxy -- backend in namespaces of our own; ~10 % of the data packets the
    proxy sends are lost on both of its links (a tc program: no sch_netem here). The
    per-route retransmits of both sides are non-zero and add up exactly to the proxy
    namespace's RetransSegs delta: every retransmit of the proxy's sockets, none missed."""
    from tests.integration.test_tcp_splice import (HELLO, MiB, EchoBackend, stream_sha,
                                                   upload_download)

    obj = _drop_data_object(tmp_path)
    tag = f"{os.getpid() % 10000}rt"
    with Topology.three(tag) as t:
        # On the far ends' ingress: a drop at the proxy's own egress would be reported back
        # to its TCP (NET_XMIT_DROP), which sends the segment again as new data, not as a
        # retransmission; a drop on the wire's far side is a real loss.
        for link in ("c", "b"):
            ns, dev = t.links[link]
            nsexec(ns, "tc", "qdisc", "add", "dev", dev, "clsact")
            nsexec(ns, "tc", "filter", "add", "dev", dev, "ingress", "bpf", "da", "obj", obj,
                   "sec", "tc")
        be = t.run(t.backend, EchoBackend, t.backend_ip)
        cfg = base_config(8443, 9100, routes=[
            {"match": "data.test", "backend": f"{t.backend_ip}:{be.port}", "name": "data"}],
            ebpf={"enabled": False, "tracing": {"network": True}})
        cfg["listen_addr"] = f"{t.proxy_client_ip}:8443"
        p = ProxyProcess(cfg, tmp_path, argv_prefix=["ip", "netns", "exec", t.proxy])
        run_in(t.proxy, p.start)
        try:
            assert run_in(t.proxy, p.status)["tracing"]["network"]["state"] == "active"
            before = _retrans_segs(t.proxy)
            n = 2 * MiB
            for _ in range(2):
                got = t.run(t.client, upload_download, t.proxy_client_ip, 8443, n)
                assert got == (len(HELLO) + n, stream_sha(HELLO, n))

            def settled() -> bool:     # both sockets of both connections closed (counted)
                return all(run_in(t.proxy, p.metric,
                                  "sniproxy_route_tcp_srtt_at_close_seconds_count",
                                  route="data", side=side) == 2 for side in ("client", "backend"))
            wait_until(settled, 30, "per-route close counts")
            delta = _retrans_segs(t.proxy) - before
            by_side = {side: run_in(t.proxy, p.metric, "sniproxy_route_tcp_retransmits_total",
                                    route="data", side=side) for side in ("client", "backend")}
        finally:
            p.stop()
    assert by_side["client"] > 0 and by_side["backend"] > 0, (by_side, delta)
    assert by_side["client"] + by_side["backend"] == delta, (by_side, delta)
