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
from tests.integration.netns import Topology, nsexec, proxy_prefix, run_in

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


@pytest.fixture(params=["compiled", "python"])
def handover(request, monkeypatch):
    """Which tcp_splice hand-over the proxy runs (SNI_PROXY_HANDOVER; compiled: the default
    when sniproxy.ebpf._handover is built)."""
    monkeypatch.setenv("SNI_PROXY_HANDOVER", request.param)
    return request.param


def check_handover(proxy: "Proxy", handover: str) -> None:
    detail = proxy.ts()
    assert detail["handover"] == handover, (detail, proxy.log())


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
                 upstreams=None, max_connections: int = 1000, listen: str | None = None,
                 **ebpf):
        self.t = t
        self.port, mport = 8443, 9100
        host = listen or (f"[{t.proxy_client_ip6}]" if v6 else t.proxy_client_ip)
        cfg = base_config(self.port, mport, workers=workers, default_backend=backend,
                          max_connections=max_connections,
                          ebpf={"enabled": True, "dns_cache": {"pin_path": None},
                                "tcp_splice": {"linger_s": 0.5, **(tcp_splice or {})}, **ebpf})
        cfg["listen_addr"] = f"{host}:{self.port}"
        cfg["metrics_addr"] = f"127.0.0.1:{mport}"
        cfg["timeouts"]["idle_s"] = idle_s
        if routes is not None:
            cfg["routes"] = routes
        if upstreams is not None:
            cfg["upstreams"] = upstreams
        d = tmp / f"proxy{_tag()}"
        d.mkdir()
        self.p = ProxyProcess(cfg, d, argv_prefix=proxy_prefix(t.proxy))
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


def connect(host: str, port: int, family=socket.AF_INET, source: tuple | None = None
            ) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(60)
    if source is not None:
        s.bind(source)
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
                    before_upload=None, source: tuple | None = None) -> tuple[int, str]:
    """Send HELLO + `up` pattern bytes while reading everything back; (bytes read, sha256)."""
    s = connect(host, port, family, source)
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
@pytest.mark.parametrize("socket_state,handover", [
    ("bpf_getsockopt", "compiled"), ("bpf_getsockopt", "python"), ("tcp_repair", "python")])
def test_loopback_echo_exact_counted_and_clean(loop_ns, tmp_path, socket_state, handover,
                                               monkeypatch):
    monkeypatch.setenv("SNI_PROXY_HANDOVER", handover)
    t = loop_ns
    be = t.run(t.backend, EchoBackend, "127.0.0.2")
    proxy = Proxy(t, tmp_path, f"127.0.0.2:{be.port}", tcp_splice={
        "bpf_socket_state": socket_state == "bpf_getsockopt"})
    assert proxy.status()["ebpf"]["tcp_splice"] == "active", proxy.log()
    assert proxy.ts()["interfaces"] == ["lo"]
    # how the hand-over reads the sockets: one BPF getsockopt each, or TCP_REPAIR
    assert proxy.ts()["socket_state"] == socket_state, (proxy.ts(), proxy.log())
    check_handover(proxy, handover)
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


# ============================================================================ three namespaces
@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path / "pki", ["data.test"])


def _enter(ns, cm):
    return run_in(ns, cm.__enter__)


def test_veth_tls_clients_curl_openssl_python(three_ns, tmp_path, pki):
    t = three_ns
    backend = tls_backend(pki, ["data.test"], "b1", host=t.backend_ip)
    port = _enter(t.backend, backend)
    try:
        proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{port}")
        st = proxy.ts()
        assert st["state"] == "active" and set(st["interfaces"]) >= {f"tc{t.tag}p", f"tb{t.tag}p"}
        url = f"https://data.test:{proxy.port}"
        resolve = f"data.test:{proxy.port}:{t.proxy_client_ip}"
        r = nsexec(t.client, "curl", "-sS", "--max-time", "20", "--cacert", str(pki.ca_path),
                   "--resolve", resolve, f"{url}/bytes/3000000", "-o", "/dev/null",
                   "-w", "%{http_code} %{size_download}")
        assert r.stdout == "200 3000000", r.stderr
        r = nsexec(t.client, "sh", "-c",
                   f"printf 'GET /whoami HTTP/1.1\\r\\nHost: data.test\\r\\nConnection: close"
                   f"\\r\\n\\r\\n' | timeout 20 openssl s_client -quiet -connect "
                   f"{t.proxy_client_ip}:{proxy.port} -servername data.test -CAfile "
                   f"{pki.ca_path} -verify_return_error 2>&1", check=False)
        assert '"sni": "data.test"' in r.stdout, r.stdout

        def python_ssl():
            ctx = ssl.create_default_context(cafile=str(pki.ca_path))
            with socket.create_connection((t.proxy_client_ip, proxy.port), timeout=20) as raw:
                with ctx.wrap_socket(raw, server_hostname="data.test") as s:
                    got = []
                    for n in (10, 2_000_000):     # two requests on one connection
                        s.sendall(f"GET /bytes/{n} HTTP/1.1\r\nHost: data.test\r\n\r\n".encode())
                        head = b""
                        while b"\r\n\r\n" not in head:
                            head += s.recv(1)
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        body = b""
                        while len(body) < length:
                            body += s.recv(length - len(body))
                        got.append(body)
                    return got
        bodies = run_in(t.client, python_ssl)
        assert [len(b) for b in bodies] == [10, 2_000_000]
        assert bodies[1] == (b"0123456789abcdef" * 125_000)
        spliced(proxy, 3)
        proxy.wait_clean()
        assert proxy.stop() == 0
        assert t.tc_state() == ""
    finally:
        run_in(t.backend, backend.__exit__, None, None, None)


def test_veth_one_gib_each_way_sha256(three_ns, tmp_path):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, GiB)
    expected = stream_sha(HELLO, GiB)
    assert got == (len(HELLO) + GiB, expected)
    assert be.wait(1)[0] == (len(HELLO) + GiB, expected, "eof")
    spliced(proxy)
    assert f"bytes_up={len(HELLO) + GiB} bytes_down={len(HELLO) + GiB}" in proxy.access()[0]
    proxy.wait_clean()


class ScriptedBackend:
    """Runs script(conn, result) on the first connection, in the namespace it was built in."""

    def __init__(self, host: str, script):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.result: dict = {}
        self.done = threading.Event()

        def serve():
            conn, _ = self.sock.accept()
            conn.settimeout(60)
            try:
                script(conn, self.result)
            except OSError as exc:
                self.result["error"] = exc
            finally:
                conn.close()
                self.done.set()
        threading.Thread(target=serve, daemon=True).start()

    def wait(self, timeout: float = 60) -> dict:
        assert self.done.wait(timeout), "backend script did not finish"
        return self.result


def _recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n}")
        data += chunk
    return data


def test_half_close_backend_first_client_keeps_sending(three_ns, tmp_path):
    t = three_ns

    def script(conn, r):
        r["hello"] = _recv_exact(conn, len(HELLO))
        conn.sendall(pattern_bytes(2 * MiB))
        conn.shutdown(socket.SHUT_WR)
        r["up"] = read_to_eof(conn)

    be = t.run(t.backend, ScriptedBackend, t.backend_ip, script)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")

    def client():
        with connect(t.proxy_client_ip, proxy.port) as s:
            s.sendall(HELLO)
            down = read_to_eof(s)             # the backend's half-close arrives as EOF
            send_pattern(s, 4 * MiB)          # and the other direction still flows
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
def test_rst_either_way_reaches_the_other_end(three_ns, tmp_path, who):
    t = three_ns
    linger0 = struct.pack("ii", 1, 0)

    def script(conn, r):
        _recv_exact(conn, len(HELLO))
        conn.sendall(b"ready")
        if who == "backend":
            _recv_exact(conn, 1 * MiB)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            return                                  # close() with linger 0: RST
        try:
            while conn.recv(1 << 16):
                pass
            r["eof"] = True
        except ConnectionResetError:
            r["reset"] = True

    be = t.run(t.backend, ScriptedBackend, t.backend_ip, script)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")

    def client():
        s = connect(t.proxy_client_ip, proxy.port)
        s.sendall(HELLO)
        assert _recv_exact(s, 5) == b"ready"
        send_pattern(s, 1 * MiB)
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
    if who == "client":
        assert r.get("reset"), r
    else:
        assert seen == "reset"
    wait_until(lambda: any("outcome=reset" in line for line in proxy.access()), 10,
               "the reset in the access log")
    assert "relay=tcp_splice" in proxy.access()[0]
    proxy.wait_clean()


def test_idle_timeout_removes_the_flow_and_the_next_packet_is_reset(three_ns, tmp_path):
    t = three_ns

    def script(conn, r):
        _recv_exact(conn, len(HELLO))
        conn.sendall(b"ready")
        try:
            r["got"] = conn.recv(1 << 16)
        except OSError as exc:
            r["error"] = exc

    be = t.run(t.backend, ScriptedBackend, t.backend_ip, script)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", idle_s=1)

    def client():
        s = connect(t.proxy_client_ip, proxy.port)
        s.sendall(HELLO)
        assert _recv_exact(s, 5) == b"ready"
        wait_until(lambda: any("outcome=idle_timeout" in line for line in proxy.access()),
                   10, "the idle timeout")
        try:
            s.sendall(b"late")        # meets the proxy's stack: no socket, RST
            s.settimeout(10)
            return s.recv(1)
        except ConnectionResetError:
            return "reset"
        finally:
            s.close()
    assert t.run(t.client, client) == "reset"
    proxy.wait_clean()


def test_many_concurrent_spliced_connections(three_ns, tmp_path):
    t = three_ns
    n_conns, size = 1000, 64 * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", workers=2, max_connections=4000)
    payload = pattern_bytes(size)
    expected = stream_sha(HELLO, size)

    def clients():
        import asyncio

        async def one():
            r, w = await asyncio.open_connection(t.proxy_client_ip, proxy.port)
            w.write(HELLO)
            await r.readexactly(len(HELLO))
            w.write(payload)
            w.write_eof()
            rest = await r.read()
            w.close()
            return hashlib.sha256(HELLO + rest).hexdigest() == expected

        async def main():
            opened = []
            # All open at once: each waits for its hello's echo before the next phase.
            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n_conns))), 120)
        return asyncio.run(main())
    oks = t.run(t.client, clients)
    assert sum(oks) == n_conns
    wait_until(lambda: len(proxy.access()) >= n_conns, 30, "every access line")
    kinds = {}
    for line in proxy.access():
        kind = line.split("relay=")[1].split()[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds.get("tcp_splice", 0) == n_conns, kinds
    proxy.wait_clean()
    assert proxy.metric("ebpf_map_utilization", map="tcp_splice") == 0


def _lossy_object(tmp_path) -> str:
    from pathlib import Path
    out = tmp_path / "lossy_link.bpf.o"
    bpf_dir = Path(__file__).resolve().parents[2] / "src/sniproxy/ebpf/bpf"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{bpf_dir}", "-c",
                    str(Path(__file__).with_name("lossy_link.bpf.c")), "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return str(out)


def _tcp_counters(ns: str) -> dict[str, int]:
    """Tcp: and TcpExt: counters of namespace `ns` (/proc/net/snmp and netstat)."""
    out = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = nsexec(ns, "cat", path).stdout.splitlines()
        for head, values in zip(lines[::2], lines[1::2]):
            keys, vals = head.split(), values.split()
            if keys[0] in ("Tcp:", "TcpExt:"):
                out.update((k, int(v)) for k, v in zip(keys[1:], vals[1:]))
    return out


@pytest.mark.parametrize("where", ["sender_egress", "receiver_ingress"])
def test_loss_and_duplicates_stay_exact(three_ns, tmp_path, where):
    """1% loss and 2% duplicated packets on both far ends (a tc program: this kernel has no
    sch_netem; delay and reordering: test_tcp_splice_impair.py): TCP recovers end to end.
    At the senders' egress a drop is local (TCP resends it as it would after a full qdisc);
    at the receivers' ingress the packet crossed the splice and is lost just before its
    receiver, who asks for it again with duplicate ACKs and SACK blocks that cross the splice
    the other way (translated): the senders recover by SACK, not only by timeouts."""
    t = three_ns
    obj = _lossy_object(tmp_path)
    hook, sec = (("egress", "tc") if where == "sender_egress" else ("ingress", "tc"))
    prog = "lossy_link" if where == "sender_egress" else "lossy_link_ingress"
    for side in ("c", "b"):
        ns, dev = t.links[side]
        # One segment per packet: with 64 KiB GSO packets 16 MiB is ~256 packets a way, and
        # 1 % of them is sometimes none at all (no loss to recover from)
        nsexec(ns, "ip", "link", "set", "dev", dev, "gso_max_segs", "1")
        nsexec(ns, "tc", "qdisc", "add", "dev", dev, "clsact")
        nsexec(ns, "tc", "filter", "add", "dev", dev, hook, "bpf", "da", "obj", obj,
               "sec", sec, "program", prog)
    before = {ns: _tcp_counters(ns) for ns in (t.client, t.backend)}
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 16 * MiB)
    assert got == (len(HELLO) + 16 * MiB, stream_sha(HELLO, 16 * MiB))
    spliced(proxy)
    proxy.wait_clean()
    if where == "sender_egress":
        return      # a local drop is sent again as a new transmission: nothing to count
    for ns in (t.client, t.backend):      # both ends sent 16 MiB and lost some of it
        after = _tcp_counters(ns)
        assert after["RetransSegs"] > before[ns]["RetransSegs"], ns
        assert after.get("TCPSackRecovery", 0) > before[ns].get("TCPSackRecovery", 0), (
            ns, "no SACK recovery: the SACK blocks did not make it across the splice")


def test_timestamps_off_on_the_client_side(three_ns, tmp_path):
    t = three_ns
    nsexec(t.client, "sysctl", "-qw", "net.ipv4.tcp_timestamps=0")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 16 * MiB)
    assert got == (len(HELLO) + 16 * MiB, stream_sha(HELLO, 16 * MiB))
    spliced(proxy)


def test_ipv6_veth(three_ns, tmp_path):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip6)
    proxy = Proxy(t, tmp_path, f"[{t.backend_ip6}]:{be.port}", v6=True)
    got = t.run(t.client, upload_download, t.proxy_client_ip6, proxy.port, 16 * MiB,
                socket.AF_INET6)
    assert got == (len(HELLO) + 16 * MiB, stream_sha(HELLO, 16 * MiB))
    spliced(proxy)
    proxy.wait_clean()


def test_proxy_protocol_v2_route_is_spliced(three_ns, tmp_path):
    t = three_ns
    be = t.run(t.backend, RawBackend, reply_bytes=3 * MiB, read_proxy_header=True,
               host=t.backend_ip)
    routes = [{"match": "data.test", "backend": f"{t.backend_ip}:{be.port}",
               "proxy_protocol": "v2", "allow_private": True}]
    proxy = Proxy(t, tmp_path, None, routes=routes)

    def client():
        with connect(t.proxy_client_ip, proxy.port) as s:
            s.sendall(HELLO)
            send_pattern(s, 8 * MiB)
            s.shutdown(socket.SHUT_WR)
            return read_to_eof(s)
    # The backend answers only at EOF, and the client sends at once: its window fills before
    # the hand-over, and only the backend's (spliced) ACKs can reopen it.
    assert t.run(t.client, client) == (3 * MiB, pattern_sha256(3 * MiB))
    sess = be.wait_sessions(1)[0]
    assert sess.proxy_header.startswith(b"\r\n\r\n\x00\r\nQUIT\n")
    assert (sess.nbytes, sess.sha256) == (len(HELLO) + 8 * MiB, stream_sha(HELLO, 8 * MiB))
    spliced(proxy)
    proxy.wait_clean()


def test_socks5_route_is_spliced(three_ns, tmp_path):
    """pproxy (SOCKS5) runs on the proxy host's lo: the backend connection is to 127.0.0.1,
    so spliced packets cross from a veth to lo and back (lo's 64 KiB MTU: the MSS clamp
    makes both sides' segments fit the veth, see test_different_mtus_are_clamped_and_spliced)."""
    from tests.integration.socks_servers import start_pproxy
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    socks = start_pproxy(log_dir=tmp_path)
    server = run_in(t.proxy, socks.__enter__)
    try:
        routes = [{"match": "data.test", "backend": f"{t.backend_ip}:{be.port}",
                   "upstream": "corp", "allow_private": True}]
        proxy = Proxy(t, tmp_path, None, routes=routes,
                      upstreams={"corp": {"type": "socks5", "addr": server.addr}})
        size = 8 * MiB

        def client():
            # pproxy ends both directions at the first EOF: read the whole echo first.
            with connect(t.proxy_client_ip, proxy.port) as s:
                s.sendall(HELLO)
                sender = threading.Thread(target=send_pattern, args=(s, size))
                sender.start()
                back = _recv_exact(s, len(HELLO) + size)
                sender.join(60)
                return hashlib.sha256(back).hexdigest()
        assert t.run(t.client, client) == stream_sha(HELLO, size)
        spliced(proxy)
        proxy.wait_clean()
    finally:
        run_in(t.proxy, socks.__exit__, None, None, None)


def test_sigkill_mid_transfer_flows_continue_and_restart_cleans_up(three_ns, tmp_path):
    """Killed proxy: the tc filters (and the maps they hold) outlive it, so a spliced flow
    finishes byte-exact; the next start replaces the leftover filters; stop removes all."""
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    size = 64 * MiB

    def killer():
        wait_until(lambda: proxy.ts()["active_flows"] == 1, 10, "the flow spliced")
        os.killpg(proxy.p.proc.pid, signal.SIGKILL)
        proxy.p.proc.wait(10)

    def slow_upload():
        # Upload in pieces so the kill lands mid-transfer.
        run_in(t.proxy, killer)

    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, size,
                before_upload=slow_upload)
    assert got == (len(HELLO) + size, stream_sha(HELLO, size))
    assert "sni_proxy_tsi" in t.tc_state(), "the filters should outlive the killed proxy"
    again = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    assert "replaced" in again.log()
    state = t.tc_state()
    assert state.count("name sni_proxy_tsi") == len(again.ts()["interfaces"]), state
    got = t.run(t.client, upload_download, t.proxy_client_ip, again.port, MiB)
    assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
    again.wait_clean()
    assert again.stop() == 0
    assert t.tc_state() == ""


def test_sigkill_of_a_worker_its_flows_finish_and_its_successor_removes_them(three_ns, tmp_path):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    size = 32 * MiB

    def kill_worker():
        def in_proxy_ns():
            wait_until(lambda: proxy.ts()["active_flows"] == 1, 10, "the flow spliced")
            pid = [w["pid"] for w in proxy.status()["workers"] if w["alive"]][0]
            os.kill(pid, signal.SIGKILL)
        run_in(t.proxy, in_proxy_ns)

    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, size,
                before_upload=kill_worker)
    assert got == (len(HELLO) + size, stream_sha(HELLO, size))
    wait_until(lambda: "watching flow slot" in proxy.log(), 10, "the orphan adopted")
    proxy.wait_clean()
    assert proxy.metric("ebpf_tcp_splice_engaged_total") == 1
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, MiB)
    assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))


def _fallback(proxy: Proxy, reason: str) -> float:
    return proxy.metric("ebpf_tcp_splice_fallbacks_total", reason=reason)


def test_fallback_map_full_takes_sockmap_losslessly(three_ns, tmp_path, handover):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"max_flows": 1})

    def two():
        first = connect(t.proxy_client_ip, proxy.port)
        first.sendall(HELLO)
        assert _recv_exact(first, len(HELLO)) == HELLO      # spliced, held open
        got = upload_download(t.proxy_client_ip, proxy.port, 4 * MiB)
        first.shutdown(socket.SHUT_WR)
        assert read_to_eof(first) == (0, hashlib.sha256().hexdigest())
        first.close()
        return got
    assert t.run(t.client, two) == (len(HELLO) + 4 * MiB, stream_sha(HELLO, 4 * MiB))
    wait_until(lambda: len(proxy.access()) == 2, 10, "two access lines")
    kinds = sorted(line.split("relay=")[1].split()[0] for line in proxy.access())
    assert kinds == ["sockmap", "tcp_splice"], kinds
    assert _fallback(proxy, "map_full") == 1
    check_handover(proxy, handover)
    proxy.wait_clean()


@pytest.mark.parametrize("mtu_client,mtu_backend", [(1400, 1500), (1500, 1400)])
def test_different_mtus_are_clamped_and_spliced(tmp_path, mtu_client, mtu_backend):
    """A spliced segment keeps its size: the proxy advertises the smallest MTU's MSS on the
    listener and the backend socket (TCP_MAXSEG), so both ends send segments that fit."""
    with Topology.three(_tag(), mtu_client=mtu_client, mtu_backend=mtu_backend) as t:
        be = t.run(t.backend, EchoBackend, t.backend_ip)
        proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
        got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 8 * MiB)
        assert got == (len(HELLO) + 8 * MiB, stream_sha(HELLO, 8 * MiB))
        assert _fallback(proxy, "mss_mismatch") == 0, proxy.log()
        spliced(proxy)
        assert proxy.ts()["clamp_mtu"] == min(mtu_client, mtu_backend)

        def client_mss():
            # The client's MSS is the smaller of its own and the one the proxy advertised.
            with connect(t.proxy_client_ip, proxy.port) as s:
                s.sendall(HELLO)
                assert _recv_exact(s, len(HELLO)) == HELLO
                return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        # (minus 12 bytes of timestamp option in every segment)
        assert t.run(t.client, client_mss) == min(mtu_client, mtu_backend) - 40 - 12
        spliced(proxy, 2)
        proxy.wait_clean()


def test_fallback_interface_not_attached(three_ns, tmp_path, handover):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}",
                  tcp_splice={"interfaces": ["lo", t.links["proxy_c"][1]]})
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, MiB)
    assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
    assert _fallback(proxy, "interface_not_attached") == 1
    check_handover(proxy, handover)
    assert "add it to ebpf.tcp_splice.interfaces" in proxy.log()


def test_fallback_client_fin_before_the_hand_over(three_ns, tmp_path, handover):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")

    def client():
        with connect(t.proxy_client_ip, proxy.port) as s:
            # Corked, the FIN rides on the segment that completes the hello: the proxy
            # cannot see the hello before the FIN, whatever the scheduling.
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            s.sendall(HELLO + b"tail")
            s.shutdown(socket.SHUT_WR)
            return read_to_eof(s)
    assert t.run(t.client, client) == (len(HELLO) + 4, hashlib.sha256(HELLO + b"tail").hexdigest())
    assert _fallback(proxy, "not_established") == 1
    check_handover(proxy, handover)


def test_fallback_family_mismatch(three_ns, tmp_path, handover):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", v6=True)
    got = t.run(t.client, upload_download, t.proxy_client_ip6, proxy.port, MiB, socket.AF_INET6)
    assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
    assert _fallback(proxy, "family_mismatch") == 1
    check_handover(proxy, handover)


@pytest.mark.parametrize("caps,missing", [("-net_admin", "CAP_NET_ADMIN"),
                                           ("-perfmon,-sys_admin", "CAP_PERFMON")])
def test_without_a_capability_tcp_splice_is_disabled_with_the_fix(three_ns, tmp_path, caps,
                                                                   missing):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    cfg = base_config(8443, 9100, default_backend=f"{t.backend_ip}:{be.port}",
                      ebpf={"enabled": True, "dns_cache": {"pin_path": None}})
    cfg["listen_addr"] = f"{t.proxy_client_ip}:8443"
    p = ProxyProcess(cfg, tmp_path, argv_prefix=[
        *proxy_prefix(t.proxy), "setpriv", f"--inh-caps={caps}",
        f"--ambient-caps={caps}", f"--bounding-set={caps}"])
    run_in(t.proxy, p.start)
    try:
        e = run_in(t.proxy, p.status)["ebpf"]
        assert e["tcp_splice"] == "disabled"
        assert missing in e["reasons"]["tcp_splice"], e["reasons"]
        got = t.run(t.client, upload_download, t.proxy_client_ip, 8443, MiB)
        assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
        assert t.tc_state() == ""
    finally:
        p.stop()


def test_worker_fds_and_map_entries_back_to_baseline(three_ns, tmp_path):
    t = three_ns
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    pid = [w["pid"] for w in proxy.status()["workers"] if w["alive"]][0]
    t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, 1000)
    proxy.wait_clean()

    def fds():
        # not counting prometheus_client's multiprocess files (opened lazily, once each)
        out = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if "sni-proxy-metrics" not in target:
                out[fd] = target
        return out
    before = fds()
    base = len(before)

    def held_open():
        socks = []
        for _ in range(20):
            s = connect(t.proxy_client_ip, proxy.port)
            s.sendall(HELLO)
            assert _recv_exact(s, len(HELLO)) == HELLO
            socks.append(s)
        return socks
    socks = t.run(t.client, held_open)
    wait_until(lambda: proxy.ts()["active_flows"] == 20, 10, "20 flows")
    # One fd per spliced connection: the backend socket (the client socket is closed).
    assert len(fds()) == base + 20
    for s in socks:
        s.shutdown(socket.SHUT_WR)
        assert read_to_eof(s) == (0, hashlib.sha256().hexdigest())
        s.close()
    proxy.wait_clean()
    after = fds()
    assert len(after) == base, {k: v for k, v in after.items() if before.get(k) != v}
    assert proxy.metric("ebpf_map_utilization", map="tcp_splice") == 0


def test_backend_that_speaks_first_is_exact_whichever_way_the_race_goes(three_ns, tmp_path):
    """A backend that sends a banner as soon as it accepts: the banner lands before the
    hand-over (fallback backend_data_queued, next relay kind), during it (undone, same
    fallback) or after it (spliced). Every way, the client gets every byte once."""
    t = three_ns
    be = t.run(t.backend, RawBackend, reply_bytes=256 * 1024, send_first=True,
               host=t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")

    def client():
        with connect(t.proxy_client_ip, proxy.port) as s:
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
    kinds = [line.split("relay=")[1].split()[0] for line in proxy.access()]
    assert kinds.count("tcp_splice") + _fallback(proxy, "backend_data_queued") == 5, kinds


def test_default_interfaces_follow_the_listen_address_and_the_backend_routes(three_ns, tmp_path):
    """An interface neither the listen address nor a backend route uses gets no tc program;
    a wildcard listen address takes every interface that is up."""
    t = three_ns
    extra = f"te{t.tag}a"
    nsexec(t.proxy, "ip", "link", "add", extra, "type", "veth", "peer", "name", f"te{t.tag}b")
    nsexec(t.proxy, "ip", "link", "set", extra, "up")
    nsexec(t.proxy, "ip", "link", "set", f"te{t.tag}b", "up")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
    assert set(proxy.ts()["interfaces"]) == {"lo", f"tc{t.tag}p", f"tb{t.tag}p"}
    assert "listen addresses' interfaces" in proxy.log()
    got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, MiB)
    assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
    spliced(proxy)
    assert proxy.stop() == 0
    assert t.tc_state() == ""
    wild = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", listen="0.0.0.0")
    assert extra in wild.ts()["interfaces"]
    assert wild.stop() == 0


def test_client_port_reused_while_the_old_flow_lingers(three_ns, tmp_path):
    """A client reconnects from the same port (TIME_WAIT reuse) while its finished flow's
    entries linger: the SYN clears them (BPF), the new connection is spliced on the same
    4-tuple, and the old flow's late removal leaves the new flow's entries alone."""
    t = three_ns
    nsexec(t.client, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"linger_s": 3.0})

    def first():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((t.client_ip, 0))
        s.connect((t.proxy_client_ip, proxy.port))
        port = s.getsockname()[1]
        s.sendall(HELLO)
        assert _recv_exact(s, len(HELLO)) == HELLO
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()                        # TIME_WAIT on this side
        return port
    port = t.run(t.client, first)
    wait_until(lambda: proxy.ts()["lingering_flows"] == 1, 10, "the first flow lingering")

    def second():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((t.client_ip, port))
        # TIME_WAIT reuse needs a timestamp at least a second newer than the old one's
        wait_until(lambda: s.connect_ex((t.proxy_client_ip, proxy.port)) == 0, 5,
                   "the port reused", interval=0.2)
        s.settimeout(30)
        s.sendall(HELLO)
        assert _recv_exact(s, len(HELLO)) == HELLO
        return s
    s = t.run(t.client, second)
    try:
        wait_until(lambda: proxy.ts()["active_flows"] == 1 and proxy.ts()["lingering_flows"] == 0,
                   15, "the old flow removed, the new one live")

        def rest():
            send_pattern(s, MiB)
            s.shutdown(socket.SHUT_WR)
            return read_to_eof(s)
        assert t.run(t.client, rest) == (MiB, stream_sha(b"", MiB))
    finally:
        s.close()
    spliced(proxy, 2)
    proxy.wait_clean()
