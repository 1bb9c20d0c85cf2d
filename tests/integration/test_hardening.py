"""Hardening found by hostile testing (issue 15): each test reproduces one finding for real.

The proxy runs as a subprocess with real backends and real client sockets; every wait is bounded.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import (
    ProxyProcess, RawBackend, base_config, client_hello_bytes, free_ports, wait_until,
)

RELAY_MODES = pytest.mark.parametrize("ebpf", [False, True], ids=["userspace", "sockmap"])


@pytest.fixture
def proxy_factory(tmp_path):
    started: list[ProxyProcess] = []

    def start(wait: bool = True, env: dict | None = None, ports: tuple[int, int] | None = None,
              **over) -> ProxyProcess:
        cfg = base_config(*(ports or free_ports(2)), **over)
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        p = ProxyProcess(cfg, workdir, env=env)
        started.append(p)
        return p.start(wait=wait)

    yield start
    for p in started:
        p.stop()


def proxy_port(p: ProxyProcess) -> int:
    return int(p.config["listen_addr"].rsplit(":", 1)[1])


def raw_connect(port: int, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def ebpf_cfg(on: bool) -> dict:
    if on:
        require_ebpf()
    return {"enabled": on}


def access_lines(p: ProxyProcess, **fields) -> list[dict]:
    """Access-log lines (key=value text format) whose fields match."""
    out = []
    for line in p.log().splitlines():
        if "sniproxy.access" not in line:
            continue
        kv = dict(re.findall(r"(\w+)=(\S+)", line.split("sniproxy.access:", 1)[1]))
        if all(kv.get(k) == str(v) for k, v in fields.items()):
            out.append(kv)
    return out


class CountingBackend:
    """Reads and counts everything it receives (live), never answers; closes at EOF."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        try:
            while chunk := conn.recv(1 << 20):
                self.received += len(chunk)
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


# ------------------------------------------------------------------ 2: a reset stays a reset
class ResettingBackend:
    """Reads `after` bytes, then closes with SO_LINGER 0: the proxy's backend socket gets a RST."""

    def __init__(self, after: int):
        self.after = after
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        got = 0
        conn.settimeout(20)
        try:
            while got < self.after:
                chunk = conn.recv(self.after - got)
                if not chunk:
                    break
                got += len(chunk)
        except OSError:
            pass
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    def close(self):
        self.sock.close()


def _client_sees(port: int, hello: bytes, payload: bytes) -> str:
    """'reset' when the proxy reset the client, 'eof' when it closed cleanly (a lie here)."""
    s = raw_connect(port, timeout=20)
    try:
        s.sendall(hello)
        try:
            s.sendall(payload)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return "reset"
            if not chunk:
                return "eof"
    finally:
        s.close()


@RELAY_MODES
def test_backend_reset_reaches_every_client_as_a_reset(proxy_factory, ebpf):
    backend = ResettingBackend(after=100_000)
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      ebpf=ebpf_cfg(ebpf))
    hello = client_hello_bytes("a.test")
    payload = os.urandom(200_000)
    try:
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            seen = list(pool.map(lambda _: _client_sees(proxy_port(p), hello, payload), range(200)))
    finally:
        backend.close()
    assert seen.count("eof") == 0, f"{seen.count('eof')} of 200 clients saw a clean EOF"


# ------------------------------------------------------------------ 5: one port, one proxy
def test_second_instance_on_the_same_port_is_refused_naming_the_first(proxy_factory):
    first = proxy_factory(default_backend="127.0.0.1:9")
    port = proxy_port(first)
    second = proxy_factory(wait=False, ports=(port, free_ports(1)[0]), default_backend="127.0.0.1:9")
    assert second.proc.wait(20) == 3, second.log()
    log = second.log()
    assert f"pid {first.proc.pid}" in log, log
    assert "listen_reuse_port_shared" in log, log


def test_sharing_the_port_on_purpose(proxy_factory):
    first = proxy_factory(listen_reuse_port_shared=True, default_backend="127.0.0.1:9")
    port = proxy_port(first)
    proxy_factory(ports=(port, free_ports(1)[0]), listen_reuse_port_shared=True,
                  default_backend="127.0.0.1:9")


# ------------------------------------------------------------------ 6: restart-only keys stay
def test_respawned_worker_keeps_the_running_listen_addr(proxy_factory):
    backend = RawBackend()
    old_port, new_port = free_ports(2)
    routes = [{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}]
    p = proxy_factory(routes=routes, ports=(old_port, free_ports(1)[0]))
    cfg = dict(p.config, listen_addr=f"127.0.0.1:{new_port}")
    p.config_path.write_text(json.dumps(cfg))
    p.signal(signal.SIGHUP)
    wait_until(lambda: "only take effect after a restart" in p.log(), 5, "the reload warning")
    pid = p.status()["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (w := p.status()["workers"][0])["alive"] and w["pid"] != pid, 10, "respawn")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", new_port), timeout=2).close()
    raw_connect(old_port).close()
    backend.close()


# ------------------------------------------------------------------ 7: idle timeout on time
@RELAY_MODES
def test_idle_timeout_fires_after_idle_s_not_twice_that(proxy_factory, ebpf):
    backend = CountingBackend()
    idle_s = 2
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      timeouts={"client_hello_s": 5, "connect_s": 5, "idle_s": idle_s},
                      ebpf=ebpf_cfg(ebpf))
    s = raw_connect(proxy_port(p), timeout=4 * idle_s)
    s.sendall(client_hello_bytes("a.test"))
    wait_until(lambda: backend.received > 0, 5, "the hello at the backend")
    t0 = time.monotonic()
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - t0
    s.close()
    backend.close()
    # The check granularity is idle_s / 8: the timeout fires within [idle_s, 1.125 idle_s]
    # (+ scheduling); it fired at 2 idle_s with the sockmap relay.
    assert idle_s * 0.9 <= elapsed < idle_s * 1.5, elapsed


# ------------------------------------------------------------------ 8: bytes of cut connections
@RELAY_MODES
def test_connections_cut_at_the_end_of_the_drain_report_their_bytes(proxy_factory, ebpf):
    backend = CountingBackend()
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      timeouts={"client_hello_s": 5, "connect_s": 5, "idle_s": 60,
                                "shutdown_grace_s": 1},
                      ebpf=ebpf_cfg(ebpf))
    hello = client_hello_bytes("a.test")
    sent = len(hello) + (4 << 20)
    s = raw_connect(proxy_port(p))
    s.sendall(hello)
    s.sendall(b"x" * (4 << 20))
    wait_until(lambda: backend.received >= sent, 10, "4 MiB at the backend")
    p.signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    s.close()
    backend.close()
    lines = access_lines(p, outcome="shutdown")
    assert len(lines) == 1, p.log()
    assert int(lines[0]["bytes_up"]) == sent, lines


# ------------------------------------------------------------------ 4: supervisor killed
def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link)
    return out


@RELAY_MODES
def test_workers_stop_at_once_when_the_supervisor_is_killed(proxy_factory, tmp_path, ebpf):
    from sniproxy.proxy.portowner import port_owners
    run_tmp = tmp_path / "run"
    run_tmp.mkdir()
    p = proxy_factory(workers=3, default_backend="127.0.0.1:9",
                      timeouts={"client_hello_s": 5, "connect_s": 5, "idle_s": 60,
                                "shutdown_grace_s": 2},
                      env={"TMPDIR": str(run_tmp)}, ebpf=ebpf_cfg(ebpf))
    port, metrics_port = proxy_port(p), int(p.config["metrics_addr"].rsplit(":", 1)[1])
    pids = [w["pid"] for w in p.status()["workers"]]
    assert len(list(run_tmp.glob("sni-proxy-metrics-*"))) == 1
    # Only the supervisor holds the metrics listener; no worker holds another's control socket.
    assert [pid for pid, _ in port_owners(metrics_port)] == [p.proc.pid]
    for i, pid in enumerate(pids):
        for other in pids[i + 1:]:
            assert not (_socket_inodes(pid) & _socket_inodes(other)
                        - {f"socket:[{x}]" for x in _listener_inodes(port)}), (pid, other)
    os.kill(p.proc.pid, signal.SIGKILL)
    p.proc.wait(5)
    # Listeners close at once (the drain starts); the workers then exit within the grace (2 s).
    # Before, they kept accepting until another worker's exit closed their control channel.
    wait_until(lambda: _refused(port), 1.5, "the listen port closed")
    wait_until(lambda: all(_gone(pid) for pid in pids), 5, "every worker gone")
    assert "Traceback" not in p.log(), p.log()
    wait_until(lambda: not list(run_tmp.glob("sni-proxy-metrics-*")), 2,
               f"the metrics dir removed: {list(run_tmp.rglob('*'))}\n{p.log()}")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _listener_inodes(port: int) -> set[str]:
    from sniproxy.proxy.portowner import listening_inodes
    return listening_inodes(port)


# ------------------------------------------------------------------ 3: sockmap worker killed
def _recv_outcome(s: socket.socket) -> str:
    try:
        return "eof" if s.recv(1) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"


def test_killed_sockmap_worker_leaves_no_map_entries_and_no_active_count(proxy_factory):
    require_ebpf()
    backend = CountingBackend()
    # Room for 4 pairs: three kills of a worker holding 3 each used to fill it for good.
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      ebpf={"enabled": True, "sockmap": {"max_entries": 8}})
    hello = client_hello_bytes("a.test")
    try:
        for round_ in range(3):
            clients = []
            for _ in range(3):
                s = raw_connect(proxy_port(p), timeout=5)
                s.sendall(hello)
                clients.append(s)
            wait_until(lambda: p.status()["ebpf"]["active_connections"] == 3, 5,
                       f"3 kernel-relayed connections (round {round_})")
            assert p.status()["ebpf"]["map_entries"]["conn"] == 6
            worker = p.status()["workers"][0]
            os.kill(worker["pid"], signal.SIGKILL)
            # Its clients learn that the connection broke: a reset, not a clean end.
            assert [_recv_outcome(s) for s in clients] == ["reset"] * 3
            for s in clients:
                s.close()
            wait_until(lambda: (w := p.status()["workers"][0])["alive"] and w["pid"] != worker["pid"],
                       10, "the worker restarted")
            status = p.status()["ebpf"]
            assert status["active_connections"] == 0, status
            assert status["map_entries"] == {"sks": 0, "dst": 0, "conn": 0, "cred": 0}, status
        assert p.status()["ebpf"]["fallbacks"]["map_full"] == 0
    finally:
        backend.close()


# ------------------------------------------------------------------ $sni through SOCKS5
def test_dynamic_socks_route_refuses_names_of_internal_hosts(proxy_factory):
    """localhost names by definition (RFC 6761), and names that resolve here to an internal
    address (the SOCKS server would resolve them the same way); the SOCKS server never sees
    the request."""
    from tests.integration.socks_servers import start_dns_server, start_pproxy
    backend = CountingBackend()
    records = {"internal.test": [("A", "10.9.9.9", 300)], "meta.test": [("A", "169.254.169.254", 300)],
               "loop6.test": [("AAAA", "::1", 300)], "loop.test": [("A", "127.0.0.1", 300)]}
    names = ("localhost", "sub.localhost", *records)
    try:
        with start_pproxy() as socks, start_dns_server(records) as dns:
            p = proxy_factory(
                routes=[{"match": "localhost", "backend": f"$sni:{backend.port}", "upstream": "corp"},
                        {"match": "*.localhost", "backend": f"$sni:{backend.port}", "upstream": "corp"},
                        {"match": "*.test", "backend": f"$sni:{backend.port}", "upstream": "corp"}],
                upstreams={"corp": {"type": "socks5", "addr": socks.addr}},
                dns={"nameservers": [f"127.0.0.1:{dns.port}"]})
            for name in names:
                with raw_connect(proxy_port(p), timeout=3) as s:
                    s.sendall(client_hello_bytes(name))
                    assert _recv_outcome(s) in ("eof", "reset")
            wait_until(lambda: len(access_lines(p, outcome="forbidden")) == len(names), 5,
                       f"{len(names)} forbidden:\n{p.log()}")
            assert backend.received == 0 and not backend.conns
            assert "allow_private" in p.log()
            assert p.metric("sniproxy_upstream_connect_failures_total", kind="socks") == 0
    finally:
        backend.close()


# ------------------------------------------------------------------ fd exhaustion is named
def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(i for i in range(len(used) + 1) if i not in used)


def test_fd_exhaustion_is_counted_as_fd_limit(proxy_factory):
    backend = CountingBackend()
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      relay={"mode": "splice"})
    worker = p.status()["workers"][0]["pid"]
    hello = client_hello_bytes("a.test")
    try:
        # Room for exactly the accepted socket (socket() fails), then for the backend too (the
        # relay's pipe fails): fds are allocated lowest first, so the limit decides which.
        for extra, in ((1,), (2,)):
            limit = _lowest_free_fd(worker) + extra
            hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)[1]
            resource.prlimit(worker, resource.RLIMIT_NOFILE, (limit, hard))
            with raw_connect(proxy_port(p), timeout=5) as s:
                s.sendall(hello)
                assert _recv_outcome(s) in ("eof", "reset")
        wait_until(lambda: p.metric("sniproxy_upstream_connect_failures_total", kind="fd_limit") == 1,
                   5, f"a connect failure of kind fd_limit\n{p.log()}")
        wait_until(lambda: p.metric("sniproxy_connections_total", outcome="fd_limit") == 1, 5,
                   f"a connection with outcome fd_limit\n{p.log()}")
        assert "LimitNOFILE" in p.log()
    finally:
        backend.close()


# ------------------------------------------------------------------ world-writable config
@pytest.mark.parametrize("via_symlink", [False, True], ids=["file", "symlink"])
def test_world_writable_config_is_warned_about(tmp_path, via_symlink):
    ports = free_ports(2)
    p = ProxyProcess(base_config(*ports, default_backend="127.0.0.1:9"), tmp_path)
    p.config_path.chmod(0o666)
    if via_symlink:
        link = tmp_path / "link.json"
        link.symlink_to(p.config_path)
        p.config_path = link
    p.start()
    try:
        target = os.path.realpath(p.config_path)
        wait_until(lambda: "world-writable" in p.log(), 5, "the warning")
        line = next(l for l in p.log().splitlines() if "world-writable" in l)
        assert target in line and f"chmod o-w {target}" in line, line
        if via_symlink:
            assert str(p.config_path) in line, line
    finally:
        p.stop()


# ------------------------------------------------------------------ idle pipes given back
def _pipe_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except OSError:
            pass
    return n


def test_idle_pipes_of_the_pool_are_given_back_after_a_burst(proxy_factory):
    backend = RawBackend(reply_bytes=1000)
    p = proxy_factory(routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend.port}"}],
                      relay={"mode": "splice"})
    worker = p.status()["workers"][0]["pid"]
    baseline = _pipe_fds(worker)
    hello = client_hello_bytes("a.test")
    burst = 150
    clients = []
    for _ in range(burst):          # all open at once: the burst needs 2 pipes per connection
        s = raw_connect(proxy_port(p))
        s.sendall(hello)
        clients.append(s)
    wait_until(lambda: _pipe_fds(worker) >= baseline + 4 * burst, 10, "the burst's pipes")
    for s in clients:
        s.shutdown(socket.SHUT_WR)
    for s in clients:
        while s.recv(65536):
            pass
        s.close()
    backend.wait_sessions(burst)
    # Bounded right away, then given back once idle.
    from sniproxy.relay.userspace import MAX_IDLE_PIPES, PIPE_IDLE_S
    wait_until(lambda: _pipe_fds(worker) <= baseline + 2 * MAX_IDLE_PIPES, 5, "the pool bound")
    wait_until(lambda: _pipe_fds(worker) == baseline, PIPE_IDLE_S + 5,
               f"idle pipes closed ({_pipe_fds(worker)} pipe fds, baseline {baseline})")
    backend.close()


# ------------------------------------------------------------------ TLS alerts for bad hellos
def _hello_cases():
    from tests.unit.hello_builder import build_hello, client_hello_body, handshake, records, u16
    overrun_alpn = u16(16) + u16(50) + b"\x00"     # an extension longer than what follows
    # (hello bytes, the alert the proxy answers with, or None for no alert)
    return {
        "bad_sni": (records(build_hello(sni=b"exa mple.com")), 112),     # unrecognized_name
        "malformed": (records(handshake(client_hello_body(extensions=[overrun_alpn]))), 50),
        "not_tls": (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", None),
    }


def _read_to_end(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_rejected_hellos_get_the_alert_a_tls_stack_would_send(proxy_factory):
    from sniproxy.proxy.clienthello import tls_alert
    p = proxy_factory(default_backend="127.0.0.1:9")
    for reason, (hello, alert) in _hello_cases().items():
        with raw_connect(proxy_port(p), timeout=5) as s:
            s.sendall(hello)
            got = _read_to_end(s)
        assert got == (tls_alert(alert) if alert is not None else b""), (reason, got)
        wait_until(lambda: p.metric("sniproxy_client_hello_failures_total", reason=reason) == 1, 5,
                   f"{reason} counted")


def test_pipe_pool_trim_closes_only_pipes_idle_long_enough():
    from sniproxy.relay.userspace import PipePool
    pool = PipePool(max_idle=3, idle_s=10)
    pipes = [pool.get() for _ in range(4)]
    for r, w, cap in pipes:
        pool.put(r, w, cap, empty=True)
    assert len(pool.idle) == 3                      # the bound: the fourth was closed
    with pytest.raises(OSError):
        os.fstat(pipes[3][0])
    now = pool._since[-1]
    assert pool.trim(now + 5) == 0                  # not idle long enough
    reused = pool.get()                             # the newest comes back first
    assert pool.trim(now + 10) == 2 and pool.idle == []
    for fd in reused[:2]:
        os.fstat(fd)                                # still open: in use
    pool.put(*reused, empty=True)
    pool.close()


def test_config_in_a_world_writable_directory_is_warned_about(tmp_path):
    from sniproxy.config import config_file_warnings
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg = shared / "config.json"
    cfg.write_text("{}")
    cfg.chmod(0o644)
    [warning] = config_file_warnings(cfg)
    assert "world-writable directory" in warning and f"chmod o-w {shared}" in warning
    shared.chmod(0o1777)                             # sticky, like /tmp: others cannot replace it
    assert config_file_warnings(cfg) == []


def test_parent_death_signal_reaches_a_worker_whose_parent_is_killed(tmp_path):
    """The second mechanism of item 4 alone (the test above also passes with only the first,
    workers no longer holding each other's control sockets): PR_SET_PDEATHSIG as the worker
    sets it delivers SIGTERM when the process that forked it is SIGKILLed."""
    import sys
    marker = tmp_path / "got-sigterm"
    script = f"""
import os, signal, sys, time
from sniproxy.proxy.worker_process import set_parent_death_signal
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, "w").close(), os._exit(0)))
    assert set_parent_death_signal(signal.SIGTERM)
    print("ready", flush=True)
    time.sleep(30)
    os._exit(1)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        parent.kill()
        parent.wait(5)
        wait_until(marker.exists, 5, "SIGTERM in the orphaned child")
    finally:
        if parent.poll() is None:
            parent.kill()
