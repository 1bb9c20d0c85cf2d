"""The kernel TCP splice for real: tc programs in network namespaces this test creates, the
proxy as a subprocess (`ip netns exec`), real clients and backends, sha256 of every byte.

Topologies: one namespace on its loopback, and three namespaces (client, proxy, backend)
joined by veth pairs with real routing, so spliced packets cross interfaces.
"""
from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import (
    SNI_PROXY, ProxyProcess, RawBackend, base_config, client_hello_bytes, free_port, make_pki,
    pattern_bytes, pattern_sha256, send_pattern, tls_backend, wait_until,
)
from tests.integration.netns import Topology, nsexec, run_in

pytestmark = pytest.mark.ebpf
MiB = 1 << 20
GiB = 1 << 30
HELLO = client_hello_bytes("data.test")
_seq = iter(range(1000))


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


def _tag() -> str:
    return f"{os.getpid() % 10000}{next(_seq)}"


@pytest.fixture
def loop_ns():
    with Topology.loopback(_tag()) as t:
        yield t


@pytest.fixture
def three_ns():
    with Topology.three(_tag()) as t:
        yield t


class Proxy:
    """The proxy inside topology `t`'s proxy namespace; status/metrics read from there."""

    def __init__(self, t: Topology, tmp, backend: str, *, v6: bool = False, workers: int = 1,
                 tcp_splice: dict | None = None, idle_s: float = 60, routes=None,
                 upstreams=None, **ebpf):
        self.t = t
        self.port, mport = 8443, 9100
        listen = f"[{t.proxy_client_ip6}]:{self.port}" if v6 else f"{t.proxy_client_ip}:{self.port}"
        cfg = base_config(self.port, mport, workers=workers, default_backend=backend,
                          ebpf={"enabled": True, "dns_cache": {"pin_path": None},
                                "tcp_splice": {"linger_s": 0.5, **(tcp_splice or {})}, **ebpf})
        cfg["listen_addr"] = listen
        cfg["metrics_addr"] = f"127.0.0.1:{mport}"
        cfg["timeouts"]["idle_s"] = idle_s
        if routes is not None:
            cfg["routes"] = routes
        if upstreams is not None:
            cfg["upstreams"] = upstreams
        d = tmp / f"proxy{_tag()}"
        d.mkdir()
        self.p = ProxyProcess(cfg, d, argv_prefix=["ip", "netns", "exec", t.proxy])
        run_in(t.proxy, self.p.start)

    def status(self) -> dict:
        return run_in(self.t.proxy, self.p.status)

    def ts(self) -> dict:
        return self.status()["ebpf"]["tcp_splice_detail"]

    def metric(self, name: str, **labels) -> float:
        return run_in(self.t.proxy, self.p.metric, name, **labels)

    def access(self) -> list[str]:
        return [line for line in self.p.log().splitlines() if "sniproxy.access" in line]

    def log(self) -> str:
        return self.p.log()

    def stop(self) -> int:
        return self.p.stop()

    def wait_clean(self) -> None:
        """Every flow finished and out of the maps (after the short linger)."""
        def clean():
            d = self.ts()
            return d["active_flows"] == 0 and d["lingering_flows"] == 0
        wait_until(clean, 15, "tcp_splice flows back to 0")


def connect(host: str, port: int, family=socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_to_eof(s: socket.socket, prefix: bytes = b"") -> tuple[int, str]:
    h = hashlib.sha256(prefix)
    n = len(prefix)
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return n, h.hexdigest()
        h.update(chunk)
        n += len(chunk)


def stream_sha(prefix: bytes, n: int) -> str:
    h = hashlib.sha256(prefix)
    chunk = pattern_bytes(128 * 1024)
    full, rest = divmod(n, len(chunk))
    for _ in range(full):
        h.update(chunk)
    h.update(chunk[:rest])
    return h.hexdigest()


def upload_download(host: str, port: int, up: int, family=socket.AF_INET,
                    before_upload=None) -> tuple[int, str]:
    """Send HELLO + `up` pattern bytes while reading everything back; (bytes read, sha256)."""
    s = connect(host, port, family)
    out: dict = {}

    def reader():
        try:
            out["r"] = read_to_eof(s, HELLO)
        except OSError as exc:
            out["e"] = exc

    s.sendall(HELLO)
    # The echo of the hello: the backend answered, so the hand-over is done (a client whose
    # FIN reaches the proxy before it is takes the next relay kind: not_established).
    echo = b""
    while len(echo) < len(HELLO):
        chunk = s.recv(len(HELLO) - len(echo))
        assert chunk, "EOF before the hello's echo"
        echo += chunk
    assert echo == HELLO
    t = threading.Thread(target=reader)
    t.start()
    if before_upload is not None:
        before_upload()
    send_pattern(s, up)
    s.shutdown(socket.SHUT_WR)
    t.join(300)
    s.close()
    if "e" in out:
        raise out["e"]
    return out["r"]


class EchoBackend:
    """Echoes every byte back as it arrives (so both directions run at once); counts and
    hashes what it received; half-closes when the client did."""

    def __init__(self, host: str):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(2048)
        self.port = self.sock.getsockname()[1]
        self.results: list[tuple[int, str, str]] = []     # (bytes, sha256, how it ended)
        self.cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        h, n, how = hashlib.sha256(), 0, "eof"
        conn.settimeout(120)
        try:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        except ConnectionResetError:
            how = "reset"
        except OSError as exc:
            how = f"error {exc}"
        finally:
            conn.close()
            with self.cond:
                self.results.append((n, h.hexdigest(), how))
                self.cond.notify_all()

    def wait(self, n: int = 1, timeout: float = 120):
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.results) >= n, timeout):
                raise TimeoutError(f"echo backend finished {len(self.results)} of {n}")
            return list(self.results)


def spliced(proxy: Proxy, n: int = 1) -> None:
    wait_until(lambda: len(proxy.access()) >= n, 15, "access log lines")
    lines = proxy.access()
    assert all("relay=tcp_splice" in line for line in lines), lines


# ============================================================================ loopback
def test_loopback_echo_exact_counted_and_clean(loop_ns, tmp_path):
    t = loop_ns
    be = t.run(t.backend, EchoBackend, "127.0.0.2")
    proxy = Proxy(t, tmp_path, f"127.0.0.2:{be.port}")
    assert proxy.status()["ebpf"]["tcp_splice"] == "active", proxy.log()
    assert proxy.ts()["interfaces"] == ["lo"]
    for size in (0, 1, 100_000, 8 * MiB):
        got = t.run(t.client, upload_download, "127.0.0.1", proxy.port, size)
        assert got == (len(HELLO) + size, stream_sha(HELLO, size))
    results = be.wait(4)
    assert sorted(r[0] for r in results) == sorted(len(HELLO) + s for s in (0, 1, 100_000, 8 * MiB))
    spliced(proxy, 4)
    assert proxy.metric("ebpf_tcp_splice_engaged_total") == 4
    assert proxy.metric("ebpf_tcp_splice_bytes_total", direction="client_to_backend") >= 8 * MiB
    proxy.wait_clean()
    assert proxy.metric("ebpf_tcp_splice_active_flows") == 0
    assert "bytes_up=%d" % (len(HELLO) + 8 * MiB) in " ".join(proxy.access())
    assert t.tc_state() != ""
    assert proxy.stop() == 0
    assert t.tc_state() == "", "tc filters or the clsact qdisc left behind"
