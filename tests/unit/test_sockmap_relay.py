"""The sockmap relay's state machine without root: a fake pair plays the kernel's counters.

The sockets are real (socketpairs), so half-close, resets and the bytes user space moves while
a direction is paused are observed at the far ends, as a client and a backend would see them.
The kernel side (what the BPF program redirected, kept, and what reached each send queue) is
the fake's counters, which each test moves as the kernel would.
"""
from __future__ import annotations

import asyncio
import select
import socket

import pytest

from sniproxy.ebpf.sockmap import ConnState
from sniproxy.relay.base import reset_on_close
from sniproxy.relay.sockmap import SockmapRelay

CLIENT, BACKEND = 0, 1


class FakeCounters:
    def __init__(self):
        self.seen: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        self.seen[name] = self.seen.get(name, 0) + n


class FakeWorker:
    def __init__(self, loop, *, limit=1000, backpressure=True):
        self.loop = loop
        self.max_inflight = limit
        self.backpressure = backpressure
        self.counters = FakeCounters()
        self.forgotten = []

    def forget(self, relay):
        self.forgotten.append(relay)


class FakePair:
    """The kernel's view of a pair: per side, bytes redirected from it, kept in it while
    paused, its FIN seen, bytes queued into its send queue, bytes it received."""

    def __init__(self):
        self.relay_ends = []         # the sockets the relay holds (client side, backend side)
        self.far_ends = []           # what the test holds: the client and the backend
        for _ in range(2):
            a, b = socket.socketpair()
            a.setblocking(False)
            self.relay_ends.append(a)
            self.far_ends.append(b)
        self.socks = tuple(self.relay_ends)
        # As WorkerKernel.try_relay leaves them: a worker that dies resets its clients; a clean
        # end of the relay turns it back to FIN.
        reset_on_close(*self.socks)
        self.cookies = (101, 202)
        self.base_acked = (0, 0)
        self.inserted = True
        self.redirected_ = [0, 0]
        self.passed = [0, 0]
        self.fin = [False, False]
        self.passing = [False, False]
        self.written = [0, 0]
        self.received = [0, 0]
        self.creds = []              # every set_cred call: (side, credit, copied, pause)
        self.removed = False

    def state(self, side):
        return ConnState(self.redirected_[side], self.passed[side], self.fin[side],
                         self.passing[side])

    def redirected(self, side):
        return self.redirected_[side]

    def counters(self):
        return tuple(self.redirected_)

    def written_since_insert(self, side):
        return self.written[side], self.written[side]

    def received_since_insert(self, side):
        return self.received[side]

    def inq(self, side):
        return len(self.socks[side].recv(1 << 20, socket.MSG_PEEK)) if self._readable(side) else 0

    def _readable(self, side):
        try:
            self.socks[side].recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False

    def acked(self, side):
        return self.written[side]

    def set_cred(self, side, *, credit, copied=0, pause=False):
        self.creds.append((side, credit, copied, pause))
        self.passing[side] = pause or self.passed[side] != copied

    def remove(self):
        self.removed = True
        self.inserted = False

    # the kernel moving bytes ------------------------------------------------------------
    def redirect(self, side, n):
        """The program redirected n bytes from `side` and they reached the peer's send queue."""
        self.redirected_[side] += n
        self.received[side] += n
        self.written[1 - side] += n

    def close(self):
        for s in self.relay_ends + self.far_ends:
            s.close()


async def _until(predicate, timeout=2.0):
    """Wait for a condition the relay's own timers make true (no fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture
def pair():
    p = FakePair()
    yield p
    p.close()


def _eof_at_far_end(sock: socket.socket) -> bool:
    sock.settimeout(2)
    return sock.recv(1) == b""


def test_both_directions_end_cleanly_once_every_byte_landed(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 5000)
        pair.received[CLIENT] += 1                     # its FIN
        pair.fin[CLIENT] = True
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        assert relay.done[CLIENT]                      # everything landed: backend shut at once
        pair.redirect(BACKEND, 7000)
        pair.fin[BACKEND] = True
        relay.on_socket_event(BACKEND, select.EPOLLRDHUP)
        result = await asyncio.wait_for(task, 2)
        assert (result.outcome, result.bytes_up, result.bytes_down) == ("ok", 5000, 7000)
        assert pair.removed and worker.forgotten == [relay]
    _run(main())
    assert _eof_at_far_end(pair.far_ends[BACKEND]) and _eof_at_far_end(pair.far_ends[CLIENT])
    linger = pair.socks[CLIENT].getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    assert linger[:4] == b"\0\0\0\0"                  # a clean end closes with FIN


def test_eof_waits_until_the_redirected_bytes_reached_the_peer(pair):
    """The FIN must not overtake bytes the kworker has not queued on the peer yet."""
    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirected_[CLIENT] = 4000                # redirected, not yet in the backend's queue
        pair.received[CLIENT] = 4001
        pair.fin[CLIENT] = True
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        assert not relay.done[CLIENT]
        pair.written[BACKEND] = 4000                   # the kworker caught up
        await _until(lambda: relay.done[CLIENT])
        relay.abort("shutdown", "test over")
        return await task
    result = _run(main())
    assert result.bytes_up == 4000
    assert _eof_at_far_end(pair.far_ends[BACKEND])


def test_a_paused_direction_moves_the_kept_bytes_then_resumes(pair):
    kept = b"k" * 3000

    async def main():
        worker = FakeWorker(asyncio.get_running_loop(), limit=1000)
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 1500)
        pair.written[BACKEND] -= 1500                  # 1500 bytes waiting in the redirect queue
        relay.on_credit(CLIENT)
        assert pair.creds[-1][3] is True and worker.counters.seen["pauses"] == 1
        # While paused the program keeps the client's bytes in its socket.
        pair.far_ends[CLIENT].sendall(kept)
        pair.passed[CLIENT] = len(kept)
        pair.written[BACKEND] += 1500                  # the backend drained the queue
        await _until(lambda: worker.counters.seen.get("resumes") == 1)
        relay.abort("shutdown", "test over")
        return worker, await task
    worker, result = _run(main())
    far = pair.far_ends[BACKEND]
    far.settimeout(2)
    got = b""
    while len(got) < len(kept):
        got += far.recv(65536)
    assert got == kept                                 # moved by user space, exactly once
    assert result.bytes_up == 1500 + len(kept)
    assert pair.creds[-1][2] == len(kept)              # copied == passed: the program resumes


def test_no_pause_while_the_other_direction_is_busy(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop(), limit=1000)
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(BACKEND, 5000)
        pair.written[CLIENT] -= 5000                   # the download is still queued
        pair.redirect(CLIENT, 1500)
        pair.written[BACKEND] -= 1500
        relay.on_credit(CLIENT)
        assert pair.creds[-1][3] is False and worker.counters.seen == {"over_limit": 1}
        relay.abort("shutdown", "test over")
        await task
    _run(main())


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def test_a_reset_backend_resets_the_client_too(pair):
    relay_end, backend = _tcp_pair()
    relay_end.setblocking(False)
    pair.socks = (pair.socks[CLIENT], relay_end)
    reset_on_close(*pair.socks)
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    backend.close()                                     # RST
    poller = select.poll()
    poller.register(relay_end, select.POLLERR | select.POLLHUP)
    assert poller.poll(2000), "the RST did not arrive"

    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        relay.on_socket_event(BACKEND, select.EPOLLERR | select.EPOLLHUP)
        return await asyncio.wait_for(task, 2)
    try:
        result = _run(main())
    finally:
        relay_end.close()
    assert result.outcome == "reset" and "Connection reset" in result.detail
    linger = pair.socks[CLIENT].getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    assert linger[:4] != b"\0\0\0\0"                  # the client gets a RST, not a FIN


def test_a_backend_reset_after_its_fin_is_a_normal_end(pair):
    """A server that sent its response and FIN, then closed, resets the connection when the
    client's TLS close_notify arrives: every byte reached the client, so the end is `ok`
    (the user-space relay, which no longer reads that socket, says the same)."""
    relay_end, backend = _tcp_pair()
    relay_end.setblocking(False)
    pair.socks = (pair.socks[CLIENT], relay_end)
    reset_on_close(*pair.socks)

    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(BACKEND, 700)                      # the response, then its FIN
        pair.fin[BACKEND] = True
        relay.on_socket_event(BACKEND, select.EPOLLRDHUP)
        assert relay.done[BACKEND] and not task.done()   # the client may still send
        backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        backend.close()                                  # RST after the FIN
        poller = select.poll()
        poller.register(relay_end, select.POLLERR)
        assert poller.poll(2000), "the RST did not arrive"
        relay.on_socket_event(BACKEND, select.EPOLLERR | select.EPOLLHUP)
        return await asyncio.wait_for(task, 2)
    try:
        result = _run(main())
    finally:
        relay_end.close()
    assert result.outcome == "ok" and "backend reset after its end" in result.detail
    assert result.bytes_down == 700


def test_abort_resets_and_reports_what_moved(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 123)
        pair.redirect(BACKEND, 456)
        relay.abort("shutdown", "grace over")
        return await task
    result = _run(main())
    assert (result.outcome, result.bytes_up, result.bytes_down) == ("shutdown", 123, 456)
    linger = pair.socks[CLIENT].getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    assert linger[:4] != b"\0\0\0\0"                  # close() will send RST


def test_idle_timeout_fires_when_nothing_moved(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=0.05)
        return await asyncio.wait_for(relay.run(), 2)
    result = _run(main())
    assert result.outcome == "idle_timeout"


# ---- EOF races ------------------------------------------------------------------------------
def _client_sends_then_closes(pair, kept: bytes) -> None:
    """The client's last bytes are kept by the program (paused, or a stale pause flag), then
    its FIN arrives; the relay hears of the EOF."""
    pair.far_ends[CLIENT].sendall(kept)
    pair.far_ends[CLIENT].shutdown(socket.SHUT_WR)
    pair.passed[CLIENT] = len(kept)
    pair.received[CLIENT] += len(kept) + 1           # the kept bytes and the FIN


async def _landed_after_the_move(relay, pair, kept: bytes) -> None:
    """User space moved the kept bytes; once TCP counts them written, the FIN may follow."""
    await _until(lambda: relay.copied[CLIENT] == len(kept))
    assert not relay.done[CLIENT]                      # moved, not yet in the send queue
    pair.written[BACKEND] += len(kept)
    await _until(lambda: relay.done[CLIENT])


def _read_until_eof(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return got
        got += chunk


def test_eof_while_paused_moves_the_kept_bytes_then_forwards_the_fin(pair):
    """The client sends more and closes while its direction is paused: the bytes the program
    kept reach the backend, and only then its FIN (never the FIN first, never bytes lost)."""
    kept = b"tail" * 700

    async def main():
        worker = FakeWorker(asyncio.get_running_loop(), limit=1000)
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 1500)
        pair.written[BACKEND] -= 1500                  # still in the redirect queue
        relay.on_credit(CLIENT)
        assert worker.counters.seen["pauses"] == 1
        _client_sends_then_closes(pair, kept)
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        assert not relay.done[CLIENT]                  # the mover owns the end now
        pair.written[BACKEND] += 1500                  # the backend drains the queue
        await _landed_after_the_move(relay, pair, kept)
        relay.abort("shutdown", "test over")
        return await task
    result = _run(main())
    assert _read_until_eof(pair.far_ends[BACKEND]) == kept
    assert result.bytes_up == 1500 + len(kept)


def test_bytes_kept_by_a_pause_that_raced_the_eof_are_moved_before_the_fin(pair):
    """No pause was asked, yet the program kept bytes (a verdict read a stale pause flag)
    when the EOF came: the end of the direction moves them first."""
    kept = b"raced" * 300

    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 800)
        _client_sends_then_closes(pair, kept)
        pair.passing[CLIENT] = True
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        await _landed_after_the_move(relay, pair, kept)
        relay.abort("shutdown", "test over")
        return await task
    result = _run(main())
    assert _read_until_eof(pair.far_ends[BACKEND]) == kept
    assert result.bytes_up == 800 + len(kept)


def test_a_credit_notification_after_the_eof_changes_nothing(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop(), limit=1000)
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirect(CLIENT, 5000)
        pair.received[CLIENT] += 1
        pair.fin[CLIENT] = True
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        assert relay.done[CLIENT]
        creds = list(pair.creds)
        relay.on_credit(CLIENT)                        # a late ring notification
        assert pair.creds == creds and "pauses" not in worker.counters.seen
        relay.abort("shutdown", "test over")
        await task
    _run(main())


def test_both_ends_close_at_once_and_the_relay_ends_once_the_late_bytes_land(pair):
    async def main():
        worker = FakeWorker(asyncio.get_running_loop())
        relay = SockmapRelay(worker, pair, idle_timeout_s=60)
        task = asyncio.ensure_future(relay.run())
        pair.redirected_[CLIENT] = 3000                # not yet in the backend's send queue
        pair.received[CLIENT] = 3001
        pair.fin[CLIENT] = True
        pair.redirect(BACKEND, 900)
        pair.fin[BACKEND] = True
        relay.on_socket_event(CLIENT, select.EPOLLRDHUP)
        relay.on_socket_event(BACKEND, select.EPOLLRDHUP)
        assert relay.done == [False, True] and not task.done()
        pair.written[BACKEND] = 3000                   # the kworker catches up
        return await asyncio.wait_for(task, 2)
    result = _run(main())
    assert (result.outcome, result.bytes_up, result.bytes_down) == ("ok", 3000, 900)
    assert _eof_at_far_end(pair.far_ends[BACKEND]) and _eof_at_far_end(pair.far_ends[CLIENT])
