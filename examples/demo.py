#!/usr/bin/env python3
"""`make demo`: two local TLS demo backends plus sni-proxy on examples/demo-config.json.

Backends (self-signed demo CA made here, in run/demo/):
  127.0.0.1:9441  "app"       serves app.demo.test and api-N.demo.example (regex route)
  127.0.0.1:9442  "wildcard"  serves *.demo.test
Try, in another terminal:
  curl --cacert run/demo/ca.pem --resolve app.demo.test:8443:127.0.0.1 https://app.demo.test:8443/
  curl http://127.0.0.1:9090/status
Ctrl-C stops everything.
"""
from __future__ import annotations

import datetime
import http.server
import json
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "run" / "demo"
CONFIG = Path(__import__("os").environ.get("SNI_PROXY_DEMO_CONFIG", ROOT / "examples" / "demo-config.json"))
BACKENDS = {"app": (9441, ["app.demo.test", "*.demo.example"]), "wildcard": (9442, ["*.demo.test"])}


def make_cert(ca_key, ca_name, names: list[str], stem: str) -> ssl.SSLContext:
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    crt, kf = WORK / f"{stem}.crt", WORK / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, kf)
    return ctx


def make_pki() -> dict[str, ssl.SSLContext]:
    WORK.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sni-proxy demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (WORK / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return {label: make_cert(ca_key, ca_name, names, label) for label, (_, names) in BACKENDS.items()}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        body = json.dumps({"backend": self.server.label, "host": self.headers.get("Host"),
                           "path": self.path, "via": "sni-proxy demo"}).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class TlsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, label: str, ctx: ssl.SSLContext):
        self.label = label
        super().__init__(("127.0.0.1", port), Handler)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)


def main() -> int:
    contexts = make_pki()
    for label, (port, _) in BACKENDS.items():
        server = TlsServer(port, label, contexts[label])
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(__doc__.split("\n", 1)[1])
    # Own session: a Ctrl-C reaches the proxy once, through the handler below, not twice.
    proxy = subprocess.Popen([str(ROOT / ".venv" / "bin" / "sni-proxy"), "--config", str(CONFIG)],
                             start_new_session=True)
    signal.signal(signal.SIGINT, lambda *_: proxy.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGTERM, lambda *_: proxy.send_signal(signal.SIGTERM))
    return proxy.wait()


if __name__ == "__main__":
    sys.exit(main())
