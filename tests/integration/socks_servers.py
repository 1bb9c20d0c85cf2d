"""Real local servers the upstream layer talks to in tests: SOCKS5 (pproxy, Debian's danted, and a
scripted one for exact byte sequences), DNS (dnslib) and simple TCP backends.

Everything listens on loopback only and is stopped by its context manager. Readiness is awaited by
polling connect() with a bounded deadline, never by sleeping a fixed time.

    with start_pproxy(auth=("u", "p")) as socks:      # socks.port, socks.addr == "127.0.0.1:PORT"
    with start_danted() as socks:
    with start_dns_server({"a.test": [("A", "127.0.0.1", 30)]}) as dns_server:  # .queries, .addr
    with start_tcp_server("127.0.0.1", banner=b"hi") as backend:                  # .port, .accepted
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen | None = None,
                  timeout_s: float = READY_TIMEOUT_S, log: Path | None = None) -> None:
    """Poll connect() until the port accepts; fail early if `proc` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening "
                               f"on {host}:{port}\n{detail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepted on {host}:{port} within {timeout_s}s") from None
            time.sleep(0.02)  # polling interval for an external process, not a synchronisation


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group we created for `proc` (its own session), TERM then KILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT_S)
    # danted's children may outlive the parent for a moment: reap the rest of our group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class SocksServer:
    host: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


# pproxy installs uvloop's policy when uvloop is importable, then calls asyncio.get_event_loop(),
# which uvloop >= 0.21 refuses outside a running loop; hiding uvloop makes it use stock asyncio.
PPROXY_MAIN = "import sys; sys.modules['uvloop'] = None; from pproxy.server import main; sys.exit(main())"


@contextlib.contextmanager
def start_pproxy(port: int | None = None, auth: tuple[str, str] | None = None,
                 log_dir: Path | None = None) -> Iterator[SocksServer]:
    """pproxy's SOCKS5 server on 127.0.0.1 (from this venv), optionally with user/pass auth."""
    try:
        import pproxy  # noqa: F401
    except ImportError:
        raise RuntimeError("pproxy not installed: run `make setup` (it is a test extra)") from None
    port = port or free_port()
    url = f"socks5://127.0.0.1:{port}" + (f"#{auth[0]}:{auth[1]}" if auth else "")
    log = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"pproxy-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", PPROXY_MAIN, "-l", url], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, proc, log=log)
        yield SocksServer("127.0.0.1", port, proc)
    finally:
        _stop_group(proc)


DANTED_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
"""


@contextlib.contextmanager
def start_danted(workdir: Path, port: int | None = None) -> Iterator[SocksServer]:
    """Debian's Dante SOCKS5 server, no auth, in the foreground (no -D), one main server."""
    exe = shutil.which("danted") or "/usr/sbin/danted"
    if not os.path.exists(exe):
        raise RuntimeError("danted not found: install Debian's dante-server (`make setup` does)")
    port = port or free_port()
    conf = workdir / f"danted-{port}.conf"
    conf.write_text(DANTED_CONF.format(port=port))
    log = workdir / f"danted-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-f", str(conf), "-N", "1", "-p", str(workdir / "danted.pid")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "TMPDIR": str(workdir)})
    try:
        wait_for_port("127.0.0.1", port, proc, log=log)
        yield SocksServer("127.0.0.1", port, proc)
    finally:
        _stop_group(proc)


# -- a scripted SOCKS5 server: exact bytes, for cases real servers do not produce on demand ----------

@contextlib.contextmanager
def start_scripted_socks5(replies: list[bytes], method: int = 0x00,
                          auth_reply: bytes = b"\x01\x00") -> Iterator[SocksServer]:
    """Accepts one connection: answers the greeting with `method`, the RFC 1929 request (if
    method 2) with `auth_reply`, then reads the CONNECT request and writes each of `replies` as a
    separate send, then closes. E.g. [reply + b"early"] puts backend bytes in the reply's segment."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(READY_TIMEOUT_S)
    port = listener.getsockname()[1]
    received: list[bytes] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(READY_TIMEOUT_S)
                received.append(conn.recv(257))  # greeting
                conn.sendall(bytes([5, method]))
                if method == 0x02:
                    received.append(conn.recv(513))
                    conn.sendall(auth_reply)
                    if auth_reply[1:2] != b"\x00":
                        return
                if method in (0x00, 0x02):
                    received.append(conn.recv(262))  # CONNECT request
                for chunk in replies:
                    conn.sendall(chunk)
                    time.sleep(0.01)  # separate TCP segments, so the client sees separate reads
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # until the client closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    server = SocksServer("127.0.0.1", port)
    server.received = received  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        listener.close()
        thread.join(STOP_TIMEOUT_S)


# -- DNS -------------------------------------------------------------------------------------------

@dataclass
class DnsServer:
    host: str
    port: int
    records: dict[str, list[tuple[str, str, int]]]
    queries: Counter = field(default_factory=Counter)  # (name, qtype) -> count
    delay_s: float = 0.0  # answer late (still answers): lets concurrent lookups overlap
    silent: set[str] = field(default_factory=set)  # names never answered (client times out)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def total(self, name: str) -> int:
        return sum(n for (qname, _), n in self.queries.items() if qname == name)


@contextlib.contextmanager
def start_dns_server(records: dict[str, list[tuple[str, str, int]]]) -> Iterator[DnsServer]:
    """dnslib UDP server on 127.0.0.1:<free port>. `records`: name -> [(type, value, ttl)], type
    "A" / "AAAA" / "CNAME". Unknown names get NXDOMAIN; known names without the asked type get an
    empty NOERROR answer."""
    from dnslib import QTYPE, RCODE, RR
    from dnslib.server import DNSError, DNSServer

    state = DnsServer("127.0.0.1", 0, records)

    class Resolver:
        def resolve(self, request, handler):
            qname = str(request.q.qname).rstrip(".").lower()
            qtype = QTYPE[request.q.qtype]
            state.queries[(qname, qtype)] += 1
            if qname in state.silent:
                raise DNSError("silent name: no reply")
            if state.delay_s:
                time.sleep(state.delay_s)  # the server being slow is the behaviour under test
            reply = request.reply()
            if qname not in state.records:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rtype, value, ttl in state.records[qname]:
                if rtype == qtype or rtype == "CNAME":
                    reply.add_answer(*RR.fromZone(f"{qname}. {ttl} IN {rtype} {value}"))
                    if rtype == "CNAME":
                        target = value.rstrip(".").lower()
                        for t2, v2, ttl2 in state.records.get(target, []):
                            if t2 == qtype:
                                reply.add_answer(*RR.fromZone(f"{target}. {ttl2} IN {t2} {v2}"))
            return reply

    class QuietLogger:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    server = DNSServer(Resolver(), address="127.0.0.1", port=0, logger=QuietLogger())
    state.port = server.server.server_address[1]
    server.start_thread()
    try:
        yield state
    finally:
        server.server.shutdown()
        server.server.server_close()


# -- TCP backends ----------------------------------------------------------------------------------

@dataclass
class TcpServer:
    host: str
    port: int
    accepted: list[tuple] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)


@contextlib.contextmanager
def start_tcp_server(host: str, banner: bytes = b"", port: int = 0,
                     read_first: int = 0) -> Iterator[TcpServer]:
    """Accepts connections; sends `banner` at once, then (if read_first) records what it reads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((host, port))
    listener.listen(16)
    state = TcpServer(host, listener.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                state.accepted.append(peer)
                conn.settimeout(READY_TIMEOUT_S)
                with contextlib.suppress(OSError):
                    if banner:
                        conn.sendall(banner)
                    if read_first:
                        data = b""
                        while len(data) < read_first:
                            chunk = conn.recv(read_first - len(data))
                            if not chunk:
                                break
                            data += chunk
                        state.received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(STOP_TIMEOUT_S)
        listener.close()


@contextlib.contextmanager
def blackhole(host: str, port: int = 0) -> Iterator[int]:
    """A port on `host` that never answers a SYN: a listener with backlog 0 whose accept queue is
    already full (Linux then drops new SYNs), so connect() hangs until the caller's timeout."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((host, port))
    listener.listen(0)
    bound = listener.getsockname()[1]
    filler = socket.create_connection((host, bound), timeout=READY_TIMEOUT_S)
    try:
        yield bound
    finally:
        filler.close()
        listener.close()


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port bound but not listening: connects to it are refused (RST) and nobody else takes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


def shared_port(hosts: tuple[str, ...], attempts: int = 50) -> int:
    """A port number free on every one of `hosts` right now (for one-port multi-address tests)."""
    for _ in range(attempts):
        port = free_port(hosts[0])
        ok = True
        for host in hosts[1:]:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError(f"no common free port on {hosts} after {attempts} attempts")
