"""Real peers for integration tests: a test CA, TLS backends, raw backends, the proxy as a subprocess.

Everything listens on loopback only; every wait has a deadline.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.hello_builder import real_hello  # one way to capture a hello, for all tests

REPO = Path(__file__).resolve().parents[2]
SNI_PROXY = str(REPO / ".venv" / "bin" / "sni-proxy")


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int, family: int = socket.AF_INET) -> list[int]:
    """n distinct free ports: the sockets stay bound until all are chosen, so no two collide."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- PKI
@dataclass
class Pki:
    dir: Path
    ca_path: Path

    def cert_for(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def make_pki(directory: Path, names: list[str]) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sni-proxy test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(name)]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return Pki(directory, ca_path)


# ---------------------------------------------------------------- TLS backend
class _WhoamiHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        server = self.server
        sni = getattr(self.connection, "sni_seen", None)
        if self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            body = (b"0123456789abcdef" * (n // 16 + 1))[:n]
        else:
            body = json.dumps({"backend": server.label, "port": server.server_address[1],
                               "sni": sni, "path": self.path}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _TlsHttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, label: str, ctx: ssl.SSLContext):
        self.label = label
        self.ctx = ctx
        super().__init__(addr, _WhoamiHandler)

    def get_request(self):
        sock, addr = self.socket.accept()
        sock.settimeout(10)
        tls = self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError):
            tls.close()
            raise OSError("handshake failed")
        return tls, addr


@contextlib.contextmanager
def tls_backend(pki: Pki, names: list[str], label: str, port: int | None = None, host: str = "127.0.0.1"):
    """An HTTPS server answering /whoami with its label, port and the SNI it saw."""
    contexts = {}
    for name in names:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        crt, key = pki.cert_for(name)
        c.load_cert_chain(crt, key)
        contexts[name] = c
    base = contexts[names[0]]

    def pick(sslsock, server_name, _ctx):
        if server_name in contexts:
            sslsock.context = contexts[server_name]
        sslsock.sni_seen = server_name   # what the backend saw: proves the hello arrived unchanged

    for c in contexts.values():
        c.sni_callback = pick
    srv = _TlsHttpServer((host, port or 0), label, base)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------- raw backend
@dataclass
class RawSession:
    received: bytes = b""
    sha256: str = ""
    nbytes: int = 0
    eof: bool = False
    error: str = ""
    proxy_header: bytes = b""


class RawBackend:
    """A plain TCP backend: hashes what it receives; optionally sends a payload and/or closes first.

    behaviour: "echo-hash" (read to EOF, then send `reply_bytes` deterministic bytes and close),
    "send-first" (send `reply_bytes` right away, then read to EOF), "proxy-header" (read a PROXY
    header line/block first and record it).
    """

    def __init__(self, reply_bytes: int = 0, keep_prefix: int = 65536, send_first: bool = False,
                 read_proxy_header: bool = False, host: str = "127.0.0.1"):
        self.reply_bytes = reply_bytes
        self.keep_prefix = keep_prefix
        self.send_first = send_first
        self.read_proxy_header = read_proxy_header
        self.sessions: list[RawSession] = []
        self.done = threading.Condition()
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        s = RawSession()
        h = hashlib.sha256()
        conn.settimeout(60)
        try:
            if self.read_proxy_header:
                s.proxy_header = _read_proxy_header(conn)
            if self.send_first and self.reply_bytes:
                send_pattern(conn, self.reply_bytes)
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    s.eof = True
                    break
                if len(s.received) < self.keep_prefix:
                    s.received += chunk[: self.keep_prefix - len(s.received)]
                h.update(chunk)
                s.nbytes += len(chunk)
            if not self.send_first and self.reply_bytes:
                send_pattern(conn, self.reply_bytes)
        except OSError as exc:
            s.error = str(exc)
        finally:
            s.sha256 = h.hexdigest()
            conn.close()
            with self.done:
                self.sessions.append(s)
                self.done.notify_all()

    def wait_sessions(self, n: int, timeout: float = 60) -> list[RawSession]:
        with self.done:
            if not self.done.wait_for(lambda: len(self.sessions) >= n, timeout):
                raise TimeoutError(f"backend saw {len(self.sessions)} sessions, expected {n}")
            return list(self.sessions)

    def close(self):
        self._stop = True
        self.sock.close()


def _read_proxy_header(conn: socket.socket) -> bytes:
    first = conn.recv(16, socket.MSG_PEEK)
    if first.startswith(b"PROXY "):
        data = b""
        while not data.endswith(b"\r\n"):
            data += conn.recv(1)
        return data
    if first.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
        head = _recv_exact(conn, 16)
        length = int.from_bytes(head[14:16], "big")
        return head + _recv_exact(conn, length)
    return b""


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError("short read")
        data += chunk
    return data


_PATTERN = hashlib.sha256(b"sni-proxy").digest() * 4096   # 128 KiB of deterministic bytes


def pattern_bytes(n: int) -> bytes:
    reps = n // len(_PATTERN) + 1
    return (_PATTERN * reps)[:n]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(_PATTERN))
    for _ in range(full):
        h.update(_PATTERN)
    h.update(_PATTERN[:rest])
    return h.hexdigest()


def send_pattern(conn: socket.socket, n: int) -> None:
    full, rest = divmod(n, len(_PATTERN))
    view = memoryview(_PATTERN)
    for _ in range(full):
        conn.sendall(view)
    if rest:        # an empty send raises if the peer already reset after reading it all
        conn.sendall(view[:rest])


# ---------------------------------------------------------------- ClientHello bytes
def client_hello_bytes(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello produced by Python's ssl module (OpenSSL)."""
    return real_hello(server_name, alpn or ())


# ---------------------------------------------------------------- the proxy
class ProxyProcess:
    def __init__(self, config: dict, tmp: Path, env: dict | None = None, argv_prefix: list[str] | None = None):
        ebpf = config.get("ebpf")
        if isinstance(ebpf, dict) and "tcp_splice" not in ebpf and \
                "netns" not in (argv_prefix or []):
            # The tc splice attaches to every interface that is up: never in the root
            # namespace of a shared machine (its lo carries other tests). Its own tests run
            # the proxy in network namespaces they create (test_tcp_splice.py).
            config = {**config, "ebpf": {**ebpf, "tcp_splice": {"enabled": False}}}
        self.config = config
        self.tmp = tmp
        self.config_path = tmp / "config.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = tmp / "proxy.log"
        self.env = {**os.environ, **(env or {})}
        self.argv_prefix = argv_prefix or []
        self.proc: subprocess.Popen | None = None
        m = config.get("metrics_addr", "127.0.0.1:9090")
        self.metrics_url = f"http://{m}" if m else None

    def start(self, wait: bool = True) -> "ProxyProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.argv_prefix, SNI_PROXY, "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        if wait:
            wait_until(self._healthy, 20, "the proxy's /healthz")
        return self

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict:
        code, body = self.get("/status")
        if code != 200:
            raise AssertionError(f"/status answered {code}: {body[:500]!r}\n{self.log()[-3000:]}")
        return json.loads(body)

    def metrics(self) -> str:
        return self.get("/metrics")[1].decode()

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples matching the given labels (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families
        total = 0.0
        for fam in text_string_to_metric_families(self.metrics()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def base_config(port: int, metrics_port: int, **over) -> dict:
    cfg = {
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_addr": f"127.0.0.1:{metrics_port}",
        "max_connections": 1000,
        "workers": 1,
        "routes": [],
        "default_backend": None,
        "timeouts": {"client_hello_s": 5, "connect_s": 5, "idle_s": 60, "shutdown_grace_s": 5},
    }
    cfg.update(over)
    return cfg


def curl(url_host: str, port: int, path: str, ca: Path, *, extra: list[str] | None = None,
         timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(int(timeout)), "--cacert", str(ca),
         "--resolve", f"{url_host}:{port}:127.0.0.1", *(extra or []),
         f"https://{url_host}:{port}{path}"],
        capture_output=True, timeout=timeout + 5)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


PY = sys.executable
