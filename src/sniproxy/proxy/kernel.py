"""The kernel data path seen from the proxy: start it, hand connections to it, report on it.

    ebpf = KernelDataPath.start(config)          # supervisor, before forking (raises KernelStartError)
    factory = ebpf.worker_factory()              # before each fork
    kernel = factory(metrics)                    # in the worker
    relay = kernel.try_relay(client, backend, idle_timeout_s=300)   # None: use user space
    result = await relay.run()                   # RelayResult, like the user-space Relay

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
import struct
from collections.abc import Callable
from typing import Any

from sniproxy.ebpf import sockmap as sm
from sniproxy.ebpf.modes import Modes, decide_modes
from sniproxy.ebpf.objects import BPF_MAP_TYPE_PERCPU_ARRAY, BpfError, Map
from sniproxy.ebpf.stats import BPF_STAT_NAMES, FALLBACK_REASONS, CounterRow, SharedCounters, hit_rate
from sniproxy.proxy.relay import RelayResult

log = logging.getLogger("sniproxy")

SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_LINGER_RESET = struct.pack("ii", 1, 0)
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
# Events handled per epoll wake-up before yielding to the event loop.
EPOLL_BATCH = 512


class KernelStartError(Exception):
    """Strict mode: a requested eBPF feature cannot run. The message lists each with its fix."""


# ============================================================================== relay
class SockmapRelay:
    """One connection relayed by the kernel; same contract as proxy.relay.Relay.

    Side 0 is the client, side 1 the backend; direction `i` carries the bytes side i sends.
    """

    kind = "sockmap"

    def __init__(self, worker: "WorkerKernel", pair: sm.SockPair, idle_timeout_s: float):
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
        self._seen_passed = [(-1, 0.0), (-1, 0.0)]   # per direction: (`passed`, since when)
        self._final: list[sm.ConnState | None] = [None, None]   # a finished direction's counters

    async def run(self) -> RelayResult:
        # What _snapshot would read right after the hand-over, from values the pair already
        # has: four syscalls fewer per connection. Bytes the trigger flushed since then count
        # as activity, as they should.
        self._activity = (0, 0, 0, 0, *self.pair.base_acked)
        self._later("idle", self.idle_timeout_s, self._check_idle)
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
        if sm.tcp_inq(self.pair.socks[side]) != kept:
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
        for sock in self.pair.socks:
            try:
                acked.append(sm.tcp_state_and_acked(sock)[1])
            except OSError:
                acked.append(-1)
        return (*counts, *self.copied, *acked)

    def _check_idle(self) -> None:
        if self.finished.done():
            return
        now = self._snapshot()
        if now == self._activity:
            self._finish("idle_timeout", f"no bytes either way for {self.idle_timeout_s:.0f}s")
            return
        self._activity = now
        self._later("idle", self.idle_timeout_s, self._check_idle)

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
        if reset:
            for sock in self.pair.socks:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
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


class FailedHandOver:
    """A pair that entered the maps only partly after bytes were redirected: reset both."""

    kind = "sockmap"

    def __init__(self, socks: tuple[socket.socket, socket.socket], detail: str):
        self.socks = socks
        self.detail = detail

    async def run(self) -> RelayResult:
        for sock in self.socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
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
    """What one worker process uses: try_relay for the sockmap, dns_cache for the resolver."""

    def __init__(self, owner: "KernelDataPath", metrics, ring: Map | None, ring_index: int,
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
        self._epoll: select.epoll | None = None
        self._ring_reader: sm.RingReader | None = None
        self._by_fd: dict[int, tuple[SockmapRelay, int]] = {}
        self._by_cookie: dict[int, tuple[SockmapRelay, int]] = {}
        self._warned: set[str] = set()
        self.dns_cache = None
        if owner.dns_map is not None and owner.modes.running("dns_cache"):
            from sniproxy.ebpf.dnscache import BpfDnsCache
            self.dns_cache = BpfDnsCache(owner.dns_map.map, counters)

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
                log.warning("sockmap: %s after %d bytes were already redirected; resetting "
                            "this connection rather than risk reordering it", exc,
                            exc.bytes_in_kernel)
                return FailedHandOver((client, backend), f"{exc} (half-inserted)")
            return self._fallback(exc.reason, str(exc))
        except OSError as exc:
            return self._fallback("socket_error", f"cannot read the socket state: {exc}")
        self.counters.add("inserted")
        relay = SockmapRelay(self, pair, idle_timeout_s)
        for side, sock in enumerate(pair.socks):
            self._by_fd[sock.fileno()] = (relay, side)
            self._by_cookie[pair.cookies[side]] = (relay, side)
            self._epoll.register(sock.fileno(), _WATCH)
        pair.trigger()        # flush what was queued before insertion, in order
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
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("sockmap: %s; this connection (and later ones for the same reason, "
                        "counted in ebpf_sockmap_fallbacks_total) uses the user-space relay", message)
        else:
            log.debug("sockmap fallback: %s", message)
        return None

    def active_relays(self) -> int:
        return len(self._by_fd) // 2

    def close(self) -> None:
        """Worker exit: release the epoll fd and ring mapping (maps belong to the supervisor)."""
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


# ============================================================================== supervisor side
class KernelDataPath:
    """Owns the BPF objects and shared maps; created once in the supervisor before forking."""

    def __init__(self, config, modes: Modes, sockmap: sm.SockmapDataPath | None, dns_map,
                 counters: SharedCounters, sndbuf_force_ok: bool):
        self.config = config
        self.modes = modes
        self.sockmap = sockmap
        self.dns_map = dns_map                  # dnscache.DnsMap or None
        self.counters = counters
        self.sndbuf_force_ok = sndbuf_force_ok
        self._spawned = 0
        self._rows = counters.rows
        self.stat_map: Map | None = sockmap.maps.stat if sockmap is not None else None

    # --- start ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config, support=None) -> "KernelDataPath":
        """Measure, decide each feature's mode, start what can run. Strict mode raises."""
        from sniproxy.ebpf.support import check_system_support

        requested = config.ebpf_requested()
        support = support if support is not None else check_system_support()
        failures: dict[str, str] = {}
        degraded: dict[str, str] = {}
        workers = config.workers
        rows = max(sm.MAX_RINGS, 2 * workers + 2)
        sockmap_dp = None
        want_sockmap = requested["sockmap"] and support.ok("sockmap")
        want_stats = requested["stats"] and support.ok("stats")
        stat_map = None
        if want_sockmap:
            try:
                sockmap_dp = sm.SockmapDataPath.load(config.ebpf.sockmap.max_entries,
                                                     stats_on=requested["stats"], rings=rows)
                stat_map = sockmap_dp.maps.stat
            except (BpfError, OSError) as exc:
                failures["sockmap"] = f"loading the sockmap program failed: {exc}"
        if want_stats and stat_map is None:
            # No program to count (the sockmap is off): the counters still exist, shared,
            # so /metrics keeps its shape. SOCKHASH maps need CAP_NET_ADMIN, this one does not.
            try:
                stat_map = Map.create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(BPF_STAT_NAMES),
                                      "sni_proxy_stat")
            except (BpfError, OSError) as exc:
                failures["stats"] = f"creating the per-CPU stats map failed: {exc}"
        sndbuf_ok = _sndbuf_force_allowed()
        if config.ebpf.sockmap.sndbuf_bytes and not sndbuf_ok:
            degraded["sockmap"] = (
                f"ebpf.sockmap.sndbuf_bytes={config.ebpf.sockmap.sndbuf_bytes} cannot be forced "
                "(SO_SNDBUFFORCE needs CAP_NET_ADMIN): the send buffer is capped by "
                "net.core.wmem_max, which cut sockmap throughput from ~1.7 GB/s to ~0.6 GB/s here; "
                "fix: grant CAP_NET_ADMIN or raise net.core.wmem_max")
        dns_map = None
        if requested["dns_cache"] and support.ok("dns_cache"):
            from sniproxy.ebpf.dnscache import open_dns_map
            try:
                dns_map = open_dns_map(config.ebpf.dns_cache.max_entries,
                                       config.ebpf.dns_cache.pin_path)
            except (BpfError, OSError) as exc:
                failures["dns_cache"] = (f"creating the BPF LRU map failed: {exc}; the per-worker "
                                         "in-memory DNS cache is used")
        modes = decide_modes(requested, support, failures=failures, degraded=degraded)
        self = cls(config, modes, sockmap_dp, dns_map, SharedCounters(rows), sndbuf_ok)
        self.stat_map = stat_map
        missing = modes.unavailable()
        if config.fallback_mode == "strict" and any(f.state != "degraded" for _, f in missing):
            self.close()
            lines = [f"  {name}: {f.reason}" for name, f in missing if f.state != "degraded"]
            raise KernelStartError(
                "eBPF strict mode (fallback_mode \"strict\"): requested feature(s) cannot run:\n"
                + "\n".join(lines)
                + "\nfix the cause above, disable the feature in ebpf.*, or set fallback_mode "
                  "to \"auto\" to run with what works")
        for name, f in missing:
            if f.state == "degraded":
                log.warning("eBPF %s degraded: %s", name, f.reason)
            else:
                log.warning("eBPF %s disabled: %s; %s", name, f.reason, _FALLBACK_TEXT[name])
        if dns_map is not None:
            log.info("eBPF DNS cache: %s", dns_map.note)
        if modes.running("sockmap"):
            if config.ebpf.sockmap.backpressure:
                log.info("eBPF sockmap backpressure: a direction pauses above max_inflight_bytes="
                         "%d in the kernel's queue (not while the other direction is busy: "
                         "then the excess is counted in ebpf_sockmap_inflight_over_limit_total)",
                         config.ebpf.sockmap.max_inflight_bytes)
            else:
                log.warning("ebpf.sockmap.backpressure is off: a slow receiver lets the kernel "
                            "queue without bound (counted in "
                            "ebpf_sockmap_inflight_over_limit_total); set it to true to bound it")
        log.info("eBPF data path: mode %s (sockmap %s, dns_cache %s, stats %s)", modes.mode,
                 modes.state("sockmap"), modes.state("dns_cache"), modes.state("stats"))
        return self

    # --- workers --------------------------------------------------------------------------
    def worker_factory(self) -> Callable[[Any], WorkerKernel]:
        """Call before each fork: reserves this worker's ring and counter row in the parent."""
        index = self._spawned % self._rows
        self._spawned += 1
        row = self.counters.row(index)
        row.retire_active()
        ring = None
        if self.sockmap is not None and self.modes.running("sockmap"):
            ring = self.sockmap.new_ring(index)

        def make(metrics) -> WorkerKernel:
            return WorkerKernel(self, metrics, ring, index, row)

        return make

    # --- views ----------------------------------------------------------------------------
    def status(self) -> dict:
        out = self.modes.status()
        if self.dns_map is not None:
            out["pinning"] = "on" if self.dns_map.pinned_at else "off"
            if self.dns_map.pinned_at:
                out["pin_path"] = self.dns_map.pinned_at
            else:
                out["reasons"]["pinning"] = self.dns_map.note
        else:
            out["pinning"] = "off"
        totals = self.counters.totals()
        out["active_connections"] = totals["inserted"] - totals["removed"]
        if self.sockmap is not None:
            try:
                out["map_entries"] = self.sockmap.entries()
            except BpfError:
                pass
        out["fallbacks"] = {r: totals[f"fallback_{r}"] for r in FALLBACK_REASONS}
        return out

    def collector(self) -> "KernelCollector":
        return KernelCollector(self)

    def close(self) -> None:
        if self.stat_map is not None and self.sockmap is None:
            self.stat_map.close()
        self.stat_map = None
        if self.sockmap is not None:
            try:
                self.sockmap.close()
            except BpfError as exc:
                log.warning("detaching the sockmap program: %s", exc)
            self.sockmap = None
        if self.dns_map is not None:
            self.dns_map.map.close()         # a pinned map lives on in bpffs, by design
            self.dns_map = None
        self.counters.close()


_FALLBACK_TEXT = {
    "sockmap": "connections use the user-space relay (splice/copy)",
    "dns_cache": "each worker uses its own in-memory DNS cache",
    "stats": "the ebpf_* per-CPU counters are not exported",
}


def _sndbuf_force_allowed() -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 1 << 20)
            return True
        except OSError:
            return False


# ============================================================================== metrics
class KernelCollector:
    """prometheus_client custom collector: read on each /metrics scrape in the supervisor."""

    def __init__(self, kdp: KernelDataPath):
        self.kdp = kdp

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kdp = self.kdp
        totals = kdp.counters.totals()
        modes = kdp.modes
        state = GaugeMetricFamily("ebpf_feature_state", "1 for the state each eBPF feature is in",
                                  labels=["feature", "state"])
        for name, f in modes.features.items():
            for s in ("active", "degraded", "disabled"):
                state.add_metric([name, s], 1.0 if f.state == s else 0.0)
        yield state
        active = totals["inserted"] - totals["removed"]
        yield GaugeMetricFamily("ebpf_active_connections",
                                "Connections relayed by the kernel now (all workers)", value=active)
        util = GaugeMetricFamily("ebpf_map_utilization", "Entries used / max_entries, by map",
                                 labels=["map"])
        if kdp.sockmap is not None:
            util.add_metric(["sockmap"], 2 * active / kdp.sockmap.maps.max_entries)
        if kdp.dns_map is not None:
            m = kdp.dns_map.map
            try:
                util.add_metric(["dns_cache"], len(m.lookup_batch()) / m.max_entries)
            except BpfError:
                pass
        yield util
        fallbacks = CounterMetricFamily("ebpf_sockmap_fallbacks",
                                        "Connections that could not enter the sockmap and used "
                                        "the user-space relay, by reason", labels=["reason"])
        for r in FALLBACK_REASONS:
            fallbacks.add_metric([r], totals[f"fallback_{r}"])
        yield fallbacks
        yield CounterMetricFamily("ebpf_sockmap_pauses",
                                  "Sources paused because max_inflight_bytes were in flight",
                                  value=totals["pauses"])
        yield CounterMetricFamily("ebpf_sockmap_inflight_over_limit",
                                  "Times a direction had more than max_inflight_bytes in the kernel "
                                  "and not paused (backpressure off, or the other direction busy)",
                                  value=totals["over_limit"])
        if modes.running("stats") and kdp.stat_map is not None:
            bpf = {n: kdp.stat_map.percpu_sum(i) for i, n in enumerate(BPF_STAT_NAMES)}
            redirects = CounterMetricFamily("ebpf_sockmap_redirects",
                                            "skbs redirected by the verdict program",
                                            labels=["direction"])
            redirects.add_metric(["client_to_backend"], bpf["up_skbs"])
            redirects.add_metric(["backend_to_client"], bpf["down_skbs"])
            yield redirects
            nbytes = CounterMetricFamily("ebpf_sockmap_redirected_bytes",
                                         "Bytes redirected by the verdict program",
                                         labels=["direction"])
            nbytes.add_metric(["client_to_backend"], bpf["up_bytes"])
            nbytes.add_metric(["backend_to_client"], bpf["down_bytes"])
            yield nbytes
            fails = CounterMetricFamily("ebpf_sockmap_redirect_failures",
                                        "skbs the program could not redirect", labels=["reason"])
            fails.add_metric(["peer_gone"], bpf["redirect_fail"])
            fails.add_metric(["no_peer"], bpf["no_peer"])
            yield fails
            yield CounterMetricFamily("ebpf_sockmap_fin_skbs_dropped",
                                      "Zero-length skbs (FIN) dropped by the verdict program",
                                      value=bpf["fin_drops"])
            notes = CounterMetricFamily("ebpf_sockmap_credit_notifications",
                                        "Backpressure notifications from the program",
                                        labels=["result"])
            notes.add_metric(["sent"], bpf["notify"])
            notes.add_metric(["lost"], bpf["notify_lost"])
            yield notes
        if kdp.dns_map is not None:
            l1, l2, miss = totals["dns_l1_hit"], totals["dns_l2_hit"], totals["dns_miss"]
            lookups = l1 + l2 + miss
            yield GaugeMetricFamily("ebpf_dns_cache_hit_rate",
                                    "DNS cache hits (either level) / lookups, all workers",
                                    value=hit_rate(l1 + l2, lookups))
            level = GaugeMetricFamily("ebpf_dns_cache_level_hit_rate",
                                      "Hit rate of each level: 1 = per-worker dict (all lookups), "
                                      "2 = shared BPF LRU map (lookups that missed level 1)",
                                      labels=["level"])
            level.add_metric(["1"], hit_rate(l1, lookups))
            level.add_metric(["2"], hit_rate(l2, l2 + miss))
            yield level
            counts = CounterMetricFamily("ebpf_dns_cache_lookups", "DNS cache lookups by result",
                                         labels=["result"])
            counts.add_metric(["l1_hit"], l1)
            counts.add_metric(["l2_hit"], l2)
            counts.add_metric(["miss"], miss)
            yield counts
