"""The sockmap relay for real: the proxy as a subprocess, real sockets, hashes of every byte.

Where the hand-over breaks (a backend that answers at once, a client that pipelines after its
hello), how connections end (half-close both ways, RST, either side closing first), bounded
memory with a slow reader, fallbacks, and no leak of map entries or fds afterwards.
"""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import (
    ProxyProcess, RawBackend, base_config, client_hello_bytes, free_port, pattern_bytes,
    pattern_sha256, send_pattern, wait_until,
)

pytestmark = pytest.mark.ebpf
MiB = 1 << 20
GiB = 1 << 30
HELLO = client_hello_bytes("data.test")


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture
def start_proxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(backend_port: int, *, workers: int = 1, sockmap: dict | None = None,
              idle_s: float = 60, **over) -> ProxyProcess:
        cfg = base_config(free_port(), free_port(), workers=workers,
                          default_backend=f"127.0.0.1:{backend_port}",
                          ebpf={"enabled": True, "sockmap": sockmap or {},
                                "dns_cache": {"pin_path": None}}, **over)
        cfg["timeouts"]["idle_s"] = idle_s
        d = tmp_path / f"p{len(started)}"
        d.mkdir()
        p = ProxyProcess(cfg, d)
        started.append(p)
        p.start()
        assert p.status()["ebpf"]["sockmap"] == "active", p.log()
        return p

    yield start
    for p in started:
        p.stop()


def port_of(p: ProxyProcess) -> int:
    return int(p.config["listen_addr"].rsplit(":", 1)[1])


def connect(p: ProxyProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(p)), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_to_eof(s: socket.socket) -> tuple[int, str, bytes]:
    """(bytes, sha256, first 64 KiB) of everything until EOF."""
    h = hashlib.sha256()
    n = 0
    head = b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            return n, h.hexdigest(), head
        if len(head) < 65536:
            head += chunk[:65536 - len(head)]
        h.update(chunk)
        n += len(chunk)


def stream_sha(prefix: bytes, n: int) -> str:
    """sha256 of prefix + the harness's n-byte pattern, without holding it in memory."""
    h = hashlib.sha256(prefix)
    chunk = pattern_bytes(128 * 1024)          # the pattern repeats every 128 KiB
    full, rest = divmod(n, len(chunk))
    for _ in range(full):
        h.update(chunk)
    h.update(chunk[:rest])
    return h.hexdigest()


def assert_no_leak(p: ProxyProcess) -> None:
    """Every pair left the maps and no kernel connection is counted any more."""
    def clean():
        e = p.status()["ebpf"]
        return e["active_connections"] == 0 and not any(e["map_entries"].values())
    wait_until(clean, 10, f"sockmap entries back to 0: {p.status()['ebpf']}")


def access_lines(p: ProxyProcess) -> list[str]:
    return [line for line in p.log().splitlines() if "sniproxy.access" in line]


def worker_pids(p: ProxyProcess) -> list[int]:
    return [w["pid"] for w in p.status()["workers"] if w["alive"]]


def fd_count(pid: int) -> int:
    """Open fds of a process, not counting pipes (the user-space relay keeps a bounded pool)."""
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for fd in fds if not _readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


# ---------------------------------------------------------------------------- integrity
def test_one_gib_each_way_hashed(start_proxy):
    be = RawBackend(reply_bytes=GiB, send_first=True)     # sends while it receives
    p = start_proxy(be.port, sockmap={"sndbuf_bytes": 8 * MiB})
    s = connect(p)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(read_to_eof(s)))
    reader.start()
    s.sendall(HELLO)
    send_pattern(s, GiB)
    s.shutdown(socket.SHUT_WR)
    reader.join(120)
    sess = be.wait_sessions(1, 120)[0]
    assert got and got[0][0] == GiB and got[0][1] == pattern_sha256(GiB)
    assert (sess.nbytes, sess.sha256) == (len(HELLO) + GiB, stream_sha(HELLO, GiB))
    line = access_lines(p)[-1]
    assert "relay=sockmap" in line and f"bytes_up={len(HELLO) + GiB}" in line
    assert f"bytes_down={GiB}" in line and "outcome=ok" in line
    s.close()
    assert_no_leak(p)


def test_upload_hash_is_exact(start_proxy):
    """The backend's sha256 of the whole stream equals hello + pattern (no byte lost or doubled)."""
    be = RawBackend(reply_bytes=0)
    p = start_proxy(be.port)
    n = 256 * MiB
    with connect(p) as s:
        s.sendall(HELLO)
        send_pattern(s, n)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    sess = be.wait_sessions(1)[0]
    expected = stream_sha(HELLO, n)
    assert (sess.nbytes, sess.sha256) == (len(HELLO) + n, expected)
    assert_no_leak(p)


def test_hundreds_of_concurrent_connections_mixed_sizes(start_proxy):
    be = RawBackend(reply_bytes=300_000)
    p = start_proxy(be.port, workers=2)
    sizes = [(i * 7919) % (3 * MiB) for i in range(300)]

    def one(n: int) -> tuple[int, int, str]:
        with connect(p) as s:
            s.sendall(HELLO)
            send_pattern(s, n)
            s.shutdown(socket.SHUT_WR)
            got, digest, _ = read_to_eof(s)
        return n, got, digest

    with ThreadPoolExecutor(max_workers=150) as pool:
        results = list(pool.map(one, sizes))
    assert all(got == 300_000 and digest == pattern_sha256(300_000) for _, got, digest in results)
    sessions = be.wait_sessions(len(sizes))
    assert sorted(s.nbytes for s in sessions) == sorted(len(HELLO) + n for n in sizes)
    assert all(not s.error for s in sessions)
    # A client whose FIN is in before the hand-over (small uploads) cannot enter the map
    # (CLOSE_WAIT): it is relayed in user space and counted; every other one is in the kernel.
    in_kernel = sum("relay=sockmap" in line for line in access_lines(p))
    fallbacks = p.metric("ebpf_sockmap_fallbacks_total", reason="close_wait")
    assert in_kernel + fallbacks == len(sizes) and in_kernel > len(sizes) * 0.8
    assert p.metric("ebpf_sockmap_fallbacks_total") == fallbacks
    assert_no_leak(p)


# ---------------------------------------------------------------------------- hand-over
def test_backend_answers_instantly_and_client_pipelines_after_hello(start_proxy):
    """Bytes queued before the hand-over (both ways) arrive first and in order."""
    be = RawBackend(reply_bytes=5 * MiB, send_first=True)
    p = start_proxy(be.port)
    early = b"EARLY-DATA-" * 1000
    with connect(p) as s:
        s.sendall(HELLO + early)                # one write: hello and data together
        send_pattern(s, 3 * MiB)
        s.shutdown(socket.SHUT_WR)
        got, digest, _ = read_to_eof(s)
    assert (got, digest) == (5 * MiB, pattern_sha256(5 * MiB))
    sess = be.wait_sessions(1)[0]
    expected = stream_sha(HELLO + early, 3 * MiB)
    assert sess.received.startswith(HELLO + early)
    assert (sess.nbytes, sess.sha256) == (len(HELLO + early) + 3 * MiB, expected)
    assert_no_leak(p)


# ---------------------------------------------------------------------------- endings
class ScriptedBackend:
    """One-connection backend running `script(conn)` in a thread; records what it saw."""

    def __init__(self, script):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.result: dict = {}
        self.done = threading.Event()
        self.script = script
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        conn, _ = self.sock.accept()
        conn.settimeout(30)
        try:
            self.script(conn, self.result)
        except OSError as exc:
            self.result["error"] = exc
        finally:
            conn.close()
            self.done.set()

    def wait(self) -> dict:
        assert self.done.wait(60), "backend script did not finish"
        return self.result


def test_half_close_backend_first_client_keeps_sending(start_proxy):
    """Backend sends and shuts down writing; the client gets EOF yet can still upload."""
    def script(conn, r):
        conn.sendall(pattern_bytes(2 * MiB))
        conn.shutdown(socket.SHUT_WR)
        r["up"] = read_to_eof(conn)

    be = ScriptedBackend(script)
    p = start_proxy(be.port)
    with connect(p) as s:
        s.sendall(HELLO)
        got, digest, _ = read_to_eof(s)         # EOF from the backend's half-close
        assert (got, digest) == (2 * MiB, pattern_sha256(2 * MiB))
        send_pattern(s, 4 * MiB)                # the other direction still flows
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    n, digest, _ = be.wait()["up"]
    expected = stream_sha(HELLO, 4 * MiB)
    assert (n, digest) == (len(HELLO) + 4 * MiB, expected)
    assert "outcome=ok" in access_lines(p)[-1]
    assert_no_leak(p)


def test_half_close_client_first_backend_keeps_sending(start_proxy):
    be = RawBackend(reply_bytes=20 * MiB)       # reads to EOF, then answers
    p = start_proxy(be.port)
    with connect(p) as s:
        s.sendall(HELLO)
        send_pattern(s, 20 * MiB)
        s.shutdown(socket.SHUT_WR)
        got, digest, _ = read_to_eof(s)
    assert (got, digest) == (20 * MiB, pattern_sha256(20 * MiB))
    assert be.wait_sessions(1)[0].nbytes == len(HELLO) + 20 * MiB
    assert_no_leak(p)


def test_backend_closes_first(start_proxy):
    def script(conn, r):
        conn.recv(65536)
        conn.sendall(pattern_bytes(8 * MiB))
        # close() right away: the client must still get every byte, then EOF

    be = ScriptedBackend(script)
    p = start_proxy(be.port)
    with connect(p) as s:
        s.sendall(HELLO)
        got, digest, _ = read_to_eof(s)
    assert (got, digest) == (8 * MiB, pattern_sha256(8 * MiB))
    be.wait()
    wait_until(lambda: access_lines(p), 10, "the access log line")
    assert_no_leak(p)


def test_client_closes_first(start_proxy):
    be = RawBackend(reply_bytes=0)
    p = start_proxy(be.port)
    s = connect(p)
    s.sendall(HELLO)
    send_pattern(s, 16 * MiB)
    s.close()                                   # full close, no shutdown first
    sess = be.wait_sessions(1)[0]
    expected = stream_sha(HELLO, 16 * MiB)
    assert (sess.nbytes, sess.sha256, sess.eof) == (len(HELLO) + 16 * MiB, expected, True)
    assert_no_leak(p)


def test_rst_mid_stream_is_propagated(start_proxy):
    def script(conn, r):
        n = 0
        try:
            while True:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    r["eof"] = True
                    break
                n += len(chunk)
        except ConnectionResetError:
            r["reset"] = True
        r["n"] = n

    be = ScriptedBackend(script)
    p = start_proxy(be.port)
    s = connect(p)
    s.sendall(HELLO)
    send_pattern(s, 1 * MiB)
    wait_until(lambda: p.status()["ebpf"]["active_connections"] == 1, 10, "the pair in the map")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()                                   # RST
    r = be.wait()
    assert r.get("reset"), f"backend saw {r}, not a reset"
    wait_until(lambda: any("outcome=reset" in line for line in access_lines(p)), 10, "reset logged")
    assert_no_leak(p)


def test_idle_timeout_closes_quiet_pair(start_proxy):
    be = ScriptedBackend(lambda conn, r: r.setdefault("eof", conn.recv(1 << 20) and conn.recv(1)))
    p = start_proxy(be.port, idle_s=1)
    with connect(p) as s:
        s.sendall(HELLO)
        t0 = time.monotonic()
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass
        assert 0.9 < time.monotonic() - t0 < 5
    wait_until(lambda: any("outcome=idle_timeout" in line for line in access_lines(p)), 10, "idle")
    assert_no_leak(p)


# ---------------------------------------------------------------------------- backpressure
def tcp_mem_bytes() -> int:
    """Machine-wide memory of TCP sockets (pages in /proc/net/sockstat)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * 4096
    raise AssertionError("no TCP line in /proc/net/sockstat")


def test_slow_reader_memory_stays_bounded(start_proxy):
    """A fast client and a backend reading at ~40 MB/s: kernel TCP memory stays near the socket
    buffers, not the whole upload. Measured here with pausing off (kernel.PAUSE_ENABLED):
    peak 4.7 MiB with the default send buffer, 16.2 MiB with an 8 MiB one."""
    total = 160 * MiB

    def script(conn, r):
        h, n = hashlib.sha256(), 0
        while True:
            chunk = conn.recv(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            time.sleep(len(chunk) / 40e6)       # the slow reader is the behaviour under test
        r["n"], r["sha"] = n, h.hexdigest()

    be = ScriptedBackend(script)
    p = start_proxy(be.port, sockmap={"max_inflight_bytes": 4 * MiB, "sndbuf_bytes": 8 * MiB})
    baseline = tcp_mem_bytes()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], tcp_mem_bytes() - baseline)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with connect(p) as s:
            s.sendall(HELLO)
            send_pattern(s, total)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
        r = be.wait()
    finally:
        stop.set()
        sampler.join()
    expected = stream_sha(HELLO, total)
    assert (r["n"], r["sha"]) == (len(HELLO) + total, expected)
    # Socket buffers of client, proxy and backend (a few MiB each; 8 MiB forced send buffer).
    assert peak[0] < 48 * MiB, f"kernel TCP memory grew by {peak[0] / MiB:.0f} MiB"
    assert_no_leak(p)


# ---------------------------------------------------------------------------- fallbacks, leaks
def test_map_full_falls_back_to_user_space(start_proxy):
    be = RawBackend(reply_bytes=1 * MiB)
    p = start_proxy(be.port, sockmap={"max_entries": 2})     # room for one pair
    first = connect(p)
    first.sendall(HELLO)
    wait_until(lambda: p.status()["ebpf"]["active_connections"] == 1, 10, "first pair in the map")
    with connect(p) as second:
        second.sendall(HELLO)
        send_pattern(second, 2 * MiB)
        second.shutdown(socket.SHUT_WR)
        got, digest, _ = read_to_eof(second)
    assert (got, digest) == (1 * MiB, pattern_sha256(1 * MiB))
    first.shutdown(socket.SHUT_WR)
    assert read_to_eof(first)[0] == 1 * MiB
    first.close()
    assert p.metric("ebpf_sockmap_fallbacks_total", reason="map_full") == 1
    assert "Map capacity full" in p.log()
    relays = [line.split("relay=")[1].split()[0] for line in access_lines(p)]
    assert sorted(relays) in (["sockmap", "splice"], ["copy", "sockmap"])
    assert_no_leak(p)


def test_counts_return_to_baseline(start_proxy):
    be = RawBackend(reply_bytes=100_000, send_first=True)
    p = start_proxy(be.port)
    pid = worker_pids(p)[0]

    def one(_):
        with connect(p) as s:
            s.sendall(HELLO + b"x" * 1000)
            got = b""
            while len(got) < 100_000:            # reply first: the pair is in the kernel by now
                got += s.recv(65536)
            s.shutdown(socket.SHUT_WR)
            return len(got) + read_to_eof(s)[0]

    one(0)
    assert_no_leak(p)
    baseline = fd_count(pid)
    with ThreadPoolExecutor(max_workers=50) as pool:
        assert list(pool.map(one, range(200))) == [100_000] * 200
    assert_no_leak(p)
    assert p.metric("ebpf_sockmap_fallbacks_total") == 0
    wait_until(lambda: fd_count(pid) == baseline, 10, f"worker fds back to {baseline}")
    # No socket of ours left in CLOSE_WAIT on the proxy port.
    out = os.popen(f"ss -tanH state close-wait '( sport = :{port_of(p)} )'").read()
    assert out.strip() == ""
