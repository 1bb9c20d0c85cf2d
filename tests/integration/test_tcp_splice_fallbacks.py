"""The tcp_splice fallback reasons that need a staged condition (the simple ones are in
test_tcp_splice.py): each produced for real in the three-namespace topology, counted in
ebpf_tcp_splice_fallbacks_total{reason}, and the connection carried on by the next relay kind.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading

import pytest

from sniproxy.ebpf import tcpsplice as ts
from sniproxy.ebpf.objects import BPF_NOEXIST, Map
from tests.ebpf_required import require_ebpf
from tests.integration.harness import wait_until
from tests.integration.netns import Topology, nsexec, run_in, sh
from tests.integration.test_tcp_splice import (
    HELLO, MiB, EchoBackend, Proxy, _recv_exact, _tag, check_handover, handover,  # noqa: F401
    stream_sha,
    upload_download,
)

pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture
def three_ns():
    with Topology.three(_tag()) as t:
        yield t


def _fallbacks(proxy: Proxy, reason: str) -> float:
    return proxy.metric("ebpf_tcp_splice_fallbacks_total", reason=reason)


def _netstat(ns: str, name: str) -> int:
    """One TcpExt counter (e.g. ListenOverflows) of namespace `ns`, read from inside it."""
    lines = nsexec(ns, "cat", "/proc/net/netstat").stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        keys, vals = head.split(), values.split()
        if keys[0] == "TcpExt:" and name in keys:
            return int(vals[keys.index(name)])
    raise KeyError(name)


def test_socket_error_client_reset_while_the_backend_connect_is_pending(
        three_ns, tmp_path, handover):
    """The client resets its connection after its hello, while the proxy is still connecting
    to the backend: at the hand-over the client socket has no peer any more."""
    t = three_ns

    class SlowAcceptBackend:
        """listen(0) with one connection it does not accept yet: the accept queue is full,
        so the proxy's SYN is dropped (ListenOverflows) and retried a second later."""

        def __init__(self):
            self.sock = socket.socket()
            self.sock.bind((t.backend_ip, 0))
            self.sock.listen(0)
            self.port = self.sock.getsockname()[1]
            self.filler = socket.create_connection((t.backend_ip, self.port))

        def release(self):
            conn, _ = self.sock.accept()
            conn.close()
            self.served = threading.Thread(target=self._serve, daemon=True)
            self.served.start()

        def _serve(self):
            try:
                conn, _ = self.sock.accept()
                conn.settimeout(10)
                while conn.recv(65536):
                    pass
                conn.close()
            except OSError:
                pass

    be = t.run(t.backend, SlowAcceptBackend)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    overflows = _netstat(t.backend, "ListenOverflows")

    def client():
        s = socket.create_connection((t.proxy_client_ip, proxy.port), timeout=10)
        s.sendall(HELLO)
        # The proxy read the hello and its SYN to the backend was dropped: reset now.
        wait_until(lambda: _netstat(t.backend, "ListenOverflows") > overflows, 10,
                   "the proxy's SYN to the backend")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    t.run(t.client, client)
    t.run(t.backend, be.release)
    wait_until(lambda: _fallbacks(proxy, "socket_error") == 1, 15, "the socket_error fallback")
    check_handover(proxy, handover)
    wait_until(lambda: proxy.access(), 10, "the access line")
    assert "relay=tcp_splice" not in proxy.access()[0]
    assert "reading the socket state" in proxy.log()


def test_no_route_to_the_client_at_the_hand_over(three_ns, tmp_path, handover):
    """The route to the client disappears between accept and the hand-over (an operator's
    `ip route del`, a routing daemon): the connection stays on the next relay kind, which
    carries it losslessly once the route is back."""
    t = three_ns
    dev = t.links["proxy_c"][1]
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    size = 2 * MiB
    half = len(HELLO) // 2

    def client():
        import hashlib
        from tests.integration.harness import send_pattern
        s = socket.create_connection((t.proxy_client_ip, proxy.port), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO[:half])
        # The proxy accepted (the handshake is done); its route back goes now.
        nsexec(t.proxy, "ip", "route", "del", "10.71.1.0/24", "dev", dev)
        s.sendall(HELLO[half:])
        wait_until(lambda: _fallbacks(proxy, "no_route") == 1, 20, "the no_route fallback")
        check_handover(proxy, handover)
        nsexec(t.proxy, "ip", "route", "add", "10.71.1.0/24", "dev", dev, "src",
               t.proxy_client_ip)
        echo = _recv_exact(s, len(HELLO))
        sender = threading.Thread(target=send_pattern, args=(s, size))
        sender.start()
        back = _recv_exact(s, size)
        sender.join(60)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()
        return hashlib.sha256(echo + back).hexdigest()
    assert t.run(t.client, client) == stream_sha(HELLO, size)
    wait_until(lambda: proxy.access(), 10, "the access line")
    assert "relay=sockmap" in proxy.access()[0], proxy.access()
    assert "route lookup" in proxy.log()


def test_client_unacked_data_socks5_reply_with_backend_bytes(three_ns, tmp_path, handover):
    """A SOCKS5 server whose reply carries the backend's first bytes (a backend that speaks
    first): the proxy writes them to the client before the relay starts, and the client's
    delayed ACK has not come back at the hand-over."""
    t = three_ns
    banner = b"220 backend ready\r\n"
    got: dict = {}

    def socks_server():
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(30)

        def serve():
            try:
                conn, _ = listener.accept()
                conn.settimeout(30)
                conn.recv(257)                         # greeting
                conn.sendall(b"\x05\x00")
                conn.recv(262)                         # CONNECT
                # reply (BND 0.0.0.0:0) and the backend's banner in one segment
                conn.sendall(b"\x05\x00\x00\x01" + bytes(6) + banner)
                data = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    conn.sendall(chunk)
                got["up"] = data
                conn.shutdown(socket.SHUT_WR)
                conn.close()
            except OSError as exc:
                got["error"] = exc
            finally:
                listener.close()
        threading.Thread(target=serve, daemon=True).start()
        return listener.getsockname()[1]
    socks_port = run_in(t.proxy, socks_server)
    routes = [{"match": "data.test", "backend": "backend.invalid:443", "upstream": "corp"}]
    proxy = Proxy(t, tmp_path, None, routes=routes,
                  upstreams={"corp": {"type": "socks5", "addr": f"127.0.0.1:{socks_port}"}})

    def client():
        s = socket.create_connection((t.proxy_client_ip, proxy.port), timeout=30)
        # Delayed ACKs from the start (no quick-ACK phase): the banner's ACK waits >= 40 ms.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        s.sendall(HELLO)
        first = _recv_exact(s, len(banner))
        echo = _recv_exact(s, len(HELLO))
        s.sendall(b"after")
        tail = _recv_exact(s, 5)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()
        return first, echo, tail
    assert t.run(t.client, client) == (banner, HELLO, b"after")
    assert got.get("up") == HELLO + b"after", got
    assert _fallbacks(proxy, "client_unacked_data") == 1
    check_handover(proxy, handover)
    wait_until(lambda: proxy.access(), 10, "the access line")
    assert "relay=tcp_splice" not in proxy.access()[0], proxy.access()


def test_backend_port_of_a_dead_workers_ended_flow_is_reused_and_spliced(three_ns, tmp_path,
                                                                          handover):
    """Two flows on one 4-tuple: a flow ends (a RST from the backend) and lingers, its worker
    dies (its backend socket dies with it, after its FIN retries), and the next connection to
    that backend gets the same local port (the proxy's port range is one port wide). Its SYN
    drops the ended flow's lingering entries (they would freeze its ACK and splice its
    backend's packets), so it is spliced too, byte-exact. (It used to be refused as
    tuple_busy until the successor worker removed the old entries.)"""
    t = three_ns
    nsexec(t.proxy, "sysctl", "-qw", "net.ipv4.tcp_orphan_retries=1")
    reset = threading.Event()

    class ResettingBackend(EchoBackend):
        """The first connection: echo the hello, then reset it."""

        first = True

        def _serve(self, conn):
            if not ResettingBackend.first:
                return super()._serve(conn)
            ResettingBackend.first = False
            conn.sendall(_recv_exact(conn, len(HELLO)))
            reset.wait(30)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    be = t.run(t.backend, ResettingBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"linger_s": 60.0})
    first = t.run(t.client, socket.create_connection, (t.proxy_client_ip, proxy.port), 10)
    first.sendall(HELLO)
    assert _recv_exact(first, len(HELLO)) == HELLO
    wait_until(lambda: proxy.ts()["active_flows"] == 1, 10, "the first flow spliced")
    ss = nsexec(t.proxy, "ss", "-Htan", "dst", f"{t.backend_ip}:{be.port}").stdout.split()
    port = ss[3].rsplit(":", 1)[1]
    reset.set()
    wait_until(lambda: proxy.ts()["lingering_flows"] == 1, 10, "the first flow ended")
    pid = [w["pid"] for w in proxy.status()["workers"] if w["alive"]][0]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: any(w["alive"] and w["pid"] != pid for w in proxy.status()["workers"]),
               10, "a new worker")
    wait_until(lambda: not nsexec(t.proxy, "ss", "-Htan", "sport", f"= :{port}").stdout.strip(),
               20, "the dead worker's backend socket gone")
    # From now the proxy's only free local port is the old flow's (no HTTP polling meanwhile:
    # it would take it).
    ports = nsexec(t.proxy, "sysctl", "-n", "net.ipv4.ip_local_port_range").stdout.split()
    nsexec(t.proxy, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={port} {port}")
    try:
        got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 256 * 1024)
    finally:
        nsexec(t.proxy, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={ports[0]} {ports[1]}")
    assert got == (len(HELLO) + 256 * 1024, stream_sha(HELLO, 256 * 1024))
    assert _fallbacks(proxy, "tuple_busy") == 0
    check_handover(proxy, handover)
    assert proxy.metric("ebpf_tcp_splice_engaged_total") >= 1
    wait_until(lambda: sum("relay=tcp_splice" in line for line in proxy.access()) >= 1, 10,
               "the second connection's access line")
    assert "relay=tcp_splice" in proxy.access()[-1], proxy.access()
    first.close()


def test_tuple_busy_when_a_live_flow_holds_the_backend_tuple(three_ns, tmp_path, handover):
    """The backend tuple of a new connection is already in the flow map for a flow that has
    not ended (no proxy makes this today: a live flow's port stays held by its kept socket,
    and an ended flow's entries go at the reusing SYN; a leftover of a proxy of another
    version could). Staged with an entry written into the pinned map: the hand-over refuses
    the tuple (tuple_busy), takes nothing over, and once the entry is gone the connection
    completes on the next relay kind, byte-exact (its segments dropped meanwhile are
    retransmitted)."""
    t = three_ns
    bpffs = tmp_path / "bpffs"      # visible to the proxy under `ip netns exec` (see netns.py)
    bpffs.mkdir()
    sh("mount", "-t", "bpf", "bpf", str(bpffs))
    try:
        pin = str(bpffs / "tcp_splice")
        be = t.run(t.backend, EchoBackend, t.backend_ip)
        proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"pin_path": pin})
        assert sorted(os.listdir(pin)) == ["claims", "flows", "state"]
        route = nsexec(t.proxy, "ip", "-4", "route", "get", t.backend_ip).stdout.split()
        local_ip = route[route.index("src") + 1]
        port = 40123
        ports = nsexec(t.proxy, "sysctl", "-n", "net.ipv4.ip_local_port_range").stdout.split()
        flows = Map.from_pinned(os.path.join(pin, "flows"))
        key = ts.pack_key((t.backend_ip, be.port), (local_ip, port))
        # a live flow's backend direction, in the last (never claimed) slot, on hold
        stale = ts.DirEntry(key=key, src=(t.proxy_client_ip, proxy.port),
                            dst=(t.client_ip, 1), seq_delta=0, ack_delta=0, handover_end=0,
                            ifindex=1, ts_base=0, direction=ts.B2C, flags=ts.F_HOLD,
                            win_shift_in=0, win_shift_out=0)
        flows.update(key, stale.pack(proxy.ts()["max_flows"] - 1, 7), BPF_NOEXIST)
        nsexec(t.proxy, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={port} {port}")
        out = {}

        def client():
            out["got"] = upload_download(t.proxy_client_ip, proxy.port, 256 * 1024)
        worker = threading.Thread(target=run_in, args=(t.client, client), daemon=True)
        worker.start()
        try:
            # the log, not /status: HTTP would need ephemeral ports, and there is one
            wait_until(lambda: "still spliced" in proxy.log(), 15, "tuple_busy logged")
        finally:
            flows.delete(key)
            flows.close()
            nsexec(t.proxy, "sysctl", "-qw",
                   f"net.ipv4.ip_local_port_range={ports[0]} {ports[1]}")
        worker.join(60)
        assert out["got"] == (len(HELLO) + 256 * 1024, stream_sha(HELLO, 256 * 1024))
        assert _fallbacks(proxy, "tuple_busy") == 1
        check_handover(proxy, handover)
        wait_until(lambda: proxy.access(), 10, "access line")
        assert "relay=tcp_splice" not in proxy.access()[-1], proxy.access()
        proxy.wait_clean()
        assert proxy.stop() == 0
    finally:
        sh("umount", "-l", str(bpffs), check=False)


def test_mss_mismatch_when_the_route_to_the_backend_has_a_smaller_mtu(three_ns, tmp_path, handover):
    """The clamp follows the interfaces' MTUs; a route with its own, smaller MTU (`ip route
    ... mtu lock`) makes the backend path narrower than the client's segments: the flow is
    not spliced, the next relay kind carries it, byte-exact."""
    t = three_ns
    outer = t.links["proxy_b"][1]
    nsexec(t.proxy, "ip", "route", "replace", "10.71.2.0/24", "dev", outer, "proto", "kernel",
           "scope", "link", "src", "10.71.2.1", "mtu", "lock", "1300")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    assert proxy.ts()["clamp_mtu"] == 1500          # the veths (lo is larger)
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 4 * MiB)
    assert got == (len(HELLO) + 4 * MiB, stream_sha(HELLO, 4 * MiB))
    assert _fallbacks(proxy, "mss_mismatch") == 1
    check_handover(proxy, handover)
    wait_until(lambda: proxy.access(), 10, "access line")
    assert "relay=sockmap" in proxy.access()[0] and "outcome=ok" in proxy.access()[0]
