"""The whole proxy as a subprocess, with real TLS backends, real clients and real SOCKS5 servers."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tests.integration.harness import (
    _PATTERN, ProxyProcess, RawBackend, base_config, client_hello_bytes, curl, free_port, free_ports, make_pki,
    pattern_sha256, send_pattern, tls_backend, wait_until,
)
from tests.ebpf_required import require_ebpf
from tests.integration.socks_servers import start_danted, start_pproxy
from tests.unit.hello_builder import X25519, X25519MLKEM768, X25519MLKEM768_SHARE, build_hello, records

NAMES = ["a.test", "b.test", "www.example.test", "api-7.example.net"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), NAMES)


@pytest.fixture(scope="module")
def backends(pki):
    with tls_backend(pki, NAMES, "A") as port_a, tls_backend(pki, NAMES, "B") as port_b:
        yield {"A": port_a, "B": port_b}


@pytest.fixture
def proxy_factory(tmp_path):
    started: list[ProxyProcess] = []

    def start(wait: bool = True, **over) -> ProxyProcess:
        cfg = base_config(*free_ports(2), **over)
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        p = ProxyProcess(cfg, workdir)
        started.append(p)
        return p.start(wait=wait)

    yield start
    for p in started:
        p.stop()


def proxy_port(p: ProxyProcess) -> int:
    return int(p.config["listen_addr"].rsplit(":", 1)[1].rstrip("]"))


def whoami(p: ProxyProcess, name: str, pki) -> dict:
    r = curl(name, proxy_port(p), "/whoami", pki.ca_path)
    assert r.returncode == 0, r.stderr.decode() + p.log()
    return json.loads(r.stdout)


def raw_connect(p: ProxyProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port(p)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


# ------------------------------------------------------------------ routing with real clients
def test_routes_exact_wildcard_regex_with_curl(proxy_factory, backends, pki):
    p = proxy_factory(routes=[
        {"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"},
        {"match": "*.test", "backend": f"127.0.0.1:{backends['B']}"},
        {"match": "~^api-[0-9]+\\.example\\.net$", "backend": f"127.0.0.1:{backends['A']}", "name": "api"},
    ])
    assert whoami(p, "a.test", pki) == {"backend": "A", "port": backends["A"], "sni": "a.test", "path": "/whoami"}
    assert whoami(p, "b.test", pki)["backend"] == "B"
    assert whoami(p, "A.TEST", pki)["backend"] == "A"          # case-insensitive
    assert whoami(p, "api-7.example.net", pki)["backend"] == "A"
    # workers publish their counts once a second
    wait_until(lambda: p.metric("sniproxy_connections_total", route="*.test", outcome="ok") == 1, 5, "count")
    assert p.metric("sniproxy_connections_total", route="api", outcome="ok") == 1
    wait_until(lambda: "sni=api-7.example.net route=api" in p.log(), 5, "access log line")


def test_openssl_s_client(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "b.test", "backend": f"127.0.0.1:{backends['B']}"}])
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy_port(p)}", "-servername", "b.test",
         "-CAfile", str(pki.ca_path), "-verify_return_error", "-quiet", "-ign_eof"],
        input=b"GET /whoami HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        capture_output=True, timeout=20)
    assert b'"backend": "B"' in r.stdout, r.stderr.decode()
    assert b'"sni": "b.test"' in r.stdout


def test_python_ssl_with_alpn(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", proxy_port(p)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.test") as tls:
            tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            body = recv_all(tls)
    assert b'"backend": "A"' in body


def test_unknown_name_gets_unrecognized_name_alert(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    with socket.create_connection(("127.0.0.1", proxy_port(p)), timeout=10) as raw:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
            ctx.wrap_socket(raw, server_hostname="nobody.test")
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="no_route") == 1, 5, "no_route counted")


def test_no_sni_goes_to_default_backend(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}],
                      default_backend=f"127.0.0.1:{backends['B']}")
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", proxy_port(p)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as tls:    # no SNI at all
            tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            body = recv_all(tls)
    assert b'"backend": "B"' in body and b'"sni": null' in body


def test_no_sni_without_default_is_refused_and_counted(proxy_factory, backends):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    with raw_connect(p) as s:
        s.sendall(client_hello_bytes(None))
        data = recv_all(s)
    assert data == bytes([21, 3, 3, 0, 2, 2, 112])      # fatal unrecognized_name alert, then close
    assert p.metric("sniproxy_client_hello_failures_total", reason="no_sni") == 1


# ------------------------------------------------------------------ the ClientHello on the wire
def test_hello_one_byte_at_a_time_arrives_unchanged(proxy_factory):
    backend = RawBackend()
    try:
        p = proxy_factory(routes=[{"match": "slow.test", "backend": f"127.0.0.1:{backend.port}"}])
        hello = client_hello_bytes("slow.test", alpn=["h2"])
        with raw_connect(p) as s:
            for i in range(len(hello)):
                s.send(hello[i:i + 1])
            s.sendall(b"after-hello")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""
        session = backend.wait_sessions(1)[0]
        assert session.received == hello + b"after-hello"
    finally:
        backend.close()


def test_2kb_post_quantum_hello_split_over_records(proxy_factory):
    backend = RawBackend()
    try:
        p = proxy_factory(routes=[{"match": "pq.test", "backend": f"127.0.0.1:{backend.port}"}])
        message = build_hello("pq.test", alpn=["h2"],
                              key_shares=((X25519MLKEM768, X25519MLKEM768_SHARE), (X25519, 32)), padding=512)
        wire = records(message, sizes=[700])
        assert len(message) > 1500 and wire.count(b"\x16\x03\x01") >= 3
        with raw_connect(p) as s:
            for i in range(0, len(wire), 300):              # several TCP segments too
                s.send(wire[i:i + 300])
            s.shutdown(socket.SHUT_WR)
            recv_all(s)
        assert backend.wait_sessions(1)[0].received == wire
    finally:
        backend.close()


def test_garbage_is_closed_and_counted_proxy_survives(proxy_factory, backends, pki):
    from sniproxy.proxy.clienthello import UNEXPECTED_MESSAGE, tls_alert
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    for payload, answer in ((b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", b""),
                            (b"\x80\x2e\x01\x03\x01" + b"\0" * 40, b""),
                            # a TLS ServerHello: the peer speaks TLS, so it gets an alert
                            (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", tls_alert(UNEXPECTED_MESSAGE)),
                            (bytes(range(256)), b"")):
        with raw_connect(p) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == answer
    assert p.metric("sniproxy_client_hello_failures_total", reason="not_tls") >= 1
    assert p.metric("sniproxy_client_hello_failures_total", reason="sslv2") == 1
    assert p.metric("sniproxy_client_hello_failures_total") >= 3
    assert whoami(p, "a.test", pki)["backend"] == "A"      # still serving


def test_slowloris_is_cut_at_client_hello_timeout(proxy_factory):
    p = proxy_factory(routes=[{"match": "a.test", "backend": "127.0.0.1:9"}], timeouts={"client_hello_s": 0.5, "connect_s": 5, "idle_s": 60})
    hello = client_hello_bytes("a.test")
    with raw_connect(p) as s:
        s.sendall(hello[:20])
        t0 = time.monotonic()
        assert recv_all(s) == b""
        assert 0.3 < time.monotonic() - t0 < 5
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="hello_timeout") == 1, 5, "count")


def _proxy_cpu_seconds(p: ProxyProcess) -> float:
    """utime + stime of the supervisor and its workers, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = [p.proc.pid] + [int(x) for x in
                           open(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read().split()]
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


@pytest.mark.parametrize("ebpf", [False, True], ids=["userspace", "sockmap"])
def test_partial_hello_then_fin_is_answered_at_once_without_spinning(proxy_factory, ebpf):
    """A partial ClientHello followed by FIN ends the hello read at once as client_closed.

    At EOF a MSG_PEEK recv returns the queued bytes again (never b""), and the socket stays
    readable: the worker used to spin on it until client_hello_s, one core per such client."""
    if ebpf:
        require_ebpf()
    p = proxy_factory(routes=[{"match": "a.test", "backend": "127.0.0.1:9"}],
                      timeouts={"client_hello_s": 20, "connect_s": 5, "idle_s": 60},
                      ebpf={"enabled": ebpf})
    hello = client_hello_bytes("a.test")
    cpu_before = _proxy_cpu_seconds(p)
    socks = []
    for _ in range(20):
        s = raw_connect(p)
        s.sendall(hello[:100])
        s.shutdown(socket.SHUT_WR)
        socks.append(s)
    t0 = time.monotonic()
    for s in socks:
        assert recv_all(s) == b""          # closed by the proxy, long before client_hello_s
        s.close()
    assert time.monotonic() - t0 < 10
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="client_closed") == 20, 5,
               "20 client_closed")
    assert p.metric("sniproxy_connections_total", outcome="hello_timeout") == 0
    # Spinning cost a full core per connection; answering costs milliseconds in all.
    assert _proxy_cpu_seconds(p) - cpu_before < 2.0


@pytest.mark.parametrize("defer", [True, False])
def test_listener_defer_accept_option(defer):
    from sniproxy.proxy.server import create_listener
    lsock = create_listener("127.0.0.1", 0, backlog=8, reuse_port=False, defer_accept=defer)
    try:
        value = lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
        assert (value > 0) is defer
    finally:
        lsock.close()


def test_silent_client_takes_no_slot_until_it_speaks(proxy_factory, backends, pki):
    """listen_defer_accept (default): a connection that says nothing is not handed to the proxy,
    so with one slot a real client is served at once. The silent one is handed over after
    about a second (SYN-ACK retransmitted) and then cut at client_hello_s."""
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}],
                      max_connections=1,
                      timeouts={"client_hello_s": 3.0, "connect_s": 5, "idle_s": 60})
    with raw_connect(p) as silent:
        assert whoami(p, "a.test", pki)["backend"] == "A"
        # Without deferral the silent client would have held the only slot: curl would have
        # been served only after the hello timeout had cut the silent one.
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):
            silent.recv(1)
        silent.setblocking(True)
        assert recv_all(silent) == b""
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="hello_timeout") == 1, 5, "count")


# ------------------------------------------------------------------ bytes, exactly once
def _transfer(p: ProxyProcess, backend: RawBackend, up_bytes: int, hello: bytes) -> tuple[str, int]:
    """Client sends hello + up_bytes and half-closes while reading everything the backend sends."""
    received = hashlib.sha256()
    count = 0
    with raw_connect(p) as s:
        s.settimeout(120)

        def sender():
            s.sendall(hello)
            send_pattern(s, up_bytes)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=sender)
        t.start()
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            received.update(chunk)
            count += len(chunk)
        t.join()
    return received.hexdigest(), count


@pytest.mark.slow
def test_one_gib_each_way_is_byte_exact(proxy_factory):
    size = 1 << 30
    backend = RawBackend(reply_bytes=size, send_first=True, keep_prefix=1024)
    try:
        p = proxy_factory(routes=[{"match": "bulk.test", "backend": f"127.0.0.1:{backend.port}"}])
        hello = client_hello_bytes("bulk.test")
        digest, count = _transfer(p, backend, size, hello)
        session = backend.wait_sessions(1)[0]
        assert count == size and digest == pattern_sha256(size)
        expected_up = hashlib.sha256(hello)             # what the backend must have seen
        full, rest = divmod(size, len(_PATTERN))
        for _ in range(full):
            expected_up.update(_PATTERN)
        expected_up.update(_PATTERN[:rest])
        assert session.nbytes == len(hello) + size and session.sha256 == expected_up.hexdigest()
        wait_until(lambda: p.metric("sniproxy_bytes_total", direction="backend_to_client") == size, 5,
                   "bytes counted")
    finally:
        backend.close()


@pytest.mark.parametrize("relay_mode", ["splice", "copy"])
def test_half_close_client_still_gets_full_response(proxy_factory, relay_mode):
    reply = 5 * 1024 * 1024 + 3
    backend = RawBackend(reply_bytes=reply)          # reads to EOF, then answers
    try:
        p = proxy_factory(routes=[{"match": "hc.test", "backend": f"127.0.0.1:{backend.port}"}],
                          relay={"mode": relay_mode})
        digest, count = _transfer(p, backend, 1_000_000, client_hello_bytes("hc.test"))
        assert count == reply and digest == pattern_sha256(reply)
        assert backend.wait_sessions(1)[0].eof
        wait_until(lambda: f"relay={relay_mode}" in p.log(), 5, "access log line")
    finally:
        backend.close()


def test_backend_killed_mid_stream_resets_client(proxy_factory):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"x" * 100000)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()                                   # RST mid-stream

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    p = proxy_factory(routes=[{"match": "rst.test", "backend": f"127.0.0.1:{port}"}])
    with raw_connect(p) as s:
        s.sendall(client_hello_bytes("rst.test"))
        got = 0
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += len(chunk)
    listener.close()
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="reset") == 1, 5, "reset counted")


def test_unreachable_backend_is_logged_and_counted(proxy_factory):
    dead = free_port()
    p = proxy_factory(routes=[{"match": "dead.test", "backend": f"127.0.0.1:{dead}"}])
    with raw_connect(p) as s:
        s.sendall(client_hello_bytes("dead.test"))
        assert recv_all(s) == b""
    wait_until(lambda: p.metric("sniproxy_upstream_connect_failures_total", kind="refused") == 1, 5, "counted")
    wait_until(lambda: "outcome=connect_failed" in p.log() and "refused" in p.log(), 5, "access log line")


# ------------------------------------------------------------------ limits
def test_max_connections_waits_in_backlog(proxy_factory):
    backend = RawBackend()
    try:
        p = proxy_factory(routes=[{"match": "lim.test", "backend": f"127.0.0.1:{backend.port}"}],
                          max_connections=2)
        hello = client_hello_bytes("lim.test")
        held = [raw_connect(p), raw_connect(p)]
        for s in held:
            s.sendall(hello)
        wait_until(lambda: p.status()["active_connections"] == 2, 5, "two active")
        third = raw_connect(p)                   # the kernel completes the handshake (backlog)
        third.sendall(hello + b"third")
        third.shutdown(socket.SHUT_WR)
        wait_until(lambda: p.metric("sniproxy_connection_limit_reached_total") >= 1, 5, "limit counted")
        assert p.status()["active_connections"] == 2
        held[0].shutdown(socket.SHUT_WR)         # a slot frees: the third is served
        sessions = backend.wait_sessions(1)
        assert recv_all(third) == b""
        sessions = backend.wait_sessions(2)
        assert any(s.received == hello + b"third" for s in sessions)
        for s in held + [third]:
            s.close()
    finally:
        backend.close()


# ------------------------------------------------------------------ upstreams
def test_socks5_upstream_with_auth_pproxy(proxy_factory, backends, pki, tmp_path):
    with start_pproxy(auth=("u", "p"), log_dir=tmp_path) as socks:
        p = proxy_factory(
            routes=[{"match": "a.test", "backend": f"localhost:{backends['A']}", "upstream": "corp"}],
            upstreams={"corp": {"type": "socks5", "addr": socks.addr, "username": "u", "password": "p"}})
        assert whoami(p, "a.test", pki)["backend"] == "A"
        wait_until(lambda: "upstream=corp" in p.log(), 5, "access log line")


def test_socks5_upstream_bad_password_is_a_clear_failure(proxy_factory, backends, tmp_path):
    with start_pproxy(auth=("u", "p"), log_dir=tmp_path) as socks:
        p = proxy_factory(
            routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}", "upstream": "corp"}],
            upstreams={"corp": {"type": "socks5", "addr": socks.addr, "username": "u", "password": "wrong"}})
        with raw_connect(p) as s:
            s.sendall(client_hello_bytes("a.test"))
            assert recv_all(s) == b""
        wait_until(lambda: "outcome=connect_failed" in p.log(), 5, "log line")
        assert p.metric("sniproxy_upstream_connect_failures_total", upstream="corp", kind="socks") == 1


def test_socks5_upstream_dante_resolves_the_name(proxy_factory, backends, pki, tmp_path):
    # "localhost" is sent to Dante as a domain name (ATYP 3): the SOCKS server resolves it.
    with start_danted(tmp_path) as socks:
        p = proxy_factory(
            routes=[{"match": "a.test", "backend": f"localhost:{backends['A']}", "upstream": "dante"}],
            upstreams={"dante": {"type": "socks5", "addr": socks.addr}})
        assert whoami(p, "a.test", pki)["backend"] == "A"
        wait_until(lambda: "upstream=dante" in p.log() and "localhost" in p.log(), 5, "access log line")


def test_dynamic_sni_refuses_loopback_unless_allowed(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "localhost", "backend": f"$sni:{backends['A']}"}])
    with raw_connect(p) as s:
        s.sendall(client_hello_bytes("localhost"))
        assert recv_all(s) == b""
    wait_until(lambda: "outcome=forbidden" in p.log(), 5, "forbidden logged")
    assert "allow_private" in p.log()
    p2 = proxy_factory(routes=[{"match": "localhost", "backend": f"$sni:{backends['A']}", "allow_private": True}])
    with raw_connect(p2) as s:
        s.sendall(client_hello_bytes("localhost"))
        s.shutdown(socket.SHUT_WR)
        recv_all(s)
    wait_until(lambda: "sni=localhost" in p2.log() and "outcome=forbidden" not in p2.log(), 5, "served")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_tells_backend_the_client(proxy_factory, version):
    backend = RawBackend(read_proxy_header=True)
    try:
        p = proxy_factory(routes=[{"match": "pp.test", "backend": f"127.0.0.1:{backend.port}",
                                   "proxy_protocol": version}])
        hello = client_hello_bytes("pp.test")
        with raw_connect(p) as s:
            client_port = s.getsockname()[1]
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            recv_all(s)
        session = backend.wait_sessions(1)[0]
        if version == "v1":
            assert session.proxy_header == (
                f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {proxy_port(p)}\r\n".encode())
        else:
            h = session.proxy_header
            assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and h[12] == 0x21 and h[13] == 0x11
            assert h[16:20] == bytes([127, 0, 0, 1]) and int.from_bytes(h[24:26], "big") == client_port
        assert session.received == hello
    finally:
        backend.close()


# ------------------------------------------------------------------ processes, reload, shutdown
def test_two_workers_share_the_port_and_metrics_aggregate(proxy_factory, backends, pki):
    p = proxy_factory(workers=2, routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    status = p.status()
    assert [w["alive"] for w in status["workers"]] == [True, True]
    assert status["clienthello_parser"] == {"parser": "compiled"}, status["clienthello_parser"]
    n = 40
    for _ in range(n):
        with raw_connect(p) as s:
            s.sendall(client_hello_bytes("a.test"))
            s.close()
    wait_until(lambda: p.metric("sniproxy_connections_total") == n, 10, f"{n} connections counted")
    pids = set()
    for line in p.log().splitlines():
        if "sniproxy.access" in line:
            pids.add(line.split("[", 1)[1].split("]", 1)[0])
    assert len(pids) == 2, "SO_REUSEPORT should spread connections over both workers"


def test_ipv6_listener(proxy_factory, backends, pki):
    port = free_port(socket.AF_INET6)
    p = proxy_factory(listen_addr=[f"[::1]:{port}"],
                      routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_path),
                        "--resolve", f"a.test:{port}:::1", f"https://a.test:{port}/whoami"],
                       capture_output=True, timeout=15)
    assert r.returncode == 0 and b'"backend": "A"' in r.stdout, r.stderr + p.log().encode()
    wait_until(lambda: "client=[::1]:" in p.log(), 5, "access log line with the IPv6 client")


def test_reload_valid_then_invalid_config(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}])
    backend = RawBackend()
    try:
        # a connection that outlives the reload
        long = raw_connect(p)
        long.sendall(client_hello_bytes("a.test"))
        cfg = dict(p.config)
        cfg["routes"] = [{"match": "a.test", "backend": f"127.0.0.1:{backends['B']}"}]
        p.config_path.write_text(json.dumps(cfg))
        p.signal(signal.SIGHUP)
        wait_until(lambda: p.metric("sniproxy_config_reloads_total", result="applied") == 1, 10, "reload")
        wait_until(lambda: whoami(p, "a.test", pki)["backend"] == "B", 10, "new route in use")
        # invalid: rejected with the path, old config stays
        p.config_path.write_text(json.dumps({**cfg, "max_connections": "lots"}))
        p.signal(signal.SIGHUP)
        wait_until(lambda: p.metric("sniproxy_config_reloads_total", result="rejected") == 1, 10, "rejected")
        wait_until(lambda: "max_connections" in p.log() and "keeping the running config" in p.log(), 5,
                   "the rejection logged with its JSON path")
        assert whoami(p, "a.test", pki)["backend"] == "B"
        # the connection opened before the reload is still relayed: backend A's ServerHello arrives
        wait_until(lambda: p.status()["active_connections"] >= 1, 5, "old connection still active")
        long.settimeout(10)
        assert long.recv(5)[:1] == b"\x16"
        long.close()
    finally:
        backend.close()


def test_sigterm_drains_open_connections(proxy_factory):
    backend = RawBackend(reply_bytes=1000)
    try:
        p = proxy_factory(routes=[{"match": "d.test", "backend": f"127.0.0.1:{backend.port}"}],
                          timeouts={"client_hello_s": 5, "connect_s": 5, "idle_s": 60, "shutdown_grace_s": 20})
        s = raw_connect(p)
        s.sendall(client_hello_bytes("d.test"))
        wait_until(lambda: p.status()["active_connections"] == 1, 5, "active")
        wait_until(lambda: p.metric("sniproxy_relay_connections_total") == 1, 5, "relay counted")
        p.signal(signal.SIGTERM)
        wait_until(lambda: "draining 1 connections" in p.log(), 5, "draining")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy_port(p)), timeout=2).recv(1)
        s.sendall(b"still-flowing")
        s.shutdown(socket.SHUT_WR)
        assert len(recv_all(s)) == 1000
        assert p.proc.wait(10) == 0
        assert backend.wait_sessions(1)[0].received.endswith(b"still-flowing")
    finally:
        backend.close()


def test_check_config_reports_json_path(tmp_path):
    from tests.integration.harness import SNI_PROXY
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"listen_addr": "0.0.0.0:8443",
                               "routes": [{"match": "a.test", "backend": "nope"}],
                               "ebpf": {"sockmp": {}}}))
    r = subprocess.run([SNI_PROXY, "--config", str(bad), "--check-config"], capture_output=True, timeout=30)
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "routes[0].backend" in err and "'nope'" in err and "ebpf.sockmp" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"listen_addr": "127.0.0.1:8443", "default_backend": "127.0.0.1:443"}))
    r = subprocess.run([SNI_PROXY, "--config", str(good), "--check-config"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("relay_mode", ["splice", "copy"])
def test_slow_reader_does_not_make_the_proxy_buffer(proxy_factory, relay_mode):
    """A backend that never reads: the client must soon be unable to send more (TCP pushes back)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
    t.start()
    p = proxy_factory(routes=[{"match": "slow.test", "backend": f"127.0.0.1:{listener.getsockname()[1]}"}],
                      relay={"mode": relay_mode})
    chunk = b"z" * 65536
    sent = 0
    with raw_connect(p) as s:
        s.sendall(client_hello_bytes("slow.test"))
        s.settimeout(1.0)
        limit = 256 << 20
        try:
            while sent < limit:
                sent += s.send(chunk)
        except (TimeoutError, socket.timeout):
            pass
        # everything in flight fits in socket buffers plus one pipe / buffer per direction
        assert sent < 64 << 20, f"{sent} bytes accepted from a client whose backend never reads"
        worker = [w["pid"] for w in p.status()["workers"]][0]
        rss_kb = int([line for line in open(f"/proc/{worker}/status") if line.startswith("VmRSS")][0].split()[1])
        assert rss_kb < 200_000
    listener.close()
    for conn, _ in accepted:
        conn.close()


def test_json_access_log(proxy_factory, backends, pki):
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backends['A']}"}],
                      log={"format": "json"})
    whoami(p, "a.test", pki)
    lines = wait_until(lambda: [json.loads(x) for x in p.log().splitlines() if '"sniproxy.access"' in x],
                       5, "a JSON access log line")
    entry = lines[0]
    assert entry["sni"] == "a.test" and entry["outcome"] == "ok" and entry["relay"] == "splice"
    assert entry["bytes_up"] > 500 and entry["bytes_down"] > 500 and entry["backend"].endswith(str(backends["A"]))
