"""The user-space relay (splice and copy) between real loopback TCP sockets, without a proxy.

Each test builds two connected pairs: (client, the relay's client side) and (the relay's
backend side, backend); the far ends are driven from threads with blocking sockets, as real
peers would be.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading

import pytest

from sniproxy.relay.userspace import PipePool, UserspaceRelay, splice_available

KINDS = ["copy"] + (["splice"] if splice_available() else [])


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
    near.setblocking(False)
    far.settimeout(20)
    return far, near


class Ends:
    def __init__(self):
        self.client, self.relay_client = _tcp_pair()
        self.relay_backend, self.backend = _tcp_pair()[::-1]

    def close(self):
        for s in (self.client, self.relay_client, self.relay_backend, self.backend):
            s.close()


@pytest.fixture
def ends():
    e = Ends()
    yield e
    e.close()


def _relay(ends: Ends, kind: str, idle: float = 30.0) -> UserspaceRelay:
    return UserspaceRelay(ends.relay_client, ends.relay_backend, use_splice=kind == "splice",
                          idle_timeout_s=idle, buffer_bytes=65536, pipes=PipePool())


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def _in_thread(fn, *args):
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:          # surfaced by the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _result(t, box):
    t.join(30)
    assert not t.is_alive(), "peer thread hung"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.parametrize("kind", KINDS)
def test_both_directions_exact_with_half_close(ends, kind):
    up, down = os.urandom(3 << 20), os.urandom(5 << 20)

    def client():
        ends.client.sendall(up)
        ends.client.shutdown(socket.SHUT_WR)          # half-close: the download goes on
        return _read_all(ends.client)

    def backend():
        got = _read_all(ends.backend)                  # until the client's FIN arrives
        ends.backend.sendall(down)
        ends.backend.shutdown(socket.SHUT_WR)
        return got

    async def main():
        tc, bc = _in_thread(client)
        tb, bb = _in_thread(backend)
        result = await asyncio.wait_for(_relay(ends, kind).run(), 30)
        return result, _result(tc, bc), _result(tb, bb)

    result, client_got, backend_got = asyncio.run(main())
    assert hashlib.sha256(backend_got).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(client_got).digest() == hashlib.sha256(down).digest()
    assert (result.outcome, result.bytes_up, result.bytes_down) == ("ok", len(up), len(down))


@pytest.mark.parametrize("kind", KINDS)
def test_a_backend_reset_reaches_the_client_as_a_reset(ends, kind):
    def backend():
        ends.backend.recv(100)
        ends.backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        ends.backend.close()                           # RST

    def client():
        ends.client.sendall(b"hello")
        try:
            _read_all(ends.client)
        except ConnectionResetError:
            return "reset"
        return "eof"

    async def main():
        tb, bb = _in_thread(backend)
        tc, bc = _in_thread(client)
        result = await asyncio.wait_for(_relay(ends, kind).run(), 30)
        _result(tb, bb)
        ends.relay_client.close()                      # what the proxy does after run()
        return result, _result(tc, bc)

    result, seen = asyncio.run(main())
    assert result.outcome == "reset"
    assert seen == "reset"                             # never a clean EOF that looks complete


@pytest.mark.parametrize("kind", KINDS)
def test_a_slow_reader_holds_the_sender_back(ends, kind):
    """Flow control: with a backend that does not read, the relay holds at most one pump of
    bytes and the client's sends stop (TCP's window), instead of buffering without bound."""
    ends.client.settimeout(0.5)

    def client():
        sent = 0
        block = b"x" * 65536
        try:
            while sent < (256 << 20):
                sent += ends.client.send(block)
        except socket.timeout:
            return sent
        return sent

    async def main():
        relay = _relay(ends, kind)
        task = asyncio.ensure_future(relay.run())
        tc, bc = _in_thread(client)
        while tc.is_alive():
            await asyncio.sleep(0.01)
        sent = _result(tc, bc)
        pending = relay.up.pump.pending
        capacity = relay.up.pump.capacity
        relay.abort("shutdown", "test over")
        await task
        return sent, pending, capacity

    sent, pending, capacity = asyncio.run(main())
    assert sent < (256 << 20)                          # the sender was stopped
    assert pending <= capacity


@pytest.mark.parametrize("kind", KINDS)
def test_idle_connections_are_closed_without_a_reset(ends, kind):
    async def main():
        return await asyncio.wait_for(_relay(ends, kind, idle=0.1).run(), 5)

    result = asyncio.run(main())
    assert result.outcome == "idle_timeout"


@pytest.mark.parametrize("kind", KINDS)
def test_abort_reports_the_bytes_it_moved(ends, kind):
    async def main():
        relay = _relay(ends, kind)
        task = asyncio.ensure_future(relay.run())
        ends.client.sendall(b"a" * 1000)
        got = b""
        while len(got) < 1000:
            got += await asyncio.get_running_loop().run_in_executor(None, ends.backend.recv, 4096)
        relay.abort("shutdown", "grace over")
        return await task

    result = asyncio.run(main())
    assert (result.outcome, result.bytes_up) == ("shutdown", 1000)
