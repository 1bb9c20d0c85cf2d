"""The sockmap relay kind: the kernel redirects each skb (sk_skb verdict), per worker.

    kernel = factory(metrics)                    # relay.datapath.KernelDataPath.worker_factory()
    relay = kernel.try_relay(client, backend, idle_timeout_s=300)   # None: use user space
    result = await relay.run()                   # RelayResult, like every relay

After the hand-over Python is off the data path: a worker waits on one epoll fd of its own
(registered on the event loop) for EPOLLRDHUP / errors of its sockets (asyncio cannot ask for
EPOLLRDHUP alone; waiting for EPOLLIN woke the proxy ~70 times per transfer, EPOLLRDHUP twice)
and for its ring buffer (backpressure notifications from the BPF program).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Any, Protocol

from sniproxy.ebpf import sockmap as sm
from sniproxy.ebpf.objects import Map
from sniproxy.ebpf.stats import CounterRow
from sniproxy.relay.base import RelayResult, fin_on_close, reset_on_close

log = logging.getLogger("sniproxy")

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_RDHUP = select.EPOLLRDHUP
_WATCH = select.EPOLLRDHUP | select.EPOLLET       # + EPOLLERR/EPOLLHUP, always reported
# How often a direction that saw EOF re-checks that its redirected bytes left (the kworker
# sends them after the EOF): starts fast, backs off, never slower than this.
DRAIN_CHECK_FIRST_S = 0.001
DRAIN_CHECK_MAX_S = 0.05
# A paused direction is checked this often until its peer has drained below half the limit.
RESUME_CHECK_FIRST_S = 0.002
RESUME_CHECK_MAX_S = 0.02
# After a resume, when to check that no skb was kept by a verdict that raced with it.
RESUME_RECHECK_S = 0.01
# Kept bytes are read only once the program has kept nothing new for this long (see _movable).
MOVE_QUIET_S = 0.002
# Moving the bytes a paused source kept: bytes per turn before re-checking. Each read takes
# everything kept (bounded by the source's receive buffer, tcp_rmem[2]): a read that split a
# kept message duplicated part of it on 6.18 (2 MSS inside 8 MiB reads, measured).
MOVE_BUDGET = 16 * 1024 * 1024
# Idle checks per idle timeout: the timeout fires between idle_s and (1 + 1/N) idle_s after the
# last byte. Each check costs two map lookups and two TCP_INFO calls: at the default
# idle_s=300 that is one check per connection every 37 s.
IDLE_CHECKS_PER_TIMEOUT = 8
# Events handled per epoll wake-up before yielding to the event loop.
EPOLL_BATCH = 512


class PairView(Protocol):
    """What the relay reads and writes of a connection pair in the kernel (`ebpf.sockmap.SockPair`;
    a fake in tests/unit/test_sockmap_relay.py drives the state machine without root)."""

    socks: tuple[socket.socket, socket.socket]
    cookies: tuple[int, int]
    base_acked: tuple[int, int]
    inserted: bool

    def state(self, side: int) -> sm.ConnState: ...
    def redirected(self, side: int) -> int: ...
    def counters(self) -> tuple[int, int]: ...
    def written_since_insert(self, side: int) -> tuple[int, int]: ...
    def received_since_insert(self, side: int) -> int: ...
    def inq(self, side: int) -> int: ...
    def acked(self, side: int) -> int: ...
    def set_cred(self, side: int, *, credit: int, copied: int = 0, pause: bool = False) -> None: ...
    def remove(self) -> None: ...


# ============================================================================== relay
class SockmapRelay:
    """One connection relayed by the kernel; same contract as proxy.relay.Relay.

    Side 0 is the client, side 1 the backend; direction `i` carries the bytes side i sends.
    """

    kind = "sockmap"

    def __init__(self, worker: "WorkerKernel", pair: "PairView", idle_timeout_s: float):
        self.worker = worker
        self.pair = pair
        self.loop = worker.loop
        self.idle_timeout_s = idle_timeout_s
        self.limit = worker.max_inflight
        self.eof = [False, False]
        self.done = [False, False]
        self.copied = [0, 0]            # kept bytes user space moved, per direction
        self.finished: asyncio.Future[RelayResult] = self.loop.create_future()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._drain_delay = [DRAIN_CHECK_FIRST_S, DRAIN_CHECK_FIRST_S]
        self._movers: list[asyncio.Task | None] = [None, None]
        self._activity: tuple = ()
        self._last_change = 0.0
        self._seen_passed = [(-1, 0.0), (-1, 0.0)]   # per direction: (`passed`, since when)
        self._final: list[sm.ConnState | None] = [None, None]   # a finished direction's counters

    async def run(self) -> RelayResult:
        # What _snapshot would read right after the hand-over, from values the pair already
        # has: four syscalls fewer per connection. Bytes the trigger flushed since then count
        # as activity, as they should.
        self._activity = (0, 0, 0, 0, *self.pair.base_acked)
        self._last_change = self.loop.time()
        self._later("idle", self.idle_timeout_s / IDLE_CHECKS_PER_TIMEOUT, self._check_idle)
        try:
            return await self.finished
        finally:
            self._teardown()

    def abort(self, outcome: str, detail: str = "") -> None:
        self._finish(outcome, detail, reset=True)

    # --- events from the worker's epoll and ring ---------------------------------------
    def on_socket_event(self, side: int, events: int) -> None:
        if self.finished.done():
            return
        if events & (select.EPOLLERR | select.EPOLLHUP):
            try:
                err = self.pair.socks[side].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as exc:
                err = exc.errno or errno.EBADF
            if err and self.done[side]:
                # The side had ended its direction (FIN, every byte delivered) and then
                # reset: a late write reached its closed socket, e.g. the TLS close_notify a
                # client sends after the server closed. Nothing of that side was lost; a
                # direct connection resets the same way; the user-space relay calls it ok.
                self._finish("ok", f"{_NAMES[side]} reset after its end "
                             f"({os.strerror(err)})", reset=True)
                return
            if err:
                self._finish("reset", f"{_NAMES[side]} {os.strerror(err)}", reset=True)
                return
        if events & (_RDHUP | select.EPOLLHUP) and not self.eof[side]:
            self.eof[side] = True
            self._finish_direction(side)

    def on_credit(self, side: int) -> None:
        """The BPF program says `side` passed its credit: give more, or pause it."""
        if self.finished.done() or self.eof[side] or self._movers[side] is not None:
            return
        try:
            inflight, redirected = self._inflight(side)
        except OSError:
            return
        if inflight >= self.limit and not (self.worker.backpressure and self._other_idle(side)):
            # No pause while the other direction carries data: its skbs queue on the same
            # psock as the kept ones, and pauses then duplicated segments (measured: 7 of 80
            # directions with 256 MiB each way at once; 0 of 250+ one-way transfers).
            self.worker.counters.add("over_limit")
            self.pair.set_cred(side, credit=redirected + self.limit, copied=self.copied[side])
        elif inflight >= self.limit:
            self.pair.set_cred(side, credit=redirected + self.limit, copied=self.copied[side],
                               pause=True)
            self.worker.counters.add("pauses")
            self._movers[side] = self.loop.create_task(self._paused(side))
        else:
            self.pair.set_cred(side, credit=redirected + self.limit - inflight,
                               copied=self.copied[side])

    def _other_idle(self, side: int) -> bool:
        """Nothing of the opposite direction is waiting to be sent into `side`'s socket."""
        other = 1 - side
        return self._movers[other] is None and (self.eof[other] or self._landed(other))

    def _inflight(self, side: int) -> tuple[int, int]:
        """(bytes of direction `side` waiting in the kernel's redirect queue, bytes redirected
        so far). Only that queue is unbounded: what already entered the peer's send queue is
        bounded by its send buffer, as on any TCP socket."""
        redirected = self.pair.redirected(side)
        written, _ = self.pair.written_since_insert(1 - side)
        return max(0, redirected + self.copied[side] - written), redirected

    def _landed(self, side: int, redirected: int | None = None) -> bool:
        """Every byte of direction `side` (redirected or copied) is in the peer's send queue."""
        if redirected is None:
            redirected = self.pair.redirected(side)
        written, _ = self.pair.written_since_insert(1 - side)
        return written >= redirected + self.copied[side]

    # --- direction end -------------------------------------------------------------------
    def _finish_direction(self, side: int) -> None:
        """EOF on `side`: shut the peer's writing once every byte before the FIN is queued on it."""
        if self.done[side] or self.finished.done() or self._movers[side] is not None:
            return                      # a paused direction's mover sees the EOF itself
        try:
            st = self.pair.state(side)
            ready = (self._all_taken(side, st) and st.passed == self.copied[side]
                     and self._landed(side, st.redirected))
        except OSError as exc:
            self._finish("reset", f"{_NAMES[side]}: {exc}", reset=True)
            return
        if st.passed > self.copied[side]:
            # Bytes were kept while pausing raced with the EOF: move them first.
            self._movers[side] = self.loop.create_task(self._paused(side))
            return
        if not ready:
            delay = self._drain_delay[side]
            self._drain_delay[side] = min(delay * 2, DRAIN_CHECK_MAX_S)
            self._later(f"drain{side}", delay, self._finish_direction, side)
            return
        self._final[side] = st        # nothing more can go through this direction
        self._shut_peer(side)

    def _shut_peer(self, side: int) -> None:
        self.done[side] = True
        try:
            self.pair.socks[1 - side].shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if all(self.done):
            self._finish("ok")

    # --- backpressure ---------------------------------------------------------------------
    async def _paused(self, side: int) -> None:
        """Direction `side` is paused: the program keeps its bytes in the source socket.

        Wait until the peer has drained to half the limit (and every redirected byte has
        landed, so order holds), move the kept bytes in user space, then ask the program to
        resume; it does once every kept byte was moved. At EOF, move the rest and shut.
        """
        src, dst = self.pair.socks[side], self.pair.socks[1 - side]
        try:
            while True:
                delay = RESUME_CHECK_FIRST_S
                while not (self._landed(side) and (self._all_taken(side) if self.eof[side]
                                                   else self._inflight(side)[0] <= self.limit // 2)):
                    await asyncio.sleep(delay)       # kernel counters: no event to wait for
                    delay = min(delay * 2, RESUME_CHECK_MAX_S)
                if not await self._move_kept(src, dst, side):
                    await asyncio.sleep(RESUME_CHECK_FIRST_S)   # kept bytes still on their way
                if self.eof[side] and self._all_taken(side):
                    if self.pair.state(side).passed == self.copied[side]:
                        break
                    continue
                redirected = self.pair.redirected(side)
                self.pair.set_cred(side, credit=redirected + self.limit,
                                   copied=self.copied[side], pause=False)
                if self.pair.state(side).passed == self.copied[side]:
                    self.worker.counters.add("resumes")
                    self._movers[side] = None
                    # A verdict that read the old `pause` may still keep one skb after this
                    # check; the program would then keep every later one too (copied !=
                    # passed). Look again once it surely finished.
                    self._later(f"kept{side}", RESUME_RECHECK_S, self._recheck_kept, side)
                    if self.eof[side]:
                        self._finish_direction(side)
                    return
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            self._finish("reset", f"{_NAMES[side]} (paused): {exc}", reset=True)
            return
        if not self.finished.done() and self._landed(side):
            self._shut_peer(side)
        elif not self.finished.done():
            self._movers[side] = None
            self._finish_direction(side)

    def _recheck_kept(self, side: int) -> None:
        if self.finished.done() or self._movers[side] is not None:
            return
        try:
            st = self.pair.state(side)
        except OSError:
            return
        if st.passing and st.passed > self.copied[side]:
            self._movers[side] = self.loop.create_task(self._paused(side))

    def _all_taken(self, side: int, st: sm.ConnState | None = None) -> bool:
        """After EOF on `side`: the program has seen every byte it received (none can arrive)."""
        if st is None:
            st = self.pair.state(side)
        # The FIN often rides on the last data segment (no zero-length skb): the received
        # count tells that the program has seen every byte (+1: the FIN's sequence number).
        return st.fin or st.redirected + st.passed >= self.pair.received_since_insert(side) - 1

    def _movable(self, side: int) -> int:
        """Kept bytes that may be read and written to the peer now (0: not yet).

        Only once every byte redirected *before* them is in the peer's send queue, every kept
        byte is on the psock's queue, and the source is quiet: `passed` has not moved for
        MOVE_QUIET_S. Reading the psock queue while the program was still appending to it
        duplicated or reordered a segment now and then on 6.18 (docs/kernel-datapath.md);
        once the kept bytes fill the source's receive buffer TCP's window is closed and no
        skb can arrive during the read.
        """
        first = self.pair.state(side)
        now = self.loop.time()
        if first.passed != self._seen_passed[side][0]:
            self._seen_passed[side] = (first.passed, now)
        quiet = now - self._seen_passed[side][1] >= MOVE_QUIET_S
        if first.passed <= self.copied[side] or not self._landed_at(side, first.redirected):
            return 0
        if not quiet:
            return 0
        if self.pair.state(side).redirected != first.redirected:
            return 0
        kept = first.passed - self.copied[side]
        # Every kept byte must already be on the psock's queue (SIOCINQ answers from it): a
        # kept skb can wait in the psock's backlog behind skbs for the other direction, and
        # the kworker appending it while we read duplicated segments (measured).
        if self.pair.inq(side) != kept:
            return 0
        return kept

    def _landed_at(self, side: int, redirected: int) -> bool:
        written, _ = self.pair.written_since_insert(1 - side)
        return written >= redirected + self.copied[side]

    async def _move_kept(self, src: socket.socket, dst: socket.socket, side: int) -> int:
        """Copy the bytes the program kept in src to dst (bounded per call); bytes moved.

        Each batch is peeked, written to dst, and only then consumed. While it is merely
        peeked the source's receive buffer stays full, so TCP's window stays closed and the
        sender waits; the program is told to resume (`copied == passed`) before the consume
        reopens the window. The first skb that arrives after that is redirected, and it
        lands behind the kept bytes, which are already in dst's send queue. Consuming first
        would reopen the window early. The sender would then refill the buffer within
        microseconds on loopback. Those bytes would be kept too, and the direction would
        never resume.

        Never more than the program says it kept: a recv on a sockmap socket whose psock
        queue is empty reads the TCP receive queue directly, bypassing the program, and the
        program would later see that skb again (duplicated bytes, measured on 6.18).
        """
        moved = 0
        while moved < MOVE_BUDGET:
            kept = self._movable(side)
            if kept <= 0:
                break
            try:
                data = src.recv(kept, socket.MSG_PEEK)
            except BlockingIOError:
                break                    # still on its way to the psock queue
            if not data:
                break
            await self.loop.sock_sendall(dst, data)
            self.copied[side] += len(data)
            if len(data) == kept and not self.eof[side]:
                self.pair.set_cred(side, credit=self.pair.redirected(side) + self.limit,
                                   copied=self.copied[side], pause=False)
            self._consume(src, len(data))
            moved += len(data)
        return moved

    @staticmethod
    def _consume(src: socket.socket, n: int) -> None:
        """Drop the n peeked bytes, now in the peer's send queue: one read of exactly the
        messages peeked (never a part of one, see MOVE_BUDGET)."""
        got = len(src.recv(n))
        if got != n:
            raise OSError(errno.EPIPE, f"{n} kept bytes were peeked but {got} could be consumed")

    # --- idle ---------------------------------------------------------------------------
    def _snapshot(self) -> tuple:
        counts = self.pair.counters()
        acked = []
        for side in (0, 1):
            try:
                acked.append(self.pair.acked(side))
            except OSError:
                acked.append(-1)
        return (*counts, *self.copied, *acked)

    def _check_idle(self) -> None:
        """Kernel counters carry no timestamps: sample them every idle_s / IDLE_CHECKS_PER_TIMEOUT
        and time out once nothing moved since the sample where they last changed. (Sampling
        once per idle_s let a connection idle for up to twice idle_s.)"""
        if self.finished.done():
            return
        sample = self._snapshot()
        now = self.loop.time()
        if sample != self._activity:
            self._activity = sample
            self._last_change = now
        elif now - self._last_change >= self.idle_timeout_s:
            self._finish("idle_timeout", f"no bytes either way for {self.idle_timeout_s:.0f}s")
            return
        step = self.idle_timeout_s / IDLE_CHECKS_PER_TIMEOUT
        self._later("idle", min(step, self._last_change + self.idle_timeout_s - now), self._check_idle)

    # --- end ----------------------------------------------------------------------------
    def _later(self, key: str, delay: float, fn: Callable, *args: Any) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = self.loop.call_later(delay, fn, *args)

    def _finish(self, outcome: str, detail: str = "", *, reset: bool = False) -> None:
        if self.finished.done():
            return
        counts = []
        for side in (0, 1):
            final = self._final[side]
            try:
                counts.append(final.redirected if final is not None else self.pair.redirected(side))
            except OSError:
                counts.append(0)
        up, down = counts[0] + self.copied[0], counts[1] + self.copied[1]
        # Out of the maps before anything is closed or reset: nothing may still be redirected.
        self._teardown()
        if not reset:
            fin_on_close(*self.pair.socks)
        self.finished.set_result(RelayResult(up, down, outcome, detail))

    def _teardown(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        current = _current_task()
        for task in self._movers:
            if task is not None and not task.done() and task is not current:
                task.cancel()
        if self.pair.inserted:
            self.worker.forget(self)
            self.pair.remove()


_NAMES = ("client", "backend")
# The seed's reasons for "socket pair registration failed", by fallback reason (metric label).
_REGISTRATION_FAILURE = {
    "map_full": "map full",
    "close_wait": "socket closed",
    "socket_error": "socket closed",
    "duplicate": "already registered",
    "insert_error": "insert error",
}


class FailedHandOver:
    """A pair that entered the maps only partly after bytes were redirected: reset both."""

    kind = "sockmap"

    def __init__(self, socks: tuple[socket.socket, socket.socket], detail: str):
        self.socks = socks
        self.detail = detail

    async def run(self) -> RelayResult:
        reset_on_close(*self.socks)
        return RelayResult(0, 0, "reset", self.detail)

    def abort(self, outcome: str, detail: str = "") -> None:
        pass


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


# ============================================================================== worker side
class WorkerKernel:
    """What one worker process uses: try_relay for the sockmap, dns_shared (the BPF level of
    the DNS cache) for the resolver."""

    def __init__(self, owner, metrics, ring: Map | None, ring_index: int,
                 counters: CounterRow):
        self.owner = owner
        self.metrics = metrics
        self.config = owner.config
        self.sockmap_on = owner.modes.running("sockmap") and owner.sockmap is not None
        self.maps = owner.sockmap.maps if owner.sockmap is not None else None
        self.ring = ring
        self.ring_index = ring_index
        self.counters = counters
        sockmap_cfg = owner.config.ebpf.sockmap
        self.max_inflight = sockmap_cfg.max_inflight_bytes
        self.backpressure = sockmap_cfg.backpressure
        self.sndbuf = sockmap_cfg.sndbuf_bytes
        self.sndbuf_forced = owner.sndbuf_force_ok
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tcp_splice = None          # relay.tcpsplice.WorkerSplice, set by the factory
        self._epoll: select.epoll | None = None
        self._ring_reader: sm.RingReader | None = None
        self._by_fd: dict[int, tuple[SockmapRelay, int]] = {}
        self._by_cookie: dict[int, tuple[SockmapRelay, int]] = {}
        self._warned: set[str] = set()
        self.dns_shared = None
        if owner.dns_map is not None and owner.modes.running("dns_cache"):
            from sniproxy.ebpf.dnscache import SharedDnsMap
            self.dns_shared = SharedDnsMap(owner.dns_map.map, counters)

    # --- event loop plumbing --------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._epoll is not None:
            return
        self.loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        if self.ring is not None:
            self._ring_reader = sm.RingReader(self.ring)
            self._epoll.register(self._ring_reader.fileno(), select.EPOLLIN)
        self.loop.add_reader(self._epoll.fileno(), self._on_epoll)

    def _on_epoll(self) -> None:
        try:
            events = self._epoll.poll(0, EPOLL_BATCH)
        except InterruptedError:
            return
        ring_fd = self._ring_reader.fileno() if self._ring_reader is not None else -1
        for fd, ev in events:
            if fd == ring_fd:
                for cookie in self._ring_reader.drain():
                    entry = self._by_cookie.get(cookie)
                    if entry is not None:
                        entry[0].on_credit(entry[1])
                continue
            entry = self._by_fd.get(fd)
            if entry is not None:
                entry[0].on_socket_event(entry[1], ev)

    # --- hand-over ----------------------------------------------------------------------
    def try_relay(self, client: socket.socket, backend: socket.socket, *,
                  idle_timeout_s: float) -> SockmapRelay | None:
        """Hand the pair to the kernel; None (counted, with the reason) means use user space."""
        if not self.sockmap_on:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("socket pair registration failed (program not loaded): sockmap is %s; "
                          "the user-space relay carries this connection",
                          self.owner.modes.state("sockmap"))
            return None
        self._ensure_loop()
        active = self.owner.counters.total("inserted") - self.owner.counters.total("removed")
        if 2 * (active + 1) > self.maps.max_entries:
            return self._fallback("map_full", "Map capacity full: "
                                  f"{active} connections use the {self.maps.max_entries}-entry "
                                  "sockmap (raise ebpf.sockmap.max_entries)")
        try:
            if self.sndbuf:
                opt = SO_SNDBUFFORCE if self.sndbuf_forced else socket.SO_SNDBUF
                for sock in (client, backend):
                    sock.setsockopt(socket.SOL_SOCKET, opt, self.sndbuf)
            pair = sm.SockPair(self.maps, client, backend, ring_index=self.ring_index,
                               credit_bytes=self.max_inflight)
            pair.insert()
        except sm.InsertError as exc:
            if exc.bytes_in_kernel:
                # Half in: the kernel already forwards some bytes; a user-space relay now would
                # race them and reorder the stream. Reset this connection instead (loudly).
                self.counters.add(f"fallback_{exc.reason}")
                log.warning("socket pair registration failed (%s): %s after %d bytes were "
                            "already redirected; resetting this connection rather than risk "
                            "reordering it", _REGISTRATION_FAILURE.get(exc.reason, exc.reason),
                            exc, exc.bytes_in_kernel)
                return FailedHandOver((client, backend), f"{exc} (half-inserted)")
            return self._fallback(exc.reason, str(exc))
        except OSError as exc:
            return self._fallback("socket_error", f"cannot read the socket state: {exc}")
        self.counters.add("inserted")
        # Until the relay ends cleanly a close resets both sides: if this worker dies (SIGKILL)
        # the kernel closes its sockets, and the clients must see a broken connection, not a
        # clean end of a truncated stream. A clean end restores the FIN (_finish).
        reset_on_close(client, backend)
        relay = SockmapRelay(self, pair, idle_timeout_s)
        for side, sock in enumerate(pair.socks):
            self._by_fd[sock.fileno()] = (relay, side)
            self._by_cookie[pair.cookies[side]] = (relay, side)
            self._epoll.register(sock.fileno(), _WATCH)
        pair.trigger()        # flush what was queued before insertion, in order
        if log.isEnabledFor(logging.DEBUG):       # per connection: no argument work otherwise
            log.debug("socket pair registered: client fd %d, backend fd %d (cookies %d, %d)",
                      client.fileno(), backend.fileno(), *pair.cookies)
        return relay

    def forget(self, relay: SockmapRelay) -> None:
        for side, sock in enumerate(relay.pair.socks):
            fd = sock.fileno()
            if fd >= 0 and self._by_fd.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass
            self._by_cookie.pop(relay.pair.cookies[side], None)
        self.counters.add("removed")

    def _fallback(self, reason: str, message: str) -> None:
        self.counters.add(f"fallback_{reason}")
        why = _REGISTRATION_FAILURE.get(reason, reason)
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("socket pair registration failed (%s): %s; this connection (and later "
                        "ones for the same reason, counted in ebpf_sockmap_fallbacks_total) uses "
                        "the user-space relay", why, message)
        else:
            log.debug("socket pair registration failed (%s): %s", why, message)
        return None

    def active_relays(self) -> int:
        return len(self._by_fd) // 2

    def close(self) -> None:
        """Worker exit: release the epoll fd and ring mapping (maps belong to the supervisor)."""
        if self.tcp_splice is not None:
            self.tcp_splice.close()
        for relay, _ in list(self._by_fd.values()):
            relay.abort("shutdown", "worker exiting")
        if self._epoll is not None:
            if self.loop is not None and not self.loop.is_closed():
                try:
                    self.loop.remove_reader(self._epoll.fileno())
                except (ValueError, OSError):
                    pass
            self._epoll.close()
            self._epoll = None
        if self._ring_reader is not None:
            self._ring_reader.close()
            self._ring_reader = None
