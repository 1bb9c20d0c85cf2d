"""bench/held_connections.py for real, small: 2,000 connections held through sni-proxy, each one
carrying a byte both ways at the end, and checks that notice a connection that stopped working."""
from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "held_connections.py"
N = 2000


def _bench_module():
    spec = importlib.util.spec_from_file_location("held_connections", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


held = _bench_module()


def _run(tmp_path: Path, *peers: str) -> dict[str, dict]:
    out = tmp_path / "held.jsonl"
    # Two client processes of 1,000 each: the multi-process, multi-source-address path.
    proc = subprocess.run([sys.executable, str(SCRIPT), "-n", str(N), "--peers", *peers,
                           "--per-client", "1000", "--open-timeout", "30", "--max-seconds", "120",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return {r["peer"]: r for r in map(json.loads, out.read_text().splitlines())}


def _assert_held(row: dict, *, fds_per_connection: int) -> None:
    assert row["clients"] == 2
    assert row["opened"] == N and row["failed"] == 0, row
    assert row["check_ok"] == N and row["check_bad"] == 0, row
    # The proxy really holds both sockets of every connection (and the splice relay its pipes).
    assert row["proxy_fds"] >= fds_per_connection * N, row
    assert row["ss_sockets"] == 2 * N, row
    assert row["proxy_processes"] >= 2              # supervisor + workers
    assert row["proxy_pss"] > row["proxy_pss_idle"] > 0, row
    assert row["user_bytes_per_conn"] > 0, row
    # Slab is machine-wide (other processes move it): only its presence is checked; the
    # sockets are counted in this network namespace: client, proxy (2) and backend per connection.
    assert "kernel_bytes_per_conn" in row and row["tcp_inuse"] >= 4 * N, row


def test_2000_connections_held_through_the_userspace_relay(tmp_path):
    rows = _run(tmp_path, "direct", "sniproxy:userspace")
    direct = rows["direct"]
    assert direct["opened"] == direct["check_ok"] == N and direct["proxy_processes"] == 0
    assert direct["ss_sockets"] == 2 * N            # client + backend side of each connection
    _assert_held(rows["sniproxy:userspace"], fds_per_connection=2)


def test_2000_connections_held_through_the_sockmap_relay(tmp_path):
    require_ebpf()
    rows = _run(tmp_path, "direct", "sniproxy:sockmap")
    _assert_held(rows["sniproxy:sockmap"], fds_per_connection=2)


@pytest.fixture
def backend(tmp_path):
    exe = held.build_backend(tmp_path)
    backends = held.start_backends(exe, [len(held.capture_hello("x.held.test"))], 60)
    yield backends
    backends.stop()


def test_the_checks_notice_dead_connections(backend):
    hello = held.capture_hello("x.held.test")
    target = ("127.0.0.1", backend.ports[0])
    sockets, errors = [], {}
    held._open_all(target, "127.0.0.1", 50, hello, 16, time.monotonic() + 20, sockets, errors)
    try:
        assert len(sockets) == 50 and not errors
        assert held._check_all(sockets, time.monotonic() + 20) == (50, 0)
        backend.procs[0].send_signal(signal.SIGKILL)     # every connection gets its FIN now
        backend.procs[0].wait(10)
        assert held._check_all(sockets, time.monotonic() + 20) == (0, 50)
    finally:
        for s in sockets:
            s.close()


def test_the_open_phase_counts_refusals():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]                 # bound, never listening: refused
        sockets, errors = [], {}
        held._open_all(("127.0.0.1", closed_port), "127.0.0.1", 20, b"\x16", 8,
                       time.monotonic() + 10, sockets, errors)
    assert not sockets
    assert sum(errors.values()) == 20 and all(k.startswith("open:") for k in errors), errors


def test_netns_mode_and_the_tcp_splice_guard(tmp_path):
    # tcp_splice would attach tc programs to lo: refused in the root namespace, before any work.
    proc = subprocess.run([sys.executable, str(SCRIPT), "-n", "10", "--peers", "sniproxy:tcp_splice"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0 and "run it with --netns" in proc.stderr
    # --netns: the whole run in a namespace of its own, deleted afterwards.
    out = tmp_path / "held.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "-n", "300", "--peers", "direct",
                           "sniproxy:userspace", "--netns", "--open-timeout", "30",
                           "--max-seconds", "60", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {r["peer"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["sniproxy:userspace"]["check_ok"] == 300
    # Only the namespace's sockets: its 4 per connection, not the host's others.
    assert 4 * 300 <= rows["sniproxy:userspace"]["tcp_inuse"] < 4 * 300 + 50
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "held-" not in listed
