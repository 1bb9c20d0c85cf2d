"""The user-space relay kinds: splice(2) through a pipe, or a recv/send copy.

Two pumps share one state machine per direction:

* ``SplicePump``: ``splice(2)`` socket -> pipe -> socket; the payload never enters
  Python (measured here: about 4x less proxy CPU than a recv/send loop).
* ``CopyPump``: ``recv_into`` a bounded buffer, ``send`` it on; the last resort.

Flow control: a direction holds at most one pump's worth of bytes (the pipe or the
buffer). When the destination cannot take more, the source is no longer read, so
TCP's own window pushes back on the sender: a slow reader never makes the proxy
buffer without bound.

Half-close: EOF on one side becomes ``shutdown(SHUT_WR)`` on the other once every
byte read before it was written; the other direction keeps flowing until it ends
too. A reset on one side is propagated as a reset (``SO_LINGER`` 0) on the other.

The relay runs on raw non-blocking fds with ``loop.add_reader/add_writer`` so it
works the same under asyncio and uvloop, and so the kernel data path can take
over the very same sockets.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import time

from sniproxy.relay.base import RelayResult, reset_on_close

# Bytes one direction may hold in user space or in its pipe. 1 MiB pipes keep a
# bulk transfer at full speed on loopback (64 KiB pipes cost ~30% in throughput)
# while bounding memory per connection to 2 MiB in the worst case.
PIPE_SIZE = 1 << 20
# Work one readiness callback may do before yielding to other connections.
MAX_BYTES_PER_WAKEUP = 4 << 20

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_RESET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                 errno.ENETUNREACH, errno.ECONNABORTED)


class ConnectionReset(Exception):
    """One side reset the connection (or vanished); the relay resets the other."""


def _as_reset(exc: OSError) -> Exception:
    """The exception to raise for an IO error: ConnectionReset when the peer went away."""
    if exc.errno in _RESET_ERRNOS:
        return ConnectionReset(os.strerror(exc.errno))
    return exc


def splice_available() -> bool:
    """True when os.splice works on sockets here (Linux >= 2.6.17, Python >= 3.10)."""
    if not hasattr(os, "splice"):
        return False
    try:
        a, b = socket.socketpair()
        r, w = os.pipe()
        try:
            a.send(b"x")
            return os.splice(b.fileno(), w, 1) == 1
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()
    except OSError:
        return False


# Idle pipes a worker keeps (2 fds each): enough for the connections that start within the
# time a few end, not for a whole burst (a burst of 256 connections kept 512 fds for good).
MAX_IDLE_PIPES = 64
# A pipe unused for this long is closed: the pool follows the load down after a burst.
PIPE_IDLE_S = 5.0


class PipePool:
    """Empty pipes kept for the next connection.

    A new pipe costs pipe2 + F_SETPIPE_SZ and later two close(): four syscalls per
    direction, a third of a short connection's syscalls. Only pipes known to be empty
    come back here; a pipe that may hold bytes (a reset mid-transfer) is closed.
    Bounded (max_idle) and shrunk by trim(): the pool is a stack, so its bottom holds the
    pipes unused the longest, and trim() closes those idle for more than idle_s.
    """

    def __init__(self, max_idle: int = MAX_IDLE_PIPES, pipe_size: int = PIPE_SIZE,
                 idle_s: float = PIPE_IDLE_S):
        self.max_idle = max_idle
        self.pipe_size = pipe_size
        self.idle_s = idle_s
        self.idle: list[tuple[int, int, int]] = []
        self._since: list[float] = []          # when each idle pipe came back, same order

    def get(self) -> tuple[int, int, int]:
        if self.idle:
            self._since.pop()
            return self.idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            capacity = fcntl.fcntl(w, _F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            # pipe-max-size or the per-user pipe budget said no: keep the default 64 KiB.
            capacity = 65536
        return r, w, capacity

    def put(self, r: int, w: int, capacity: int, empty: bool) -> None:
        if empty and len(self.idle) < self.max_idle:
            self.idle.append((r, w, capacity))
            self._since.append(time.monotonic())
            return
        _close_pipe(r, w)

    def trim(self, now: float | None = None) -> int:
        """Close the pipes idle for more than idle_s; returns how many. Call now and then."""
        cutoff = (time.monotonic() if now is None else now) - self.idle_s
        n = 0
        while n < len(self._since) and self._since[n] <= cutoff:
            n += 1
        for r, w, _ in self.idle[:n]:
            _close_pipe(r, w)
        del self.idle[:n], self._since[:n]
        return n

    def close(self) -> None:
        for r, w, _ in self.idle:
            _close_pipe(r, w)
        self.idle.clear()
        self._since.clear()


def _close_pipe(r: int, w: int) -> None:
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


class SplicePump:
    """src socket -> pipe -> dst socket, never copying into Python."""

    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "pending", "capacity", "pool")

    def __init__(self, src: int, dst: int, pool: PipePool):
        self.src, self.dst = src, dst
        self.pool = pool
        self.pipe_r, self.pipe_w, self.capacity = pool.get()
        self.pending = 0

    def fill(self) -> int | None:
        """Move what is readable into the pipe. Bytes moved, 0 at EOF, None if nothing yet."""
        try:
            n = os.splice(self.src, self.pipe_w, self.capacity - self.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _as_reset(exc) from None
        self.pending += n
        return n

    def flush(self) -> int:
        """Write what the pipe holds to dst; returns bytes written."""
        written = 0
        while self.pending:
            try:
                n = os.splice(self.pipe_r, self.dst, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                raise _as_reset(exc) from None
            self.pending -= n
            written += n
        return written

    @property
    def full(self) -> bool:
        return self.pending >= self.capacity

    def close(self) -> None:
        self.pool.put(self.pipe_r, self.pipe_w, self.capacity, empty=self.pending == 0)


class CopyPump:
    """recv_into a bounded buffer, send it on. Used where splice is unavailable."""

    __slots__ = ("src", "dst", "buf", "view", "start", "end", "capacity")

    def __init__(self, src: socket.socket, dst: socket.socket, buffer_bytes: int = 65536):
        self.src, self.dst = src, dst
        self.buf = bytearray(buffer_bytes)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.capacity = buffer_bytes

    @property
    def pending(self) -> int:
        return self.end - self.start

    @property
    def full(self) -> bool:
        return self.end >= self.capacity

    def fill(self) -> int | None:
        if self.start == self.end:
            self.start = self.end = 0
        try:
            n = self.src.recv_into(self.view[self.end:])
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _as_reset(exc) from None
        self.end += n
        return n

    def flush(self) -> int:
        written = 0
        while self.start < self.end:
            try:
                n = self.dst.send(self.view[self.start:self.end])
            except BlockingIOError:
                break
            except OSError as exc:
                raise _as_reset(exc) from None
            self.start += n
            written += n
        if self.start == self.end:
            # Drained: reuse the buffer from its start (else `full` would stay true and
            # the direction would never read again).
            self.start = self.end = 0
        return written

    def close(self) -> None:
        self.view.release()


_TCP_CLOSE = 7


def _was_reset(sock: socket.socket, we_sent_fin: bool) -> bool:
    """A read returned 0 on `sock`: True when that end reset rather than sent a FIN.

    A pending error says so; else the TCP state: a FIN leaves the socket in CLOSE_WAIT, a RST
    in CLOSE. Once we sent our own FIN to it, CLOSE is also the end of a clean close (TIME_WAIT
    leaves the socket in CLOSE), so only the pending error can tell.
    """
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        if we_sent_fin:
            return False
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:
        return True


class _Direction:
    """One direction of a relay: read src while dst keeps up, then half-close."""

    __slots__ = ("relay", "pump", "src", "dst", "src_fd", "dst_fd", "moved", "eof", "done",
                 "reading", "writing")

    def __init__(self, relay: "UserspaceRelay", pump, src: socket.socket, dst: socket.socket):
        self.relay = relay
        self.pump = pump
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.moved = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self.on_readable()

    def on_readable(self) -> None:
        pump = self.pump
        budget = MAX_BYTES_PER_WAKEUP
        try:
            while budget > 0:
                room = pump.capacity - pump.pending
                n = pump.fill()
                if n is None:
                    break
                if n == 0:
                    if _was_reset(self.src, self.relay.other(self).done):
                        # The peer reset and another call already took the error (a splice
                        # that wrote part of its bytes returns their count and swallows it):
                        # this read only says 0. Forwarding that as a FIN would hand the other
                        # side a truncated stream that looks complete.
                        self.relay.reset(f"{self.name}: the peer reset the connection")
                        return
                    self.eof = True
                    break
                written = pump.flush()
                self.moved += written
                budget -= n
                if pump.pending or n < room:
                    # A short read means the socket is (very likely) drained: skip the
                    # read that would only say EAGAIN; epoll tells us when more arrives.
                    break
        except ConnectionReset as exc:
            self.relay.reset(f"{self.name} read/write: {exc}")
            return
        except OSError as exc:
            self.relay.reset(f"{self.name}: {exc}")
            return
        self.relay.touch()
        self._rearm()

    def on_writable(self) -> None:
        try:
            self.moved += self.pump.flush()
        except (ConnectionReset, OSError) as exc:
            self.relay.reset(f"{self.name} write: {exc}")
            return
        self.relay.touch()
        self._rearm()

    def _rearm(self) -> None:
        loop = self.relay.loop
        pending = self.pump.pending
        want_write = pending > 0
        want_read = not self.eof and not self.pump.full and not pending
        if want_write != self.writing:
            if want_write:
                loop.add_writer(self.dst_fd, self.on_writable)
            else:
                loop.remove_writer(self.dst_fd)
            self.writing = want_write
        if want_read != self.reading:
            if want_read:
                loop.add_reader(self.src_fd, self.on_readable)
            else:
                loop.remove_reader(self.src_fd)
            self.reading = want_read
        if self.eof and not pending and not self.done:
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.relay.direction_done()

    def stop(self) -> None:
        loop = self.relay.loop
        if self.reading:
            loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.dst_fd)
            self.writing = False
        self.pump.close()

    @property
    def name(self) -> str:
        return "client->backend" if self is self.relay.up else "backend->client"


class UserspaceRelay:
    """Relays client <-> backend until both directions ended, a reset, or idle timeout."""

    def __init__(self, client: socket.socket, backend: socket.socket, *, use_splice: bool,
                 idle_timeout_s: float, buffer_bytes: int = 65536, pipes: PipePool | None = None):
        self.loop = asyncio.get_running_loop()
        self.client, self.backend = client, backend
        self.kind = "splice" if use_splice else "copy"
        if use_splice:
            pipes = pipes or PipePool(max_idle=0)
            up = SplicePump(client.fileno(), backend.fileno(), pipes)
            try:
                down = SplicePump(backend.fileno(), client.fileno(), pipes)
            except OSError:
                up.close()
                raise
        else:
            up = CopyPump(client, backend, buffer_bytes)
            down = CopyPump(backend, client, buffer_bytes)
        self.up = _Direction(self, up, client, backend)
        self.down = _Direction(self, down, backend, client)
        self.idle_timeout_s = idle_timeout_s
        self.last_activity = time.monotonic()
        self.finished: asyncio.Future[RelayResult] = self.loop.create_future()
        self._idle_handle: asyncio.TimerHandle | None = None

    async def run(self) -> RelayResult:
        self.up.start()
        if not self.finished.done():
            self.down.start()
        if not self.finished.done():
            self._idle_handle = self.loop.call_later(self.idle_timeout_s, self._check_idle)
        try:
            return await self.finished
        finally:
            self._stop()

    def abort(self, outcome: str, detail: str = "") -> None:
        """End the relay from outside (shutdown grace over): reset both sides."""
        self._finish(outcome, detail, reset=True)

    # --- callbacks from the directions ---
    def other(self, direction: _Direction) -> _Direction:
        return self.down if direction is self.up else self.up

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._finish("ok")

    def reset(self, detail: str) -> None:
        self._finish("reset", detail, reset=True)

    def _check_idle(self) -> None:
        if self.finished.done():
            return
        idle = time.monotonic() - self.last_activity
        if idle >= self.idle_timeout_s:
            self._finish("idle_timeout", f"no bytes either way for {idle:.0f}s", reset=False)
        else:
            self._idle_handle = self.loop.call_later(self.idle_timeout_s - idle, self._check_idle)

    def _finish(self, outcome: str, detail: str = "", *, reset: bool = False) -> None:
        if self.finished.done():
            return
        if reset:
            reset_on_close(self.client, self.backend)
        self.finished.set_result(RelayResult(self.up.moved, self.down.moved, outcome, detail))

    def _stop(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        self.up.stop()
        self.down.stop()
