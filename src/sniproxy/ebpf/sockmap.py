"""The sockmap relay mechanism: put a connected socket pair into the kernel, watch it, take it out.

Knows nothing of the proxy: sockets in, counters and events out. The BPF side is
`bpf/sni_proxy_sockmap.bpf.c`; read its header comment for the maps.

Hand-over (lossless and ordered, facts measured on 6.18):
1. Both sockets into the redirect-target map `sni_proxy_dst`, then conn + credit entries for
   both (one batch per map), then both into the source map `sni_proxy_sks` (the verdict
   program's). Targets and state go in first so that no redirect can find its peer missing.
2. ``trigger()``: ``setsockopt(SO_RCVLOWAT, 1)`` on both calls ``sk_data_ready``, which
   flushes what was queued before insertion (the peeked ClientHello, an early ServerHello,
   pipelined data) through the program, in order. Writing those bytes from user space after
   insertion reordered the stream.

Counters: the program counts bytes redirected *from* each socket. A socket's peer has
*written* (queued into its send queue) ``tcpi_bytes_acked + SIOCOUTQ`` bytes in total; minus
its baseline at insertion that is what arrived through the redirect. A half-close may be
propagated only once ``written >= redirected`` (the kworker sends redirected bytes later).

Backpressure: the bytes of a direction held in the kernel are ``redirected - acked`` by the
peer. The program notifies the worker (ring buffer) when a source passes its credit; the
worker then measures, and either gives a new credit or pauses the source: the program keeps
the source's new bytes in the source socket (charged to its receive buffer, so TCP's window
closes) until the peer has drained; user space moves the kept bytes and the program resumes
redirecting once all of them were moved. (Removing the source from the map instead dropped
an skb whenever a verdict ran concurrently, and a socket that is no longer ESTABLISHED cannot
re-enter a sockmap.)
"""
from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios
from dataclasses import dataclass

from sniproxy.ebpf.layout import EnumLayout, StructLayout
from sniproxy.ebpf.ringbuf import MmapRingReader, install_ring
from sniproxy.ebpf.objects import (
    BPF_ANY, BPF_NOEXIST, BPF_SK_SKB_STREAM_VERDICT, BpfError, BpfObject,
    Link, Map,
)

OBJECT = "sni_proxy_sockmap"
PROGRAM = "sni_proxy_skv"

# Ring buffer per worker: one 8-byte record (+8 header) per notification, and a worker
# drains its ring on every wake-up; 64 KiB holds 4096 pending notifications.
RING_BYTES = 64 * 1024
MAX_RINGS = 64                  # default size of sni_proxy_rings (one slot per worker spawn)

SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
_TCP_INFO_LEN = 136             # struct tcp_info up to tcpi_bytes_received
_TCPI_STATE = 0
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_U64 = struct.Struct("=Q")
# SIOCINQ / TCP_INFO / SIOCINQ rounds before giving up on a socket still receiving fast
_CONSISTENT_READS = 8
# The BPF program's structs and enum, checked against its BTF at load (ebpf/layout.py).
CONN_LAYOUT = StructLayout("sni_proxy_conn", (
    ("peer", "Q"), ("bytes", "Q"), ("skbs", "Q"), ("passed", "Q"),
    ("dir", "I"), ("fin", "I"), ("passing", "I"), ("pad", "I")))
CRED_LAYOUT = StructLayout("sni_proxy_cred", (
    ("credit", "Q"), ("copied", "Q"), ("notified", "I"), ("ring", "I"), ("pause", "I"),
    ("pad", "I")))
_CONN = CONN_LAYOUT.struct
_CRED = CRED_LAYOUT.struct

DIR_UP, DIR_DOWN = 0, 1

# tcpi_state values for "this socket will receive nothing more".
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8

# Per-CPU counter slots: enum sni_proxy_stat_slot in the BPF file, in value order.
STATS_LAYOUT = EnumLayout("sni_proxy_stat_slot", "STAT_", (
    "up_skbs", "up_bytes", "down_skbs", "down_bytes", "fin_drops", "no_peer", "redirect_fail",
    "notify", "notify_lost", "passed_bytes"), end="STAT_MAX")
STAT_NAMES = STATS_LAYOUT.names
LAYOUTS = (CONN_LAYOUT, CRED_LAYOUT, STATS_LAYOUT)


class InsertError(Exception):
    """A pair could not enter the maps; `reason` is a metric label, str() says what happened."""

    def __init__(self, reason: str, message: str, *, bytes_in_kernel: int = 0):
        super().__init__(message)
        self.reason = reason
        # Bytes the program redirected before a later insertion failed: the kernel sends them
        # on its own, so the connection cannot continue in user space without reordering.
        self.bytes_in_kernel = bytes_in_kernel


# ----------------------------------------------------------------------------- socket facts
def socket_cookie(sock: socket.socket) -> int:
    return _U64.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def tcp_state_and_acked(sock: socket.socket) -> tuple[int, int]:
    """(tcpi_state, tcpi_bytes_acked) from one TCP_INFO call."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return info[_TCPI_STATE], _U64.unpack_from(info, _TCPI_BYTES_ACKED)[0]


def tcp_bytes_received(sock: socket.socket) -> int:
    """tcpi_bytes_received: payload bytes received, +1 once the FIN is in (it takes a sequence
    number)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    return _U64.unpack_from(info, _TCPI_BYTES_RECEIVED)[0]


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), request, buf)
    return int.from_bytes(buf, "little", signed=True)


def tcp_outq(sock: socket.socket) -> int:
    """Bytes in the send queue not yet acknowledged (SIOCOUTQ)."""
    return _ioctl_int(sock, termios.TIOCOUTQ)


def tcp_inq(sock: socket.socket) -> int:
    """Bytes received and not yet consumed (SIOCINQ). Only true before the socket enters a
    sockmap: tcp_bpf then answers from the psock's queue (0 here, whatever is queued)."""
    return _ioctl_int(sock, termios.FIONREAD)


def tcp_written(sock: socket.socket) -> tuple[int, int]:
    """(bytes ever queued for sending: acked + SIOCOUTQ, bytes acked)."""
    _, acked = tcp_state_and_acked(sock)
    return acked + tcp_outq(sock), acked


# ----------------------------------------------------------------------------- ring reader
class RingReader(MmapRingReader[int]):
    """A worker's ring of credit notifications: records of 8-byte socket cookies."""

    def __init__(self, ring: Map):
        super().__init__(ring, 8, lambda raw: _U64.unpack(raw)[0])


# ----------------------------------------------------------------------------- maps
@dataclass
class SockmapMaps:
    """The loaded program's maps (fds shared with forked workers)."""

    sks: Map
    dst: Map
    conn: Map
    cred: Map
    rings: Map
    stat: Map

    @property
    def max_entries(self) -> int:
        return self.sks.max_entries


class SockmapDataPath:
    """The loaded BPF object with its verdict program attached to `sni_proxy_sks`.

    Load once in the parent; forked workers inherit the fds and use `maps`.
    """

    def __init__(self, obj: BpfObject, link: Link | None):
        self.obj = obj
        self.link = link
        self.maps = SockmapMaps(*(obj.map(f"sni_proxy_{n}") for n in
                                  ("sks", "dst", "conn", "cred", "rings", "stat")))
        self._rings: dict[int, Map] = {}

    @classmethod
    def load(cls, max_entries: int, *, stats_on: bool = True, attach: bool = True,
             rings: int = MAX_RINGS) -> "SockmapDataPath":
        """Load and attach (attach=False: maps only). Raises BpfError with the reason."""
        sizes = {f"sni_proxy_{n}": max_entries for n in ("sks", "dst", "conn", "cred")}
        sizes["sni_proxy_rings"] = rings
        obj = BpfObject(OBJECT, rodata={"sni_proxy_stats_on": int(stats_on)}, map_sizes=sizes,
                        autoload={PROGRAM: attach}, layouts=LAYOUTS)
        obj.load()
        try:
            link = obj.program(PROGRAM).attach_to_map(obj.map("sni_proxy_sks"),
                                                      BPF_SK_SKB_STREAM_VERDICT) if attach else None
            return cls(obj, link)
        except Exception:
            obj.close()
            raise

    def new_ring(self, index: int) -> Map:
        """A fresh ring for the worker about to use slot `index` (replaces the old one)."""
        return install_ring(self.maps.rings, self._rings, index, RING_BYTES, "sni_proxy_ring")

    def purge_ring(self, ring_index: int) -> int:
        """Remove every entry owned by the worker of ring slot `ring_index` (it died without
        removing its pairs: SIGKILL, a crash). Returns the number of sockets purged.

        Its sockets closed with the process and the kernel took them out of the sockhashes; the
        conn/cred entries (plain hashes) would stay and fill the maps. Ownership is the cred
        entry's `ring`. Call only once the worker is gone: its pairs cannot change any more.
        """
        m = self.maps
        owned = []
        for key, value in m.cred.items():
            if _CRED.unpack(value)[3] == ring_index:
                owned.append(int.from_bytes(key, "little"))
        for cookie in owned:
            for table in (m.sks, m.dst, m.conn, m.cred):
                try:
                    table.delete(cookie)
                except BpfError:
                    pass
        return len(owned)

    def stats(self) -> dict[str, int]:
        """Per-CPU counters summed over CPUs."""
        return {name: self.maps.stat.percpu_sum(i) for i, name in enumerate(STAT_NAMES)}

    def entries(self) -> dict[str, int]:
        """Entries now in each per-socket map (O(n) syscalls: for tests and /status, not hot paths)."""
        m = self.maps
        return {"sks": m.sks.count(), "dst": m.dst.count(), "conn": m.conn.count(),
                "cred": m.cred.count()}

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        self._rings.clear()
        self.obj.close()            # detaches the verdict program (the link) and frees the maps


# ----------------------------------------------------------------------------- one pair
class SockPair:
    """Two connected TCP sockets relayed by the kernel. Side 0 is the client, side 1 the backend.

    Counters are per side: `redirected(i)` bytes went from side i to side 1-i.
    """

    def __init__(self, maps: SockmapMaps, client: socket.socket, backend: socket.socket, *,
                 ring_index: int, credit_bytes: int):
        self.maps = maps
        self.socks = (client, backend)
        self.cookies = (socket_cookie(client), socket_cookie(backend))
        self.ring_index = ring_index
        self.credit_bytes = credit_bytes
        written, acked, consumed = [], [], []
        for sock in self.socks:
            # SIOCINQ is only truthful now, before the socket enters the map. Bytes arriving
            # between it and TCP_INFO would count as consumed and never as seen by the program
            # (the drain then waited forever: 32 KiB on lo, 1 run in ~10 of 300 connections),
            # so TCP_INFO is read between two SIOCINQ that agree (nobody reads the socket:
            # SIOCINQ only grows).
            inq = tcp_inq(sock)
            for _ in range(_CONSISTENT_READS):
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
                again = tcp_inq(sock)
                if again == inq:
                    break
                inq = again
            else:
                raise OSError(errno.EAGAIN, "bytes kept arriving while the receive counters "
                              "were read")
            acked.append(_U64.unpack_from(info, _TCPI_BYTES_ACKED)[0])
            written.append(acked[-1] + tcp_outq(sock))
            consumed.append(_U64.unpack_from(info, _TCPI_BYTES_RECEIVED)[0] - inq)
        # Bytes each socket had queued for sending before the hand-over (PROXY header, SOCKS
        # leftover): the redirected bytes come on top.
        self.base_written = tuple(written)
        self.base_acked = tuple(acked)
        # Bytes each socket received that user space consumed before the hand-over (a SOCKS
        # reply): everything received after them goes through the program.
        self.base_consumed = tuple(consumed)
        self.inserted = False

    # insertion ---------------------------------------------------------------------------
    def insert(self) -> None:
        """Enter all maps, or none: raises InsertError (reason map_full / close_wait / ...)."""
        m = self.maps
        done: list[tuple[Map, int]] = []
        try:
            # Targets first, one by one with BPF_NOEXIST (sockmaps take no batches): this
            # also refuses a socket that is already in. No program runs on a target.
            for sock, cookie in zip(self.socks, self.cookies):
                m.dst.update(cookie, sock.fileno(), BPF_NOEXIST)
                done.append((m.dst, cookie))
            # Then the per-socket state the program reads, one batch per map (a syscall each
            # instead of two): the cookies are new, as the dst insertion just proved.
            for table, values in (
                    (m.conn, [_CONN.pack(self.cookies[1 - side], 0, 0, 0,
                                         DIR_UP if side == 0 else DIR_DOWN, 0, 0, 0)
                              for side in (0, 1)]),
                    (m.cred, [_CRED.pack(self.credit_bytes, 0, 0, self.ring_index, 0, 0)] * 2)):
                try:
                    table.update_batch(list(zip(self.cookies, values)))
                except BpfError as exc:
                    done.extend((table, c) for c in self.cookies[:getattr(exc, "done", 0)])
                    raise
                done.extend((table, c) for c in self.cookies)
            # Sources last: from here on the program runs on their bytes.
            for sock, cookie in zip(self.socks, self.cookies):
                m.sks.update(cookie, sock.fileno(), BPF_NOEXIST)
                done.append((m.sks, cookie))
        except BpfError as exc:
            error = _insert_error(exc, self.socks)
            error.bytes_in_kernel = self._rollback(done)
            raise error from None
        self.inserted = True

    def _rollback(self, done: list[tuple[Map, int]]) -> int:
        """Undo a partial insertion; bytes the program redirected meanwhile (see InsertError).

        Sources leave first, then the counters are read (no verdict can add to them any more),
        then the rest goes.
        """
        sources = [(t, c) for t, c in done if t is self.maps.sks]
        for target, cookie in sources:
            try:
                target.delete(cookie)
            except BpfError:
                pass
        moved = 0
        if sources:
            for side in (0, 1):
                try:
                    st = self.state(side)
                except BpfError:
                    continue
                moved += st.redirected + st.passed
        for target, cookie in reversed(done):
            if target is self.maps.sks:
                continue
            try:
                target.delete(cookie)
            except BpfError:
                pass
        return moved

    def trigger(self, side: int | None = None) -> None:
        """Call sk_data_ready (SO_RCVLOWAT 1) so queued bytes go through the program, in order."""
        for i in (0, 1) if side is None else (side,):
            try:
                self.socks[i].setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    def remove(self) -> None:
        """Out of every map (sources first, so nothing is redirected to a vanishing target)."""
        if not self.inserted:
            return
        self.inserted = False
        m = self.maps
        for target in (m.sks, m.dst):
            for cookie in self.cookies:
                try:
                    target.delete(cookie)
                except BpfError:
                    pass             # the kernel already dropped a closed socket from a sockhash
        for table in (m.cred, m.conn):
            try:
                gone = table.delete_batch(list(self.cookies))
            except BpfError:
                gone = 0
            for cookie in self.cookies[gone:]:      # the batch stops at a missing key
                try:
                    table.delete(cookie)
                except BpfError:
                    pass

    # counters ----------------------------------------------------------------------------
    def state(self, side: int) -> ConnState:
        raw = self.maps.conn.lookup(self.cookies[side])
        if raw is None:
            return ConnState(0, 0, False, False)
        _, nbytes, _, passed, _, fin, passing, _ = _CONN.unpack(raw)
        return ConnState(nbytes, passed, bool(fin), bool(passing))

    def redirected(self, side: int) -> int:
        return self.state(side).redirected

    def counters(self) -> tuple[int, int]:
        """(bytes client->backend, bytes backend->client) redirected so far."""
        return self.redirected(0), self.redirected(1)

    def written_since_insert(self, side: int) -> tuple[int, int]:
        """(bytes queued into side's send queue since insertion, of which acked): redirected
        by the program plus what user space wrote itself."""
        written, acked = tcp_written(self.socks[side])
        base = self.base_written[side]
        return written - base, acked - base

    def inq(self, side: int) -> int:
        """Bytes readable in `side` now (SIOCINQ answers from the psock queue when inserted)."""
        return tcp_inq(self.socks[side])

    def acked(self, side: int) -> int:
        """tcpi_bytes_acked of `side`: moves whenever its peer acknowledges data."""
        return tcp_state_and_acked(self.socks[side])[1]

    def received_since_insert(self, side: int) -> int:
        """Payload bytes `side` received after the hand-over (+1 once its FIN is in)."""
        return tcp_bytes_received(self.socks[side]) - self.base_consumed[side]

    # backpressure --------------------------------------------------------------------------
    def set_cred(self, side: int, *, credit: int, copied: int = 0, pause: bool = False) -> None:
        """Notify again once `side` redirected more than `credit` bytes in total; `pause` keeps
        its new bytes in the socket; `copied` = kept bytes user space has moved to the peer."""
        try:
            self.maps.cred.update(self.cookies[side],
                                  _CRED.pack(credit, copied, 0, self.ring_index, int(pause), 0),
                                  BPF_ANY)
        except BpfError:
            pass


@dataclass(frozen=True)
class ConnState:
    redirected: int         # bytes the program redirected from this socket to its peer
    passed: int             # bytes it kept in this socket while paused (user space moves them)
    fin: bool               # its FIN went through the program
    passing: bool           # the program is keeping this socket's bytes


def _insert_error(exc: BpfError, socks: tuple[socket.socket, socket.socket]) -> InsertError:
    err = getattr(exc, "errno", None)
    if err == errno.E2BIG:
        return InsertError("map_full", "Map capacity full: the sockmap has no room for this "
                           "connection (raise ebpf.sockmap.max_entries)")
    if err == errno.EOPNOTSUPP:
        states = []
        for name, sock in zip(("client", "backend"), socks):
            try:
                state, _ = tcp_state_and_acked(sock)
            except OSError:
                state = 0
            if state != TCP_ESTABLISHED:
                states.append(name)
        which = " and ".join(states) or "a socket"
        return InsertError("close_wait", f"the {which} already sent its FIN (CLOSE_WAIT), which "
                           "the sockmap refuses (EOPNOTSUPP)")
    if err == errno.EEXIST:
        return InsertError("duplicate", f"socket already in the sockmap: {exc}")
    return InsertError("insert_error", f"sockmap insertion failed: {exc}")
