"""The tc splice when client, proxy and backend share one host (lo), as in the benchmarks.

There the egress hook rewrites a packet in place as it leaves lo (one crossing), instead of
the ingress hook rewriting it and redirecting it to lo's egress, which loops it back (two
crossings). These tests check that path for what test_tcp_splice.py checks across veths:
bytes exact both ways, half-close, resets, a backend that speaks first, and that each spliced
packet really crosses lo once.
"""
from __future__ import annotations

import hashlib
import socket
import ssl
import struct

import pytest

from tests.integration.harness import (
    RawBackend, make_pki, pattern_bytes, pattern_sha256, send_pattern, tls_backend, wait_until,
)
from tests.integration.netns import nsexec, run_in
from tests.integration.test_tcp_splice import (
    HELLO, MiB, EchoBackend, Proxy, ScriptedBackend, _recv_exact, connect, loop_ns,  # noqa: F401
    read_to_eof, spliced, stream_sha, upload_download, _ebpf,  # noqa: F401
)

pytestmark = pytest.mark.ebpf
BACKEND_IP = "127.0.0.2"


def _lo_tx_packets(ns: str) -> int:
    out = nsexec(ns, "cat", "/sys/class/net/lo/statistics/tx_packets").stdout
    return int(out)


def test_each_spliced_packet_crosses_lo_once(loop_ns, tmp_path):
    """Small request/response exchanges (one segment per packet, no GSO): lo transmits each
    spliced packet once. The ingress-and-redirect path transmitted it twice."""
    t = loop_ns
    be = t.run(t.backend, EchoBackend, BACKEND_IP)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}")
    rounds = 500

    def ping_pong():
        with connect("127.0.0.1", proxy.port) as s:
            s.sendall(HELLO)
            assert _recv_exact(s, len(HELLO)) == HELLO
            before = _lo_tx_packets(t.client)
            for i in range(rounds):
                msg = struct.pack("!I", i) * 25
                s.sendall(msg)
                assert _recv_exact(s, len(msg)) == msg
            after = _lo_tx_packets(t.client)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
            return after - before
    before_pk = proxy.metric("ebpf_tcp_splice_packets_total")
    lo_tx = t.run(t.client, ping_pong)
    spliced(proxy)
    pk = proxy.metric("ebpf_tcp_splice_packets_total") - before_pk
    # 2 data packets per round, plus ACKs (delayed ACKs mostly ride on the data).
    assert pk >= 2 * rounds
    assert lo_tx < 1.3 * pk, f"lo sent {lo_tx} packets for {pk} spliced: crossed twice"


def test_large_transfer_both_ways_exact(loop_ns, tmp_path):
    t = loop_ns
    be = t.run(t.backend, EchoBackend, BACKEND_IP)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}")
    size = 256 * MiB
    got = t.run(t.client, upload_download, "127.0.0.1", proxy.port, size)
    assert got == (len(HELLO) + size, stream_sha(HELLO, size))
    assert be.wait(1)[0][:2] == (len(HELLO) + size, stream_sha(HELLO, size))
    spliced(proxy)
    # lo sends IPv4 BIG TCP packets (over 64 KiB, IP length 0): their payload is the skb's
    # length (it was counted as ~4 GiB a packet, and the FIN's sequence number was off)
    for direction in ("client_to_backend", "backend_to_client"):
        counted = proxy.metric("ebpf_tcp_splice_bytes_total", direction=direction)
        assert size <= counted <= size * 1.01 + len(HELLO), (direction, counted)
    wait_until(lambda: proxy.access(), 10, "access line")
    assert f"bytes_up={len(HELLO) + size} bytes_down={len(HELLO) + size}" in proxy.access()[0]
    proxy.wait_clean()


def test_half_close_backend_first_on_lo(loop_ns, tmp_path):
    t = loop_ns

    def script(conn, r):
        r["hello"] = _recv_exact(conn, len(HELLO))
        conn.sendall(pattern_bytes(2 * MiB))
        conn.shutdown(socket.SHUT_WR)
        r["up"] = read_to_eof(conn)

    be = t.run(t.backend, ScriptedBackend, BACKEND_IP, script)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}")

    def client():
        with connect("127.0.0.1", proxy.port) as s:
            s.sendall(HELLO)
            down = read_to_eof(s)
            send_pattern(s, 4 * MiB)
            s.shutdown(socket.SHUT_WR)
            return down, s.recv(1)
    down, tail = t.run(t.client, client)
    assert down == (2 * MiB, pattern_sha256(2 * MiB)) and tail == b""
    r = be.wait()
    assert r["hello"] == HELLO and r["up"] == (4 * MiB, pattern_sha256(4 * MiB))
    spliced(proxy)
    assert "outcome=ok" in proxy.access()[0]
    proxy.wait_clean()


@pytest.mark.parametrize("who", ["client", "backend"])
def test_rst_either_way_on_lo(loop_ns, tmp_path, who):
    t = loop_ns
    linger0 = struct.pack("ii", 1, 0)

    def script(conn, r):
        _recv_exact(conn, len(HELLO))
        conn.sendall(b"ready")
        if who == "backend":
            _recv_exact(conn, MiB)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            return
        try:
            while conn.recv(1 << 16):
                pass
            r["eof"] = True
        except ConnectionResetError:
            r["reset"] = True

    be = t.run(t.backend, ScriptedBackend, BACKEND_IP, script)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}")

    def client():
        s = connect("127.0.0.1", proxy.port)
        s.sendall(HELLO)
        assert _recv_exact(s, 5) == b"ready"
        send_pattern(s, MiB)
        if who == "client":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            s.close()
            return "sent"
        try:
            while s.recv(1 << 16):
                pass
            return "eof"
        except ConnectionResetError:
            return "reset"
        finally:
            s.close()
    seen = t.run(t.client, client)
    r = be.wait()
    assert r.get("reset") if who == "client" else seen == "reset", (r, seen)
    wait_until(lambda: any("outcome=reset" in line for line in proxy.access()), 10,
               "the reset in the access log")
    assert "relay=tcp_splice" in proxy.access()[0]
    proxy.wait_clean()


def test_backend_that_speaks_first_on_lo(loop_ns, tmp_path):
    """The hold and the copy of early backend ACKs to the proxy's socket, on lo's egress."""
    t = loop_ns
    be = t.run(t.backend, RawBackend, reply_bytes=256 * 1024, send_first=True, host=BACKEND_IP)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}")

    def client():
        with connect("127.0.0.1", proxy.port) as s:
            s.sendall(HELLO)
            banner = _recv_exact(s, 256 * 1024)
            send_pattern(s, 2 * MiB)
            s.shutdown(socket.SHUT_WR)
            return hashlib.sha256(banner).hexdigest(), s.recv(1)
    for _ in range(5):
        assert t.run(t.client, client) == (pattern_sha256(256 * 1024), b"")
    sessions = be.wait_sessions(5)
    assert all((x.nbytes, x.sha256) == (len(HELLO) + 2 * MiB, stream_sha(HELLO, 2 * MiB))
               for x in sessions)
    wait_until(lambda: len(proxy.access()) == 5, 10, "five access lines")
    proxy.wait_clean()


def _python_tls_get_until_close(host: str, port: int, ca: str) -> bytes:
    """A Python TLS client reading one `Connection: close` response to the end, then
    closing: OpenSSL then sends its close_notify to a server that has already closed."""
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="data.test") as s:
            s.sendall(b"GET /whoami HTTP/1.1\r\nHost: data.test\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    return data


def test_server_closes_first_then_the_clients_close_notify_is_a_normal_end(loop_ns, tmp_path):
    """The server's RST answering the client's late close_notify goes through the splice;
    the backend had ended and its FIN was acknowledged, so the access log says ok."""
    t = loop_ns
    pki = make_pki(tmp_path / "pki", ["data.test"])
    backend = tls_backend(pki, ["data.test"], "b1", host=BACKEND_IP)
    port = run_in(t.backend, backend.__enter__)
    try:
        proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{port}")
        for _ in range(5):
            reply = run_in(t.client, _python_tls_get_until_close, "127.0.0.1", proxy.port,
                           str(pki.ca_path))
            assert b"200 OK" in reply and b'"sni": "data.test"' in reply
        spliced(proxy, 5)
        outcomes = [line.split("outcome=")[1] for line in proxy.access()]
        assert all(o.startswith("ok") for o in outcomes), outcomes
        assert any("backend reset after its end" in o for o in outcomes), outcomes
        proxy.wait_clean()
    finally:
        run_in(t.backend, backend.__exit__, None, None, None)


def _proxy_sockets_to(ns: str, backend_ip: str) -> list[str]:
    """`ss -tni` lines (state + info) of the proxy's established sockets to the backend."""
    out = nsexec(ns, "ss", "-tniH", "state", "established", "dst", backend_ip).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("answer", ["at_once", "later"])
@pytest.mark.parametrize("topology", ["lo", "veth"])
def test_the_kept_backend_socket_has_its_hand_over_bytes_acknowledged(topology, answer, tmp_path):
    """A backend that answers the hello at once acknowledges it on its answer, which the splice
    forwards: the proxy's kept socket gets a copy cut down to that ACK. Without it, it kept
    the hello unacknowledged, retransmitted it for the flow's life (the client saw each as a
    D-SACK) and gave up after tcp_retries2, freeing its port while the flow lived."""
    from tests.integration.netns import Topology
    from tests.integration.test_tcp_splice import _tag
    topo = Topology.loopback(_tag()) if topology == "lo" else Topology.three(_tag())
    with topo as t:
        backend_ip = BACKEND_IP if topology == "lo" else t.backend_ip
        proxy_ip = "127.0.0.1" if topology == "lo" else t.proxy_client_ip
        if answer == "at_once":          # the echo carries the ACK of the hello
            be = t.run(t.backend, EchoBackend, backend_ip)
        else:                            # a pure ACK first, the answer after the client's next
            def script(conn, r):
                r["hello"] = _recv_exact(conn, len(HELLO))
                conn.sendall(_recv_exact(conn, 5))
            be = t.run(t.backend, ScriptedBackend, backend_ip, script)
        proxy = Proxy(t, tmp_path, f"{backend_ip}:{be.port}")

        def client():
            s = connect(proxy_ip, proxy.port)
            s.sendall(HELLO)
            if answer == "at_once":
                assert _recv_exact(s, len(HELLO)) == HELLO
            return s
        s = t.run(t.client, client)
        try:
            def acked():
                lines = _proxy_sockets_to(t.proxy, backend_ip)
                return lines and all(line.split()[1] == "0" for line in lines[::2])
            wait_until(acked, 5, f"the hello acknowledged: {_proxy_sockets_to(t.proxy, backend_ip)}")
            info = " ".join(_proxy_sockets_to(t.proxy, backend_ip))
            # acknowledged by the first answer: never retransmitted (ss shows retrans: if so)
            assert "unacked" not in info and "retrans:" not in info, info
            assert "bytes_acked:518" in info, info
            if answer == "later":
                s.sendall(b"later")
                assert _recv_exact(s, 5) == b"later"
        finally:
            s.close()
        proxy.wait_clean()


def test_a_finished_flows_backend_port_is_reused_while_it_lingers(loop_ns, tmp_path):
    """The kept backend socket goes when the flow ends, not after the linger: its local port
    is free at once. With two ephemeral ports and a 60 s linger, the third connection used to
    find both ports held (connect: EADDRNOTAVAIL); now each new connection gets a port back,
    its SYN drops the lingering entries of that port's old flow, and it is spliced as well."""
    t = loop_ns
    be = t.run(t.backend, EchoBackend, BACKEND_IP)
    proxy = Proxy(t, tmp_path, f"{BACKEND_IP}:{be.port}", tcp_splice={"linger_s": 60})
    rounds = 6

    def kept_sockets() -> str:
        return nsexec(t.proxy, "ss", "-Htn", "state", "established",
                      f"dst {BACKEND_IP}:{be.port}").stdout.strip()
    # After the listeners are bound (a port bound with bind() cannot be shared; connect()
    # shares a port between destinations). No HTTP to /status meanwhile: its TIME_WAITs
    # would use up the two ports (netlink, `ss`, is what the loop watches).
    ports = nsexec(t.proxy, "sysctl", "-n", "net.ipv4.ip_local_port_range").stdout.split()
    nsexec(t.proxy, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40001")
    try:
        for i in range(rounds):
            size = 64 * 1024 + i
            # from a port of its own: the client's TIME_WAITs must not use up the two ports
            got = t.run(t.client, upload_download, "127.0.0.1", proxy.port, size,
                        source=("127.0.0.1", 50000 + i))
            assert got == (len(HELLO) + size, stream_sha(HELLO, size)), i
            # the flow has ended and the proxy closed its backend socket
            wait_until(lambda: kept_sockets() == "", 15, f"flow {i}'s backend socket closed")
    finally:
        nsexec(t.proxy, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={ports[0]} {ports[1]}")
    assert [r[0] for r in be.wait(rounds)] == [len(HELLO) + 64 * 1024 + i for i in range(rounds)]
    spliced(proxy, rounds)
    assert proxy.metric("ebpf_tcp_splice_engaged_total") == rounds
    assert sum(proxy.ts()["fallbacks"].values()) == 0, proxy.ts()["fallbacks"]
    # the flows linger (60 s) without holding their ports
    assert proxy.ts()["lingering_flows"] == rounds
    assert proxy.stop() == 0
    assert t.tc_state() == ""
