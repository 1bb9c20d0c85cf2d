"""Issue 15's "held in the same testing" list, against a live proxy (subprocess, real sockets):
3,000 mutated hellos, 30 SIGHUPs under load with 0 errors, 22 open-relay targets refused,
metrics on 127.0.0.1 with no per-SNI label, fd exhaustion at accept() that recovers, a
blackholed backend that holds nobody else up. (Slowloris, silent clients, slow readers and
large transfers through pauses: test_proxy.py, test_sockmap.py, test_tcp_splice*.py.)
"""
from __future__ import annotations

import concurrent.futures
import os
import random
import re
import resource
import signal
import socket
import threading
import time

import pytest

from tests.integration.harness import (ProxyProcess, RawBackend, base_config, client_hello_bytes,
                                       free_ports, pattern_sha256, send_pattern, wait_until)
from tests.integration.socks_servers import blackhole, start_dns_server


@pytest.fixture
def proxy_factory(tmp_path):
    started: list[ProxyProcess] = []

    def start(**over) -> ProxyProcess:
        cfg = base_config(*free_ports(2), **over)
        d = tmp_path / f"proxy{len(started)}"
        d.mkdir()
        p = ProxyProcess(cfg, d)
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


def port_of(p: ProxyProcess) -> int:
    return int(p.config["listen_addr"].rsplit(":", 1)[1])


def worker_pids(p: ProxyProcess) -> list[int]:
    return [w["pid"] for w in p.status()["workers"]]


def read_all(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return out


def access(p: ProxyProcess) -> list[dict]:
    return [dict(re.findall(r"(\w+)=(\S+)", line.split("sniproxy.access:", 1)[1]))
            for line in p.log().splitlines() if "sniproxy.access" in line]


# ------------------------------------------------------------------ 3,000 mutated hellos
def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out))
        op = rng.choice(("flip", "insert", "delete", "truncate"))
        if op == "flip":
            out[pos] ^= rng.randint(1, 255)
        elif op == "insert":
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete" and len(out) > 1:
            del out[pos:pos + rng.randint(1, 8)]
        elif op == "truncate":
            del out[max(1, pos):]
    return bytes(out)


def test_3000_mutated_hellos_leave_the_proxy_serving(proxy_factory):
    backend = RawBackend()
    p = proxy_factory(workers=2, routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      timeouts={"client_hello_s": 3, "connect_s": 2, "idle_s": 5})
    pids = worker_pids(p)
    seeds = [client_hello_bytes("a.test"), client_hello_bytes("a.test", ["h2", "http/1.1"])]
    rng = random.Random(15)
    hellos = [mutate(rng, seeds[i % 2]) for i in range(3000)]

    def one(hello: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port_of(p)), timeout=10) as s:
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            read_all(s)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(one, hellos))
    wait_until(lambda: p.metric("sniproxy_connections_total") == 3000, 20,
               "every mutated hello counted with an outcome")
    assert worker_pids(p) == pids and all(w["restarts"] == 0 for w in p.status()["workers"])
    assert "Traceback" not in p.log()
    outcomes = {a["outcome"] for a in access(p)}
    assert outcomes <= {"bad_hello", "no_route", "client_closed", "ok", "connect_failed",
                        "reset", "hello_timeout"}, outcomes
    with socket.create_connection(("127.0.0.1", port_of(p)), timeout=10) as s:   # still serving
        s.sendall(seeds[0])
        s.shutdown(socket.SHUT_WR)
        read_all(s)
    assert backend.wait_sessions(1)[-1].received.startswith(seeds[0][:5])
    backend.close()


# ------------------------------------------------------------------ 30 SIGHUPs under load
def test_30_sighups_under_load_with_zero_errors(proxy_factory):
    reply = 200_000
    backend = RawBackend(reply_bytes=reply)
    p = proxy_factory(workers=2, routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}])
    pids = worker_pids(p)
    hello = client_hello_bytes("a.test")
    stop = threading.Event()
    results: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port_of(p)), timeout=20) as s:
                    s.sendall(hello)
                    send_pattern(s, 100_000)
                    s.shutdown(socket.SHUT_WR)
                    got = read_all(s)
                import hashlib
                ok = len(got) == reply and hashlib.sha256(got).hexdigest() == pattern_sha256(reply)
                results.append("ok" if ok else f"short {len(got)}")
            except OSError as exc:
                results.append(f"error {exc!r}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 31):
            p.signal(signal.SIGHUP)
            wait_until(lambda: p.metric("sniproxy_config_reloads_total", result="applied") >= i,
                       10, f"reload {i} applied")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    bad = [r for r in results if r != "ok"]
    assert not bad and len(results) >= 30, (len(results), bad[:5])
    assert worker_pids(p) == pids
    wait_until(lambda: p.metric("sniproxy_connections_total", outcome="ok") == len(results), 10,
               "every connection counted ok")
    assert p.metric("sniproxy_connections_total") == len(results)
    backend.close()


# ------------------------------------------------------------------ 22 open-relay targets
# SNI names a `$sni` route would take anywhere: loopback, private, link-local (cloud metadata),
# CGNAT, benchmark, multicast, broadcast, unspecified, ULA, IPv4-mapped, by name and literal.
RESOLVED = {
    "loop.test": ("A", "127.0.0.1"), "loop2.test": ("A", "127.9.9.9"),
    "ten.test": ("A", "10.1.2.3"), "oneseventwo.test": ("A", "172.16.5.4"),
    "oneninetwo.test": ("A", "192.168.1.1"), "meta.test": ("A", "169.254.169.254"),
    "cgnat.test": ("A", "100.64.0.1"), "bench.test": ("A", "198.18.0.1"),
    "zero.test": ("A", "0.0.0.0"), "mcast.test": ("A", "224.0.0.1"),
    "bcast.test": ("A", "255.255.255.255"), "v6loop.test": ("AAAA", "::1"),
    "v6ula.test": ("AAAA", "fd00::1"), "v6link.test": ("AAAA", "fe80::1"),
    "v6mapped.test": ("AAAA", "::ffff:7f00:1"), "v6unspec.test": ("AAAA", "::"),
}
LITERALS = ["localhost", "sub.localhost", "127.0.0.1", "10.0.0.1", "169.254.169.254", "0.0.0.0"]


def test_22_open_relay_targets_are_refused(proxy_factory):
    assert len(RESOLVED) + len(LITERALS) == 22
    records = {name: [(kind, addr, 300)] for name, (kind, addr) in RESOLVED.items()}
    listener = socket.create_server(("127.0.0.1", 0))       # would see any connection made
    listener.setblocking(False)
    port = listener.getsockname()[1]
    with start_dns_server(records) as dns:
        p = proxy_factory(routes=[{"match": "*.test", "backend": f"$sni:{port}"},
                                  {"match": "~.*", "backend": f"$sni:{port}"}],
                          dns={"nameservers": [f"127.0.0.1:{dns.port}"]})
        for name in [*RESOLVED, *LITERALS]:
            with socket.create_connection(("127.0.0.1", port_of(p)), timeout=10) as s:
                s.sendall(client_hello_bytes(name))
                read_all(s)
        wait_until(lambda: len(access(p)) == 22, 10, "22 access lines")
    lines = access(p)
    # IP-literal SNIs are not host names (RFC 6066): no SNI, so no route here. sub.localhost
    # is asked of DNS on the direct path (NXDOMAIN here); the listener below is the proof that
    # no connection reached 127.0.0.1.
    assert {a["outcome"] for a in lines if a["sni"] != "sub.localhost"} <= \
        {"forbidden", "bad_hello", "no_route"}, [a for a in lines if a["outcome"] != "forbidden"]
    forbidden = [a for a in lines if a["outcome"] == "forbidden"]
    assert len(forbidden) == len(RESOLVED) + 1, lines       # every name, localhost included
    with pytest.raises(BlockingIOError):
        listener.accept()                                   # nothing reached 127.0.0.1
    listener.close()
    assert "allow_private" in p.log()


# ------------------------------------------------------------------ metrics exposure
def test_metrics_default_to_loopback_and_carry_no_per_sni_label(proxy_factory):
    from sniproxy.config import parse_config
    default = parse_config({"listen_addr": "0.0.0.0:8443", "default_backend": "10.0.0.5:443"})
    assert (default.metrics.host, default.metrics.port) == ("127.0.0.1", 9090)
    backend = RawBackend()
    p = proxy_factory(routes=[{"match": "*.example.test", "backend": f"127.0.0.1:{backend.port}"}])
    names = [f"tenant-{i}.example.test" for i in range(40)] + ["unrouted-zz.other.test"]
    for name in names:
        with socket.create_connection(("127.0.0.1", port_of(p)), timeout=10) as s:
            s.sendall(client_hello_bytes(name))
            s.shutdown(socket.SHUT_WR)
            read_all(s)
    wait_until(lambda: p.metric("sniproxy_connections_total") == len(names), 10, "counted")
    body = p.metrics()
    leaked = [n for n in names if n in body or n.split(".")[0] in body]
    assert not leaked, leaked                 # labels are route names, never the client's SNI
    assert 'route="*.example.test"' in body
    backend.close()


# ------------------------------------------------------------------ fd exhaustion recovers
def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(i for i in range(len(used) + 1) if i not in used)


def test_fd_exhaustion_at_accept_is_counted_and_recovers(proxy_factory):
    backend = RawBackend()
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      timeouts={"client_hello_s": 5, "connect_s": 5, "idle_s": 60})
    worker = worker_pids(p)[0]
    hello = client_hello_bytes("a.test")
    soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (_lowest_free_fd(worker), hard))
    waiting = socket.create_connection(("127.0.0.1", port_of(p)), timeout=20)
    waiting.sendall(hello)
    # the label SniProxyOutOfFileDescriptors selects on
    wait_until(lambda: p.metric("sniproxy_accept_errors_total", errno="EMFILE") >= 1, 10,
               f"accept() EMFILE counted\n{p.log()[-2000:]}")
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))   # the operator raises it
    waiting.shutdown(socket.SHUT_WR)
    read_all(waiting)                       # the client that waited in the backlog is served
    waiting.close()
    assert backend.wait_sessions(1, timeout=20)[0].received.startswith(hello)
    assert worker_pids(p) == [worker]
    backend.close()


# ------------------------------------------------------------------ blackholed backends
def test_blackholed_backend_times_out_at_connect_s_and_holds_nobody_else(proxy_factory):
    backend = RawBackend()
    with blackhole("127.0.0.1") as dead:
        p = proxy_factory(routes=[{"match": "hole.test", "backend": f"127.0.0.1:{dead}"},
                                  {"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                          timeouts={"client_hello_s": 5, "connect_s": 1.5, "idle_s": 60})
        held = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port_of(p)), timeout=10)
            s.sendall(client_hello_bytes("hole.test"))
            held.append(s)
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port_of(p)), timeout=10) as s:
            s.sendall(client_hello_bytes("a.test"))
            s.shutdown(socket.SHUT_WR)
            read_all(s)
        backend.wait_sessions(1, timeout=10)
        assert time.monotonic() - t0 < 1.5          # served while 20 connects hang
        for s in held:
            read_all(s)
            s.close()
        wait_until(lambda: p.metric("sniproxy_upstream_connect_failures_total", kind="timeout") == 20,
                   10, "20 connect timeouts")
        wait_until(lambda: p.metric("sniproxy_connections_total", outcome="connect_failed") == 20,
                   5, "20 connect_failed (counts are published every second)")
    backend.close()


# ------------------------------------------------------------------ 256 MiB through pauses
SIZE_256 = 256 << 20


class PausingSender:
    """After the ClientHello, sends `size` pattern bytes in 1 MiB writes, stopping `pause_s`
    every `every` bytes (a source that goes quiet mid-stream), then closes."""

    def __init__(self, size: int = SIZE_256, every: int = 64 << 20, pause_s: float = 0.3,
                 hello_len: int = 0):
        from tests.integration.harness import pattern_bytes
        self.size, self.every, self.pause_s, self.hello_len = size, every, pause_s, hello_len
        self.chunk = memoryview(pattern_bytes(1 << 20))     # 1 MiB: the pattern repeats on it
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            got = 0
            while got < self.hello_len:
                got += len(conn.recv(self.hello_len - got))
            sent = 0
            while sent < self.size:
                conn.sendall(self.chunk)
                sent += len(self.chunk)
                if sent % self.every == 0 and sent < self.size:
                    time.sleep(self.pause_s)

    def close(self):
        self.sock.close()


def stalling_read(s: socket.socket, seed: int) -> tuple[int, str]:
    """Read to EOF in random sizes, now and then stalling (the reader pauses too)."""
    import hashlib
    rnd = random.Random(seed)
    h, n = hashlib.sha256(), 0
    while chunk := s.recv(rnd.choice([4096, 65536, 1 << 20])):
        h.update(chunk)
        n += len(chunk)
        if rnd.random() < 0.01:
            time.sleep(rnd.choice([0.001, 0.01, 0.05]))
    return n, h.hexdigest()


@pytest.mark.parametrize("ebpf", [False, True], ids=["userspace", "sockmap"])
def test_256_mib_through_pauses_is_sha256_exact(proxy_factory, ebpf):
    from tests.ebpf_required import require_ebpf
    if ebpf:
        require_ebpf()
    hello = client_hello_bytes("a.test")
    sender = PausingSender(hello_len=len(hello))
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{sender.port}"}],
                      ebpf={"enabled": ebpf})
    with socket.create_connection(("127.0.0.1", port_of(p)), timeout=60) as s:
        s.sendall(hello)
        got = stalling_read(s, seed=256)
    assert got == (SIZE_256, pattern_sha256(SIZE_256))
    wait_until(lambda: access(p), 10, "the access line")
    line = access(p)[0]
    assert (line["relay"], line["outcome"], int(line["bytes_down"])) == \
        ("sockmap" if ebpf else "splice", "ok", SIZE_256), line
    sender.close()
