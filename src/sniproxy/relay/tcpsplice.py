"""The tcp_splice relay kind: after the ClientHello the kernel splices the two TCP connections
at the packet level (tc, see ebpf/tcpsplice.py); the end hosts talk TCP end to end.

    ws = WorkerSplice(datapath, ring, ring_index, counters, linger_s=60)  # one per worker
    relay = ws.try_relay(client, backend, idle_timeout_s=300)   # None: take the next kind
    result = await relay.run()                                  # RelayResult

Hand-over (docs/kernel-datapath.md has the sequence diagram):
1. Checks that need no change to anything (state, family, MSS, route, queues); a refusal
   here is counted by reason and the connection takes the next relay kind, untouched.
2. TCP_REPAIR reads of both sockets: the client socket's first unread byte (copied_seq),
   both write_seq, the backend socket's rcv_nxt, both timestamp clocks.
3. Both directions enter the flow map. From here the kernel splices every packet, and the
   egress hook drops whatever the client-side socket still sends.
4. User space reads everything queued in the client socket (the peeked ClientHello, any
   bytes after it) and writes it to the backend: those bytes sit exactly between the
   backend's write_seq and the first spliced byte (the deltas say so). The backend socket's
   segments below `handover_end` still pass the egress hook (retransmissions included).
5. The client socket is closed silently (repair mode: no FIN, no RST). The backend socket is
   kept (one fd per flow) so its local port is not reused while the 4-tuple is spliced;
   it is closed silently when the flow ends.
Steps 1-5 with the BPF socket reader run in one C call (sniproxy.ebpf._handover, issue 14)
when that extension is built; this module's Python path is the reference it mirrors, and
runs otherwise (TCP_REPAIR, sockets the reader does not answer, SNI_PROXY_HANDOVER=python).
Teardown: the BPF program reports on the worker's ring when both FINs were acknowledged or
a RST passed; run() returns then, the backend socket is closed, and the entries stay for
`linger_s` (retransmitted FINs and the last ACK must still be translated), like TIME_WAIT,
unless a new connection from the proxy reuses the local port (its SYN removes them). Idle timeout: from the flow's
last-seen time, checked in user space.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import struct
import logging
import os
import socket
import termios
import fcntl
import time

from sniproxy.ebpf import tcpsplice as ts
from sniproxy.ebpf.objects import BPF_ANY
from sniproxy.ebpf.sockstate import SS_USEC_TS
from sniproxy.relay.base import RelayResult

try:
    from sniproxy.ebpf import _handover
    _HANDOVER_MISSING = ""
except ImportError as _exc:            # not built (no compiler / python3-dev at install)
    _handover = None
    _HANDOVER_MISSING = str(_exc)

log = logging.getLogger("sniproxy")

# SNI_PROXY_HANDOVER=python: the Python hand-over even where the compiled one could run
# (tests of both paths, before/after benchmarks).
HANDOVER_ENV = "SNI_PROXY_HANDOVER"
_PYTHON_PATH = object()              # the compiled call did not answer: take the Python path

_TCP_ESTABLISHED = 1
_TCP_CLOSE = 7
_UNACKED = "bytes the proxy sent to the client are not acknowledged yet"
# Route lookups are cached this long per destination address (one netlink round trip each).
ROUTE_CACHE_S = 5.0
ROUTE_CACHE_MAX = 4096
# A handover larger than this is not read in one go (the client's receive buffer bounds it).
READ_CHUNK = 256 * 1024
# Flows left by a worker that died (SIGKILL, crash) are checked by its successor when the
# first of them may be removed (its linger or idle timeout over), at least this often ...
ORPHAN_CHECK_S = 5.0
# ... and at most this often (a flow that keeps sending is looked at again and again).
ORPHAN_CHECK_MIN_S = 0.2
# The BPF program wakes a worker for its end events only when a batch waits in its ring
# (SNI_PROXY_TS_RING_WAKE_BYTES): the worker drains it this often while it has flows. A
# finished connection is accounted (and its backend fd closed) at most this much later; a
# busy worker is no longer woken once per finished connection.
END_POLL_S = 0.05


def handover_mode(dp: ts.TcpSpliceDataPath) -> tuple[str, str]:
    """("compiled", "") when the hand-over runs in C, else ("python", why)."""
    wanted = os.environ.get(HANDOVER_ENV, "").strip().lower()
    if wanted == "python":
        return "python", f"{HANDOVER_ENV}=python in the environment"
    if wanted not in ("", "compiled"):
        log.warning("%s=%r is not a hand-over: use python or compiled (or leave it unset); "
                    "the default runs", HANDOVER_ENV, wanted)
    if _handover is None:
        return "python", (f"the compiled hand-over sniproxy.ebpf._handover is not built "
                          f"({_HANDOVER_MISSING}); fix: install gcc and python3-dev, then "
                          "reinstall the package")
    if dp.state_reader is None:
        return "python", ("the BPF socket-state reader is off, the TCP_REPAIR path runs in "
                          "Python (tcp_splice_detail.socket_state_detail says why)")
    return "compiled", ""


def _outq(sock: socket.socket) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    return int.from_bytes(buf, "little", signed=True)


class TcpSpliceRelay:
    """One spliced connection; same contract as relay.base.Relay."""

    kind = "tcp_splice"
    # Thousands of these live at once (every spliced connection, then its linger): slots,
    # and only the two flow-map keys of the entries (issue 14: held-connection memory).
    __slots__ = ("worker", "slot", "gen", "keys", "backend", "backend_fd", "pending",
                 "handed_over", "idle_timeout_s", "starts", "loop", "result", "_waiter",
                 "_on_done", "_idle", "removed")

    def __init__(self, worker: "WorkerSplice", slot: int, gen: int,
                 keys: tuple[bytes, bytes], backend: socket.socket,
                 pending: bytes, handed_over: int, idle_timeout_s: float,
                 starts: tuple[int, int]):
        self.worker = worker
        self.slot = slot
        self.gen = gen
        self.keys = keys
        self.backend = backend
        self.backend_fd = -1
        self.pending = pending              # hand-over bytes not yet written to the backend
        self.handed_over = handed_over      # client bytes user space wrote to the backend
        self.idle_timeout_s = idle_timeout_s
        self.starts = starts
        self.loop = worker.loop
        self.result: RelayResult | None = None        # set once, when the flow has ended
        self._waiter: asyncio.Future[RelayResult] | None = None     # run()'s
        self._on_done = None                          # start()'s callback
        self._idle: asyncio.TimerHandle | None = None
        self.removed = False

    def start(self, on_done) -> bool:
        """The relay without a coroutine: `on_done(RelayResult)` is called when the flow
        ends (from the end event, the idle check or an abort). False: bytes of the hand-over
        are still to be written, run() must drive it. (The callback path of the server: no
        coroutine, future or extra loop turn per connection.)"""
        if self.pending:
            return False
        self._on_done = on_done
        self._held()
        return True

    async def run(self) -> RelayResult:
        try:
            if self.pending:
                await self.loop.sock_sendall(self.backend, self.pending)
                self.pending = b""
        except OSError as exc:
            self._finish("reset", f"writing the hand-over bytes to the backend: {exc}",
                         linger=False)
        self._held()
        if self.result is not None:
            return self.result
        self._waiter = self.loop.create_future()
        return await self._waiter

    def _held(self) -> None:
        # The Python socket object goes back to the server (which closes it): keep the fd,
        # unless the flow is already out of the maps (then a normal close is right).
        if not self.removed:
            self.backend_fd = self.backend.detach()
        if self.result is None:
            deadline = self.loop.time() + self.idle_timeout_s
            # (slot, gen), not the relay: an ended relay is not kept until its first check
            if not self.worker.idle_checks.add(deadline, (self.slot, self.gen)):
                self._idle = self.loop.call_at(deadline, self._check_idle)

    def abort(self, outcome: str, detail: str = "") -> None:
        self._finish(outcome, detail, linger=False)

    # --- events ---------------------------------------------------------------------------
    def on_end(self, why: int, st=None) -> None:
        """`st`: the flow's final state from its end event (ts.FlowEnd); None: read it."""
        if st is None:
            try:
                st = self.worker.dp.flow(self.slot)
            except OSError:
                st = None
        if why != ts.EV_RST:
            self._finish("ok", linger=True, st=st)
            return
        side = st.rst_from if st is not None else None
        if side is not None and st.fin[side] and st.fin_acked[side]:
            # That side had ended (its FIN acknowledged: every byte it sent arrived), then
            # reset: a late write reached its closed socket, e.g. the TLS close_notify a
            # client sends after the server closed. As the other relays, a normal end.
            name = "client" if side == ts.C2B else "backend"
            self._finish("ok", f"the {name} reset after its end", linger=True, st=st)
            return
        self._finish("reset", "a RST went through the spliced flow", linger=True, st=st)

    def _check_idle(self) -> None:
        if self.result is not None:
            return
        try:
            st = self.worker.dp.flow(self.slot)
        except OSError:
            self._idle = self.loop.call_later(self.idle_timeout_s, self._check_idle)
            return
        if st.reported:                 # the ring event was lost (ring full): act on it now
            self.on_end(ts.EV_RST if st.rst else ts.EV_FIN, st)
            return
        quiet_s = (time.monotonic_ns() - st.last_ns) / 1e9
        if quiet_s >= self.idle_timeout_s:
            self._finish("idle_timeout", f"no packet either way for {self.idle_timeout_s:.0f}s",
                         linger=False)
            return
        self._idle = self.loop.call_later(self.idle_timeout_s - quiet_s + 0.01, self._check_idle)

    def _finish(self, outcome: str, detail: str = "", *, linger: bool, st=None) -> None:
        if self.result is not None:
            return
        if self._idle is not None:
            self._idle.cancel()
        up = down = 0
        try:
            if st is None:
                st = self.worker.dp.flow(self.slot)
            if st.gen == self.gen:
                # Sequence spans, not the sum of payloads (that counts retransmissions twice).
                # A direction that ended with a FIN ends exactly before it; otherwise the
                # highest byte seen (a plain max in BPF, which two CPUs can race).
                # (ts.seq_span, inline: this runs for every finished connection)
                start_up, start_down = self.starts
                up = ((st.fin_seq[0] - 1 if st.fin[0] else st.nxt[0]) - start_up) & 0xFFFFFFFF
                down = ((st.fin_seq[1] - 1 if st.fin[1] else st.nxt[1]) - start_down) & 0xFFFFFFFF
                up = max(self.handed_over, up)
        except OSError:
            pass
        self.worker.counters.add("ts_ended")
        if linger:
            self.worker.linger(self)
        else:
            # Entries out now: later packets from either end meet the proxy's stack, which
            # has no socket for them and answers with a RST.
            self.worker.remove(self)
        self.result = result = RelayResult(up, down, outcome, detail)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(result)
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            try:
                on_done(result)
            except Exception:       # the connection's end must not stop the event loop
                log.exception("tcp_splice: ending a connection")


class WorkerSplice:
    """What one worker uses: try_relay, the ring of end events, lingering flows."""

    def __init__(self, dp: ts.TcpSpliceDataPath, ring, ring_index: int, counters, *,
                 linger_s: float, max_flows: int, total_active=None, shared=None):
        self.dp = dp
        self.ring = ring
        self.ring_index = ring_index
        self.counters = counters
        self.shared = shared                 # stats.SharedCounters: to retire a dead worker's row
        self.linger_s = linger_s
        self.max_flows = max_flows
        self.total_active = total_active     # () -> flows in the maps over all workers
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: ts.EventRing | None = None
        self._by_slot: dict[int, TcpSpliceRelay] = {}
        self._gen = int(time.monotonic_ns()) & 0x7FFFFFFF
        self._routes: dict[str, tuple[float, int]] = {}
        self.handover, self.handover_detail = handover_mode(dp)
        # The compiled hand-over's route cache: peer address bytes -> (out ifindex, has
        # neighbours), cleared every ROUTE_CACHE_S by a timer (no timestamp per entry).
        self._routes_c: dict[bytes, tuple[int, bool]] = {}
        self._routes_timer: asyncio.TimerHandle | None = None
        self._end_poll: asyncio.TimerHandle | None = None
        self._warned: set[str] = set()
        self._cursor = (ring_index * 7919) % max(1, dp.max_flows)
        self.idle_timeout_s = 300.0
        # slot -> (flow-map keys, counted as ended here already)
        self._orphans: dict[int, tuple[list[bytes], bool]] = {}
        # First idle checks and ends of lingers: one loop timer each for all flows, not a
        # TimerHandle per flow (their deadlines come in order: a constant delay from now).
        self.idle_checks = Deadlines(self._first_idle_check)
        self.lingering = Deadlines(self.remove)
        try:
            asyncio.get_running_loop().call_soon(self._adopt_orphans)
        except RuntimeError:
            pass                                         # built outside a loop (tests)

    # --- segment sizes --------------------------------------------------------------------
    def clamp_socket(self, sock: socket.socket) -> None:
        """TCP_MAXSEG on a backend socket before connect() (see TcpSpliceDataPath.clamp)."""
        self.dp.clamp(sock)

    # --- loop plumbing --------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self.loop is not None:
            return
        self.loop = asyncio.get_running_loop()
        if self.handover == "compiled":
            self._routes_timer = self.loop.call_later(ROUTE_CACHE_S, self._expire_routes)
        if self.ring is not None:
            self._events = ts.EventRing(self.ring)
            self.loop.add_reader(self._events.fileno(), self._on_events)

    def _expire_routes(self) -> None:
        self._routes_c.clear()
        self._routes_timer = self.loop.call_later(ROUTE_CACHE_S, self._expire_routes)

    def _first_idle_check(self, slot_gen: tuple[int, int]) -> None:
        relay = self._by_slot.get(slot_gen[0])
        if relay is not None and relay.gen == slot_gen[1]:
            relay._check_idle()

    def _poll_ends(self) -> None:
        """END_POLL_S: the ring's events (the BPF program did not wake us for them), again
        while flows live or linger."""
        if self._events is not None:
            self._on_events()
        self._end_poll = (self.loop.call_later(END_POLL_S, self._poll_ends)
                          if self._by_slot else None)

    def _on_events(self) -> None:
        for slot, gen, why, end in self._events.drain():
            relay = self._by_slot.get(slot)
            if relay is not None and relay.gen == gen:
                relay.on_end(why, end)

    # --- arm ------------------------------------------------------------------------------
    def try_relay(self, client: socket.socket, backend: socket.socket, *,
                  idle_timeout_s: float) -> TcpSpliceRelay | None:
        self._ensure_loop()
        self.idle_timeout_s = idle_timeout_s
        active = self.total_active() if self.total_active is not None else len(self._by_slot)
        if active >= self.max_flows:
            return self._fallback("map_full", f"{active} flows use all {self.max_flows} slots "
                                  "(raise ebpf.tcp_splice.max_flows)")
        if self.handover == "compiled":
            relay = self._try_relay_compiled(client, backend, idle_timeout_s)
            if relay is not _PYTHON_PATH:
                return relay
        return self._try_relay_python(client, backend, idle_timeout_s)

    def _try_relay_compiled(self, client: socket.socket, backend: socket.socket,
                            idle_timeout_s: float):
        """The hand-over in one C call (ebpf/_handover.c): the same steps, checks, fallback
        reasons and rollbacks as _try_relay_python with the BPF reader. _PYTHON_PATH: the
        call did not answer (a socket the reader does not answer, usec timestamps)."""
        dp = self.dp
        routes = self._routes_c
        self._gen = gen = (self._gen + 1) & 0xFFFFFFFF
        # At most two route requests (the client's, then the backend's), then an answer.
        for _ in range(3):
            answer = _handover.arm(client, backend.fileno(), dp.flows.fd, dp.state.fd,
                                   dp.claims.fd, routes, dp.ifindexes, self._cursor,
                                   dp.max_flows, self.ring_index, ts._pid(), gen)
            tag = answer[0]
            if tag == "ok":
                _, slot, c2b_key, b2c_key, b_start, c_start, data, sent, send_errno = answer
                if send_errno:
                    log.debug("tcp_splice: hand-over write: %s",
                              OSError(send_errno, os.strerror(send_errno)))
                self._cursor = (slot + 1) % dp.max_flows
                relay = TcpSpliceRelay(self, slot, gen, (c2b_key, b2c_key), backend,
                                       data[sent:], len(data), idle_timeout_s,
                                       (b_start, c_start))
                self._by_slot[slot] = relay
                self.counters.add("ts_armed")
                if self._end_poll is None:
                    self._end_poll = self.loop.call_later(END_POLL_S, self._poll_ends)
                return relay
            if tag == "fallback":
                return self._fallback(answer[1], answer[2])
            if tag != "route":
                return _PYTHON_PATH
            try:
                oif = ts.route_oif(answer[2])
            except OSError as exc:
                return self._fallback("no_route", f"route lookup: {exc}")
            if len(routes) >= ROUTE_CACHE_MAX:
                routes.clear()
            routes[answer[1]] = (oif, not ts.is_loopback(oif))
        return _PYTHON_PATH

    def _try_relay_python(self, client: socket.socket, backend: socket.socket,
                          idle_timeout_s: float) -> TcpSpliceRelay | None:
        try:
            c_side, b_side, c_out, b_out = self._read_sides(client, backend)
        except ts.ArmError as exc:
            return self._fallback(exc.reason, str(exc))
        c_snap, b_snap = c_side.snap, b_side.snap
        if b_snap.queued:
            return self._fallback("backend_data_queued", f"the backend sent {b_snap.queued} "
                                  "bytes before the hand-over")
        entries = ts.flow_entries(c_side, b_side, c_out=c_out, b_out=b_out,
                                  c_neigh=not ts.is_loopback(c_out),
                                  b_neigh=not ts.is_loopback(b_out))
        entries[1].flags |= ts.F_HOLD
        slot = self.dp.claim_slot(self._cursor, self.ring_index)
        if slot is None:
            return self._fallback("map_full", "no free flow slot "
                                  "(raise ebpf.tcp_splice.max_flows)")
        self._cursor = (slot + 1) % self.dp.max_flows
        self._gen = (self._gen + 1) & 0xFFFFFFFF
        gen = self._gen
        try:
            self.dp.insert(slot, gen, self.ring_index, entries,
                           starts=(b_snap.write_seq, c_snap.write_seq))
        except ts.ArmError as exc:
            self.dp.release_slot(slot)
            return self._fallback(exc.reason, str(exc))
        except OSError as exc:
            self.dp.release_slot(slot)
            return self._fallback("map_full", f"inserting the flow: {exc}")
        # Backend bytes that arrived between its snapshot and the insertion would sit in the
        # proxy's socket below the first spliced byte, forwarded by nobody. The backend
        # direction went in on hold (its packets dropped, so it retransmits them), so the
        # socket's queue is final now: bytes there undo the insertion, losslessly (client
        # bytes spliced meanwhile are exactly where the next relay kind writes them too).
        try:
            late = ts.tcp_inq(backend)
        except OSError:
            late = 0
        if late:
            self.dp.remove(entries)
            self.dp.release_slot(slot)
            return self._fallback("backend_data_queued", f"the backend sent {late} bytes "
                                  "during the hand-over")
        b2c = entries[1]
        b2c.flags &= ~ts.F_HOLD
        try:
            self.dp.update(slot, gen, b2c)
        except OSError as exc:
            # Still the state of the late check above: undone losslessly the same way.
            self.dp.remove(entries)
            self.dp.release_slot(slot)
            return self._fallback("map_full", f"lifting the hold on the flow: {exc}")
        # --- the kernel splices from here on: no way back to another relay kind ---
        data = _read_queued(client)
        if b_snap.write_seq + len(data) != b2c.handover_end:
            b2c.handover_end = b_snap.write_seq + len(data)
            try:
                self.dp.update(slot, gen, b2c)
            except OSError:
                # The queued bytes are read: no next relay kind can have them. The
                # connection ends (as an error), and nothing of it stays in the maps.
                self.dp.remove(entries)
                self.dp.release_slot(slot)
                raise
        ts.close_silently(client)
        sent = 0
        try:
            while sent < len(data):
                sent += backend.send(data[sent:])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.debug("tcp_splice: hand-over write: %s", exc)
        relay = TcpSpliceRelay(self, slot, gen, (entries[0].key, entries[1].key), backend,
                               data[sent:], len(data),
                               idle_timeout_s, (b_snap.write_seq, c_snap.write_seq))
        self._by_slot[slot] = relay
        self.counters.add("ts_armed")
        if self._end_poll is None:
            self._end_poll = self.loop.call_later(END_POLL_S, self._poll_ends)
        return relay

    def _read_sides(self, client: socket.socket, backend: socket.socket):
        """(client SpliceSide, backend SpliceSide, ifindex towards the client, towards the
        backend), or ArmError with the fallback reason. One getsockopt per socket with the
        BPF reader; else TCP_INFO, the addresses and a TCP_REPAIR session per socket, taken
        after the checks that need no repair mode (it refuses a socket past ESTABLISHED)."""
        reader = self.dp.state_reader
        if reader is not None:
            try:
                cs, bs = reader.read(client), reader.read(backend)
            except OSError as exc:
                raise ts.ArmError("socket_error", f"reading the socket state: {exc}") from None
            if cs is not None and bs is not None and not (cs.options | bs.options) & SS_USEC_TS:
                if _TCP_CLOSE in (cs.state, bs.state):
                    # As getpeername's ENOTCONN on the path below: reset (or aborted).
                    raise ts.ArmError("socket_error", "reading the socket state: the "
                                      f"{'client' if cs.state == _TCP_CLOSE else 'backend'} "
                                      "connection was reset")
                cf, bf = ts.facts_of(cs), ts.facts_of(bs)
                c_local, c_peer, b_local, b_peer = cs.local, cs.peer, bs.local, bs.peer
                c_out, b_out = self._check_pair(cf, bf, c_local, c_peer, b_local, b_peer)
                if cs.unacked:
                    raise ts.ArmError("client_unacked_data", _UNACKED)
                return (ts.SpliceSide(c_local, c_peer, ts.snapshot_of(cs), cf),
                        ts.SpliceSide(b_local, b_peer, ts.snapshot_of(bs), bf), c_out, b_out)
            # Not answered (a socket of another cgroup) or microsecond timestamps (TCP_REPAIR
            # reads them in the units the splice translates): the path below.
        try:
            cf, bf = ts.tcp_facts(client), ts.tcp_facts(backend)
            c_local, c_peer = client.getsockname(), client.getpeername()
            b_local, b_peer = backend.getsockname(), backend.getpeername()
        except OSError as exc:
            raise ts.ArmError("socket_error", f"reading the socket state: {exc}") from None
        c_out, b_out = self._check_pair(cf, bf, c_local, c_peer, b_local, b_peer)
        try:
            if _outq(client):
                raise ts.ArmError("client_unacked_data", _UNACKED)
            c_snap = ts.repair_snapshot(client)
            b_snap = ts.repair_snapshot(backend)
        except OSError as exc:
            # TCP_REPAIR refused (EPERM cannot reach here: without CAP_NET_ADMIN start-up
            # leaves tcp_splice off) or a receive sequence that kept moving through every read.
            if exc.errno == errno.EPERM:
                raise ts.ArmError("socket_error", "TCP_REPAIR refused: it needs "
                                  "CAP_NET_ADMIN") from None
            raise ts.ArmError("socket_error", f"reading the sequence numbers (TCP_REPAIR): "
                              f"{exc}") from None
        return (ts.SpliceSide(c_local, c_peer, c_snap, cf),
                ts.SpliceSide(b_local, b_peer, b_snap, bf), c_out, b_out)

    def _check_pair(self, cf, bf, c_local, c_peer, b_local, b_peer) -> tuple[int, int]:
        """The checks that need no change to anything; the two out interfaces, or ArmError."""
        if cf.state != _TCP_ESTABLISHED or bf.state != _TCP_ESTABLISHED:
            raise ts.ArmError("not_established", "a socket is no longer ESTABLISHED "
                              "(a FIN arrived before the hand-over)")
        c_key = ts.pack_key(c_peer, c_local)
        if c_key[0] != ts.pack_key(b_peer, b_local)[0]:
            raise ts.ArmError("family_mismatch", f"client {c_peer[0]} and backend "
                              f"{b_peer[0]} use different IP versions")
        hdr = 40 if c_key[0] == 4 else 60
        # Segments keep their size across the splice: each side's largest segment must fit
        # the other side's path (client -> us sizes by our advertised MSS).
        if cf.advmss + hdr > bf.pmtu or bf.advmss + hdr > cf.pmtu:
            raise ts.ArmError("mss_mismatch", f"segment sizes differ: client side MSS "
                              f"{cf.advmss}/PMTU {cf.pmtu}, backend side MSS {bf.advmss}/"
                              f"PMTU {bf.pmtu}")
        try:
            c_out, b_out = self._oif(c_peer[0]), self._oif(b_peer[0])
        except OSError as exc:
            raise ts.ArmError("no_route", f"route lookup: {exc}") from None
        attached = self.dp.ifindexes
        for name, idx in (("client", c_out), ("backend", b_out)):
            if idx not in attached:
                raise ts.ArmError("interface_not_attached", f"the {name} is reached through "
                                  f"{_ifname(idx)}, where the tc programs are not attached "
                                  "(add it to ebpf.tcp_splice.interfaces)")
        return c_out, b_out

    def _oif(self, address: str) -> int:
        now = time.monotonic()
        hit = self._routes.get(address)
        if hit is not None and now - hit[0] < ROUTE_CACHE_S:
            return hit[1]
        oif = ts.route_oif(address)
        if len(self._routes) >= ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[address] = (now, oif)
        return oif

    def _fallback(self, reason: str, message: str) -> None:
        self.counters.add(f"ts_fallback_{reason}")
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("tcp_splice: %s; this connection (and later ones for the same reason, "
                        "counted in ebpf_tcp_splice_fallbacks_total) takes the next relay kind",
                        message)
        return None

    # --- flows of a dead worker -------------------------------------------------------------
    def _adopt_orphans(self) -> None:
        """Flows claimed by a process that no longer exists keep being spliced (the kernel
        needs no process), but nobody would remove them: this worker watches them and
        removes each once it ended (ring event seen by its BPF state) or went idle."""
        self._ensure_loop()
        try:
            claims = self.dp.claimed()
        except OSError:
            return
        dead_rows = set()
        me = struct.pack("=II", os.getpid(), self.ring_index)
        for slot, (pid, row) in claims.items():
            if slot in self._orphans:
                continue
            # pid 0: a previous proxy's flow (pinned maps), for the worker of that ring index
            if (pid == 0 and row != self.ring_index) or (pid != 0 and _alive(pid)):
                continue
            try:
                keys, reported = self.dp.entries_of(slot), self.dp.flow(slot).reported
                # Ours now: if this worker dies too, its successor takes the flow over.
                self.dp.claims.update(slot, me, BPF_ANY)
            except OSError:
                continue
            # The flow moves to this worker's counters (the dead row is retired below).
            self.counters.add("ts_armed")
            self.counters.add("ts_adopted")
            if reported:
                self.counters.add("ts_ended")
            self._orphans[slot] = (keys, reported)
            if pid:
                dead_rows.add(row)
            log.info("tcp_splice: watching flow slot %d of %s", slot,
                     f"dead process {pid}" if pid else "a previous proxy")
        if self.shared is not None:
            for row in dead_rows:
                if row != self.ring_index:
                    _retire_row(self.shared.row(row))
        if self._orphans:
            self.loop.call_later(ORPHAN_CHECK_MIN_S, self._check_orphans)

    def _check_orphans(self) -> None:
        next_s = ORPHAN_CHECK_S
        try:
            next_s = self._check_orphans_once()
        except Exception:          # a timer callback: log, never lose the rest silently
            log.exception("tcp_splice: checking the flows of a dead worker")
        if self._orphans:
            self.loop.call_later(next_s, self._check_orphans)

    def _check_orphans_once(self) -> float:
        """Remove the orphans that are over; seconds until the next one may be."""
        now = time.monotonic_ns()
        next_s = ORPHAN_CHECK_S
        for slot, (keys, counted_ended) in list(self._orphans.items()):
            try:
                st = self.dp.flow(slot)
            except OSError:
                continue
            idle_s = (now - st.last_ns) / 1e9
            left_s = min(self.linger_s if st.reported else self.idle_timeout_s,
                         self.idle_timeout_s) - idle_s
            if left_s > 0:
                next_s = min(next_s, max(ORPHAN_CHECK_MIN_S, left_s + 0.01))
            else:
                try:
                    self.dp.delete_keys(keys, slot, st.gen)
                except OSError:
                    pass
                try:
                    self.dp.release_slot(slot)
                except OSError:
                    pass
                del self._orphans[slot]
                if not counted_ended:
                    self.counters.add("ts_ended")
                self.counters.add("ts_removed")
        return next_s

    # --- teardown -------------------------------------------------------------------------
    def linger(self, relay: TcpSpliceRelay) -> None:
        """The flow ended: its entries stay for `linger_s` (a retransmitted FIN or last ACK
        must still be translated), but the kept backend socket goes now. Held through the
        linger, it kept an fd and the local port of every flow that ended in the last
        minute: at a few hundred new connections a second to one backend that filled the
        flow slots and the ephemeral port range (connect() slowed down searching it). A new
        connection that gets the port back makes the BPF program drop the lingering entries
        at its SYN."""
        if relay.backend_fd >= 0:
            self._close_silently(relay.backend_fd)
            relay.backend_fd = -1
        deadline = self.loop.time() + self.linger_s
        if not self.lingering.add(deadline, relay):
            self.loop.call_at(deadline, self.remove, relay)

    def _close_silently(self, fd: int) -> None:
        if self.handover == "compiled":
            _handover.close_silently(fd)
        else:
            ts.close_silently(fd)

    def remove(self, relay: TcpSpliceRelay) -> None:
        if relay.removed:
            return
        relay.removed = True
        if self.handover == "compiled":
            # The same map work in one C call (a flow's end cost ~25 us of Python around
            # five bpf() calls): the keys still of (slot, gen), then the slot's claim.
            problem = _handover.remove(self.dp.flows.fd, self.dp.claims.fd, relay.keys,
                                       relay.slot, relay.gen)
            if problem is not None:
                log.warning("tcp_splice: removing flow %d: %s", relay.slot, problem)
        else:
            try:
                # Only the keys still of this flow (slot, generation): see delete_keys.
                self.dp.delete_keys(list(relay.keys), relay.slot, relay.gen)
            except OSError as exc:
                log.warning("tcp_splice: removing flow %d: %s", relay.slot, exc)
            try:
                self.dp.release_slot(relay.slot)
            except OSError:
                pass
        if relay.backend_fd >= 0:
            self._close_silently(relay.backend_fd)
            relay.backend_fd = -1
        if self._by_slot.get(relay.slot) is relay:
            del self._by_slot[relay.slot]
        self.counters.add("ts_removed")

    def active_relays(self) -> int:
        return sum(1 for r in self._by_slot.values() if r.result is None)

    def close(self) -> None:
        """Worker exit: every flow out of the maps (live ones end with a RST at their next
        packet), sockets closed silently."""
        for relay in list(self._by_slot.values()):
            if relay.result is None:
                relay.abort("shutdown", "worker exiting")
            self.remove(relay)
        if self._routes_timer is not None:
            self._routes_timer.cancel()
            self._routes_timer = None
        if self._end_poll is not None:
            self._end_poll.cancel()
            self._end_poll = None
        self.idle_checks.cancel()
        self.lingering.cancel()
        if self._events is not None:
            if self.loop is not None and not self.loop.is_closed():
                try:
                    self.loop.remove_reader(self._events.fileno())
                except (ValueError, OSError):
                    pass
            self._events.close()
            self._events = None


class Deadlines:
    """Calls `fire(item)` at each item's deadline, with one loop timer for all of them; the
    deadlines must come in order (add() refuses one earlier than the last: the caller then
    uses a timer of its own, e.g. after a reload shortened the delay)."""

    __slots__ = ("fire", "items", "timer")

    def __init__(self, fire):
        self.fire = fire
        self.items: collections.deque = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, deadline: float, item) -> bool:
        items = self.items
        if items and deadline < items[-1][0]:
            return False
        items.append((deadline, item))
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_at(deadline, self._run)
        return True

    def _run(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now, items = loop.time(), self.items
        while items and items[0][0] <= now:
            _, item = items.popleft()
            try:
                self.fire(item)
            except Exception:           # one flow's problem must not stop the others
                log.exception("tcp_splice: a timed check of flow %s", getattr(item, "slot", "?"))
        if items:
            self.timer = loop.call_at(items[0][0], self._run)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.items.clear()


def _retire_row(row) -> None:
    """A dead worker's flows now count elsewhere: its row says they all ended and left."""
    armed = row.get("ts_armed")
    row.add("ts_ended", armed - row.get("ts_ended"))
    row.add("ts_removed", armed - row.get("ts_removed"))


_alive = ts.pid_alive


def _read_queued(sock: socket.socket) -> bytes:
    parts = []
    while True:
        try:
            chunk = sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex}"
