"""The worker's callback path (issue 14): a connection whose ClientHello is complete at accept
and whose route is a direct IP backend is served without a Task, by callbacks on a small record.

In-process: a real proxy.server.Worker + ProxyApp (user-space relay, no eBPF needed) on this
test's event loop, real sockets on loopback, so the tests can see which path a connection took.
"""
from __future__ import annotations

import asyncio
import functools
import socket

import pytest

from sniproxy.config import parse_config
from sniproxy.proxy.app import ProxyApp
from sniproxy.proxy.server import Worker, create_listener
from sniproxy.telemetry.metrics import ProxyMetrics
from tests.integration.harness import client_hello_bytes

HELLO = client_hello_bytes("cb.test")
BOUND_S = 10.0          # every wait in these tests


def on_loop(test):
    """Run an async test on a fresh event loop (bounded)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 3 * BOUND_S))
    return run


class Proxy:
    """One in-process worker whose access-log records land in `self.records`."""

    def __init__(self, backend_port: int, *, connect_s: float = 5.0):
        self.lsock = create_listener("127.0.0.1", 0, backlog=64, reuse_port=False)
        self.port = self.lsock.getsockname()[1]
        config = parse_config({
            "listen_addr": f"127.0.0.1:{self.port}", "metrics_addr": None, "workers": 1,
            "routes": [{"match": "cb.test", "backend": f"127.0.0.1:{backend_port}"}],
            "log": {"level": "warning", "access_log": True},
            "timeouts": {"connect_s": connect_s},
            "ebpf": {"enabled": False},
        })
        self.metrics = ProxyMetrics()
        self.app = ProxyApp(config, self.metrics)
        self.records: list[tuple] = []
        self.ended = asyncio.Event()
        self.app.access_logger = self._record
        self.worker = Worker(self.app, [self.lsock])
        self.worker.start()

    def _record(self, info, result, duration) -> None:
        self.records.append((info.route, info.relay, info.backend, result.outcome, result.detail,
                             result.bytes_up, result.bytes_down))
        self.ended.set()

    async def ended_once(self) -> tuple:
        await asyncio.wait_for(self.ended.wait(), BOUND_S)
        assert len(self.records) == 1, self.records
        return self.records[0]

    def connect_failures(self, kind: str) -> float:
        return sum(s.value for fam in self.metrics.registry.collect() for s in fam.samples
                   if s.name == "sniproxy_upstream_connect_failures_total"
                   and s.labels.get("upstream") == "direct" and s.labels.get("kind") == kind)


async def _client(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), BOUND_S)
    await loop.sock_sendall(s, HELLO)
    return s


async def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), BOUND_S)
        if not chunk:
            break
        out += chunk
    return out


def _full_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full (backlog 0, one connection waiting): the next
    SYN is dropped, so a connect to it stays in SYN_SENT until the queue has room."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    filler = socket.create_connection(lst.getsockname(), timeout=BOUND_S)
    return lst, filler


@on_loop
async def test_common_connection_is_relayed_without_a_task():
    loop = asyncio.get_running_loop()
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    backend.setblocking(False)
    proxy = Proxy(backend.getsockname()[1])
    client = await _client(proxy.port)
    try:
        server_side, _ = await asyncio.wait_for(loop.sock_accept(backend), BOUND_S)
        assert await _recv_exactly(server_side, len(HELLO)) == HELLO
        # Relayed, on the callback path: a record, no Task.
        assert len(proxy.worker.fast) == 1 and not proxy.worker.active
        await loop.sock_sendall(server_side, b"pong")
        assert await _recv_exactly(client, 4) == b"pong"
        client.shutdown(socket.SHUT_WR)
        assert await _recv_exactly(server_side, 1) == b""
        server_side.close()
        route, relay, addr, outcome, _, up, down = await proxy.ended_once()
        assert (route, outcome, up, down) == ("cb.test", "ok", len(HELLO), 4)
        assert relay in ("splice", "copy") and addr == f"127.0.0.1:{backend.getsockname()[1]}"
        assert proxy.worker.open == 0 and not proxy.worker.fast
    finally:
        client.close()
        backend.close()
        await proxy.worker.drain(0)


@on_loop
async def test_connect_that_waits_on_the_loop_then_relays():
    loop = asyncio.get_running_loop()
    lst, filler = _full_listener()
    proxy = Proxy(lst.getsockname()[1])
    client = await _client(proxy.port)
    try:
        # The proxy's SYN was dropped: it waits for the backend on the loop, still no Task.
        await asyncio.sleep(0.2)        # nothing to await: the point is that nothing happens
        assert len(proxy.worker.fast) == 1 and not proxy.worker.active and not proxy.records
        first, _ = lst.accept()         # room in the queue: the SYN retransmission gets in
        first.close()
        lst.settimeout(BOUND_S)
        server_side, _ = await loop.run_in_executor(None, lst.accept)
        server_side.settimeout(BOUND_S)
        got = b""
        while len(got) < len(HELLO):
            got += await loop.run_in_executor(None, server_side.recv, 65536)
        assert got == HELLO
        server_side.close()
        client.close()
        route, _, _, outcome, _, up, _ = await proxy.ended_once()
        assert route == "cb.test" and up == len(HELLO) and outcome in ("ok", "reset")
    finally:
        client.close()
        filler.close()
        lst.close()
        await proxy.worker.drain(0)


@on_loop
async def test_connect_timeout_on_the_callback_path():
    lst, filler = _full_listener()
    port = lst.getsockname()[1]
    proxy = Proxy(port, connect_s=0.3)
    client = await _client(proxy.port)
    try:
        _, _, _, outcome, detail, _, _ = await proxy.ended_once()
        assert outcome == "connect_failed"
        assert f"connecting to 127.0.0.1:{port} timed out after 0.3s" in detail
        assert proxy.connect_failures("timeout") == 1
        assert await _recv_exactly(client, 1) == b""         # closed, FIN (hello consumed)
        assert proxy.worker.open == 0 and not proxy.worker.fast
    finally:
        client.close()
        filler.close()
        lst.close()
        await proxy.worker.drain(0)


@on_loop
async def test_refused_backend_on_the_callback_path():
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()                     # nobody listens there: connect() is refused at once
    proxy = Proxy(port)
    client = await _client(proxy.port)
    try:
        _, relay, _, outcome, detail, _, _ = await proxy.ended_once()
        assert (relay, outcome) == ("-", "connect_failed")
        assert "backend refused the connection" in detail
        assert proxy.connect_failures("refused") == 1
    finally:
        client.close()
        await proxy.worker.drain(0)


@pytest.mark.parametrize("stage", ["relaying", "connecting"])
@on_loop
async def test_drain_ends_callback_path_connections(stage):
    loop = asyncio.get_running_loop()
    filler = None
    if stage == "relaying":
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
    else:
        lst, filler = _full_listener()
    proxy = Proxy(lst.getsockname()[1])
    client = await _client(proxy.port)
    try:
        if stage == "relaying":
            lst.settimeout(BOUND_S)
            server_side, _ = await loop.run_in_executor(None, lst.accept)
            server_side.close()           # (half-)open on the proxy's side until the drain
        else:
            await asyncio.sleep(0.1)      # let the accept callback run and connect start
        assert len(proxy.worker.fast) == 1
        await asyncio.wait_for(proxy.worker.drain(0.05), BOUND_S)
        assert proxy.worker.open == 0 and not proxy.worker.fast
        assert [r[3] for r in proxy.records] in (["shutdown"], ["reset"], ["ok"])
        if stage == "connecting":
            assert proxy.records[0][3] == "shutdown"
    finally:
        client.close()
        lst.close()
        if filler is not None:
            filler.close()
