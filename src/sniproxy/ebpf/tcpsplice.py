"""The kernel TCP splice mechanism: tc hooks, the flow maps, and the socket facts they need.

Knows nothing of the proxy: interfaces and sockets in, map entries and events out. The BPF
side is `bpf/sni_proxy_tcp_splice.bpf.c` (its header comment lists the maps); the structs
packed here mirror `bpf/sni_proxy_tcp_splice.h` field by field.

    dp = TcpSpliceDataPath.load(max_flows=4096, rings=64)
    dp.attach(["lo"])                       # clsact ingress + egress on each interface
    snap = repair_snapshot(sock)            # TCP_REPAIR reads: sequence numbers, TS clock
    entries = flow_entries(c_snap, b_snap, ...)   # the two directions of one flow
    dp.insert(slot, entries, ring=0)        # from now the kernel splices the flow
    dp.remove(slot, entries)                # after the TIME_WAIT-like linger
    dp.close()                              # removes exactly the filters/qdiscs it added
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from sniproxy.ebpf import libbpf as _lb
from sniproxy.ebpf.layout import EnumLayout, StructLayout
from sniproxy.ebpf.ringbuf import MmapRingReader, install_ring
from sniproxy.ebpf.sockstate import SS_SACK, SS_TIMESTAMPS, SS_WSCALE, SocketState
from sniproxy.ebpf.sockmap import tcp_inq  # SIOCINQ, one copy for both kernel relays
from sniproxy.ebpf.objects import (
    BPF_ANY, BPF_MAP_TYPE_HASH, BPF_NOEXIST, BpfError, BpfObject, Map,
)

OBJECT = "sni_proxy_tcp_splice"
INGRESS_PROG = "sni_proxy_tsi"
EGRESS_PROG = "sni_proxy_tse"

C2B, B2C = 0, 1
F_TSTAMP, F_NEIGH, F_HOLD = 1, 2, 4
EV_FIN, EV_RST = 1, 2
# Ring buffer per worker: one 36-byte record (+8 header, 8-aligned: 48) per finished flow;
# 128 KiB holds 2730, over a second of new connections at the rate 16,384 flow slots allow.
RING_BYTES = 128 * 1024
MAX_RINGS = 64
# tc filter priority of our programs: a fixed, uncommon number so that `tc filter show`
# makes them recognisable and we never replace someone else's filter at the default 1.
TC_PRIORITY = 0x5e1
# A fixed handle too: a filter already at (TC_HANDLE, TC_PRIORITY) is a leftover of a proxy
# that was killed (tc filters outlive their process) and is replaced.
TC_HANDLE = 0x5e1

# The structs of bpf/sni_proxy_tcp_splice.h, checked against the object's BTF at open
# (ebpf/layout.py): a field changed on one side only fails the load, naming it.
KEY_LAYOUT = StructLayout("sni_proxy_ts_key", (
    ("family", "B"), ("pad", "3x"), ("saddr", "16s"), ("daddr", "16s"), ("sport", "H"),
    ("dport", "H")))
DIR_LAYOUT = StructLayout("sni_proxy_ts_dir", (
    ("saddr", "16s"), ("daddr", "16s"), ("sport", "H"), ("dport", "H"), ("seq_delta", "I"),
    ("ack_delta", "I"), ("handover_end", "I"), ("flow", "I"), ("ifindex", "I"),
    ("ts_base", "I"), ("dir", "B"), ("flags", "B"), ("win_shift_in", "B"),
    ("win_shift_out", "B"), ("gen", "I")))
CTR_LAYOUT = StructLayout("sni_proxy_ts_ctr", (
    ("bytes", "Q"), ("packets", "Q"), ("last_ns", "Q"), ("nxt", "I"), ("pad", "I"),
    ("pad2", "32x")))
FLOW_LAYOUT = StructLayout("sni_proxy_ts_flow", (
    ("ts_off", "2I"), ("fin_seq", "2I"), ("ts_learned", "2B"), ("fin", "2B"),
    ("fin_acked", "2B"), ("rst", "B"), ("engaged", "B"), ("reported", "B"), ("pad", "3x"),
    ("ring", "I"), ("gen", "I"), ("pad2", "I"), ("frozen", "Q"), ("pad3", "16x"),
    ("ctr", f"{2 * CTR_LAYOUT.size}s")))
EVENT_LAYOUT = StructLayout("sni_proxy_ts_event", (
    ("flow", "I"), ("gen", "I"), ("why", "I"), ("rst", "B"), ("fin", "2B"), ("fin_acked", "2B"),
    ("pad", "3x"), ("fin_seq", "2I"), ("nxt", "2I")))
STAT_LAYOUT = EnumLayout("sni_proxy_ts_stat", "TS_STAT_", (
    "c2b_packets", "c2b_bytes", "b2c_packets", "b2c_bytes", "frozen", "to_proxy", "no_flow",
    "events", "events_lost", "redirect_fail"), end="TS_STAT_MAX", c_names=(
    "C2B_PKTS", "C2B_BYTES", "B2C_PKTS", "B2C_BYTES", "FROZEN", "TO_PROXY", "NO_FLOW", "EVENTS",
    "EVENTS_LOST", "REDIRECT_FAIL"))
LAYOUTS = (KEY_LAYOUT, DIR_LAYOUT, CTR_LAYOUT, FLOW_LAYOUT, EVENT_LAYOUT, STAT_LAYOUT)
_KEY, _DIR, _FLOW, _CTR = KEY_LAYOUT.struct, DIR_LAYOUT.struct, FLOW_LAYOUT.struct, CTR_LAYOUT.struct
_EVENT = EVENT_LAYOUT.struct
_STAT_NAMES = STAT_LAYOUT.names

# setsockopt numbers (linux/tcp.h)
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_TIMESTAMP = 24
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_REPAIR_OFF_NO_WP = -1      # leave repair mode without sending a window probe
_TCPI_OPT_TIMESTAMPS = 1
_TCPI_OPT_SACK = 2
_TCPI_OPT_WSCALE = 4
_TCP_INFO = struct.Struct("=BBBBBBBBIIIIIIIIIIIIIIIIIIIIIIII")   # up to tcpi_total_retrans
_IFF_LOOPBACK_TYPE = 772        # ARPHRD_LOOPBACK


class ArmError(Exception):
    """A pair cannot be spliced; `reason` is a metric label, str() says what happened."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- socket facts
@dataclass
class TcpFacts:
    """What TCP_INFO says about a connected socket (only what the splice needs)."""

    state: int
    timestamps: bool
    sack: bool
    snd_wscale: int
    rcv_wscale: int
    snd_mss: int
    advmss: int
    pmtu: int


def tcp_facts(sock: socket.socket) -> TcpFacts:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    f = _TCP_INFO.unpack(raw.ljust(_TCP_INFO.size, b"\0"))
    state, options, wscale = f[0], f[5], f[6]
    # 8 one-byte fields, then u32s: rto f[8], ato, snd_mss f[10], ..., pmtu f[21], ...,
    # advmss f[27]
    return TcpFacts(state=state, timestamps=bool(options & _TCPI_OPT_TIMESTAMPS),
                    sack=bool(options & _TCPI_OPT_SACK),
                    snd_wscale=(wscale & 0x0f) if options & _TCPI_OPT_WSCALE else 0,
                    rcv_wscale=(wscale >> 4) if options & _TCPI_OPT_WSCALE else 0,
                    snd_mss=f[10], advmss=f[27], pmtu=f[21])


@dataclass
class RepairSnapshot:
    """Sequence state of one socket, read in repair mode (CAP_NET_ADMIN)."""

    copied_seq: int     # first byte not yet read by user space (rcv_nxt - bytes queued)
    queued: int         # bytes received and not read (SIOCINQ) when copied_seq was taken
    write_seq: int      # next sequence number user space's next write gets
    ts_base: int        # TCP_TIMESTAMP minus CLOCK_MONOTONIC in ms (mod 2**32)


def facts_of(state: SocketState) -> TcpFacts:
    """TcpFacts from a BPF socket-state read (the same fields TCP_INFO gives)."""
    opts = state.options
    wscale = state.wscale if opts & SS_WSCALE else 0
    return TcpFacts(state=state.state, timestamps=bool(opts & SS_TIMESTAMPS),
                    sack=bool(opts & SS_SACK), snd_wscale=wscale & 0x0f, rcv_wscale=wscale >> 4,
                    snd_mss=state.snd_mss, advmss=state.advmss, pmtu=state.pmtu)


def snapshot_of(state: SocketState) -> RepairSnapshot:
    """RepairSnapshot from a BPF socket-state read: copied_seq is read directly (under the
    socket lock), and the timestamp base is the socket's tsoffset itself (TSval = CLOCK_MONOTONIC
    ms + tsoffset; TCP_TIMESTAMP minus a later clock read, as repair_snapshot computes it, can be
    1 ms lower)."""
    return RepairSnapshot(state.copied_seq, state.queued, state.write_seq, state.tsoffset)


def _u32(sock: socket.socket, opt: int) -> int:
    return struct.unpack("=I", sock.getsockopt(socket.IPPROTO_TCP, opt, 4))[0]


def repair_snapshot(sock: socket.socket, attempts: int = 8) -> RepairSnapshot:
    """TCP_REPAIR reads: rcv_nxt/SIOCINQ (as a stable pair), write_seq, the TS clock.

    copied_seq is not readable directly: rcv_nxt - SIOCINQ is, when no segment arrived
    between the two reads (SIOCINQ read before and after agrees: it only grows, since
    nobody reads the socket meanwhile). Raises OSError (EPERM without CAP_NET_ADMIN).
    """
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        for _ in range(attempts):
            before = tcp_inq(sock)
            rcv_nxt = _u32(sock, TCP_QUEUE_SEQ)
            after = tcp_inq(sock)
            if before == after:
                break
        else:
            raise OSError(errno.EAGAIN, "bytes kept arriving while reading the receive sequence")
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        write_seq = _u32(sock, TCP_QUEUE_SEQ)
        # No TCP_REPAIR_QUEUE 0 before leaving: the kernel reads repair_queue only while
        # repair is on, and turning repair on again (close_silently) resets it.
        ts = _u32(sock, TCP_TIMESTAMP)
        mono_ms = time.monotonic_ns() // 1_000_000
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return RepairSnapshot((rcv_nxt - after) & 0xFFFFFFFF, after, write_seq,
                          (ts - mono_ms) & 0xFFFFFFFF)


def close_silently(sock_or_fd: socket.socket | int) -> None:
    """Close a TCP socket without FIN or RST: in repair mode close() only disconnects.

    If repair mode cannot be entered (state not ESTABLISHED/CLOSE), an abortive close sends
    a RST, which the egress hook drops while the flow's entries still exist.
    """
    # An fd: the family given (either will do for these options) spares the three system
    # calls socket() makes to detect it (getsockname, SO_TYPE, SO_PROTOCOL) at every flow's end.
    sock = (sock_or_fd if isinstance(sock_or_fd, socket.socket) else
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=sock_or_fd))
    try:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
    finally:
        sock.close()


# ----------------------------------------------------------------------------- routing
_RTM_GETROUTE, _RTM_NEWROUTE = 26, 24
_NLMSG_ERROR = 2
_RTA_DST, _RTA_OIF = 1, 4


def route_oif(address: str) -> int:
    """The interface index the kernel routes `address` through (RTM_GETROUTE, one round trip)."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    dst = ip.packed
    rtmsg = struct.pack("=BBBBBBBBI", family, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0)
    rta = struct.pack("=HH", 4 + len(dst), _RTA_DST) + dst
    body = rtmsg + rta
    msg = struct.pack("=IHHII", 16 + len(body), _RTM_GETROUTE, 1, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(1.0)
        nl.send(msg)
        data = nl.recv(65536)
    length, mtype = struct.unpack_from("=IH", data, 0)
    if mtype == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, 16)[0]
        raise OSError(err, f"no route to {address}: {os.strerror(err)}")
    pos = 16 + 12
    while pos + 4 <= length:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype == _RTA_OIF:
            return struct.unpack_from("=i", data, pos + 4)[0]
        pos += (alen + 3) & ~3
    raise OSError(errno.ENETUNREACH, f"the route to {address} names no interface")


_RTM_GETADDR = 22
_NLM_F_REQUEST, _NLM_F_DUMP = 1, 0x300
_NLMSG_DONE = 3
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def address_interface(address: str) -> str | None:
    """The name of the interface that holds local address `address` (RTM_GETADDR dump), or
    None. (A route lookup would answer `lo` for every local address.)"""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    want = ip.packed
    msg = struct.pack("=IHHII", 16 + 8, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
    msg += struct.pack("=BBBBI", family, 0, 0, 0, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(1.0)
        nl.send(msg)
        found = None
        # Bounded: a dump ends with NLMSG_DONE; each recv is at most one buffer of addresses.
        for _ in range(4096):
            data = nl.recv(65536)
            pos = 0
            while pos + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, pos)
                if mtype in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                    return found
                _, _, _, _, index = struct.unpack_from("=BBBBI", data, pos + 16)
                apos = pos + 16 + 8
                while apos + 4 <= pos + length:
                    alen, atype = struct.unpack_from("=HH", data, apos)
                    if alen < 4:
                        break
                    if atype in (_IFA_ADDRESS, _IFA_LOCAL) and \
                            data[apos + 4:apos + alen] == want and found is None:
                        try:
                            found = socket.if_indextoname(index)
                        except OSError:
                            pass
                    apos += (alen + 3) & ~3
                pos += (length + 3) & ~3
    return found


_LOOPBACK: dict[int, bool] = {}


def is_loopback(ifindex: int) -> bool:
    """The device is a loopback (ARPHRD_LOOPBACK); cached (asked per connection)."""
    hit = _LOOPBACK.get(ifindex)
    if hit is None:
        hit = _LOOPBACK[ifindex] = _is_loopback(ifindex)
    return hit


def _is_loopback(ifindex: int) -> bool:
    try:
        name = socket.if_indextoname(ifindex)
        with open(f"/sys/class/net/{name}/type") as fh:
            return int(fh.read()) == _IFF_LOOPBACK_TYPE
    except OSError:
        return False


def _mtu(name: str) -> int | None:
    try:
        with open(f"/sys/class/net/{name}/mtu") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def up_interfaces() -> list[str]:
    """Interfaces of this network namespace that are up (the default attach set)."""
    out = []
    for _, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/operstate") as fh:
                state = fh.read().strip()
            with open(f"/sys/class/net/{name}/flags") as fh:
                up = int(fh.read(), 16) & 1
        except OSError:
            continue
        if up and state in ("up", "unknown"):
            out.append(name)
    return out


# ----------------------------------------------------------------------------- entries
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


@functools.lru_cache(maxsize=4096)
def _addr16(host: str) -> tuple[int, bytes]:
    """(4 or 6, 16 bytes): IPv4 (and IPv4-mapped IPv6) in the first 4 bytes, zero-padded.
    Fourteen calls per hand-over, over a few distinct hosts (the proxy's own addresses, the
    backends', the clients'): cached (issue 14)."""
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        if raw[:12] == _V4_MAPPED:
            return 4, raw[12:] + b"\0" * 12
        return 6, raw
    return 4, socket.inet_aton(host) + b"\0" * 12


def pack_key(src: tuple, dst: tuple) -> bytes:
    """The map key of packets from `src` to `dst` ((host, port, ...) socket addresses)."""
    fam, s = _addr16(src[0])
    fam2, d = _addr16(dst[0])
    if fam != fam2:
        raise ArmError("family_mismatch", f"{src[0]} and {dst[0]} are not the same family")
    return _KEY.pack(fam, s, d, socket.htons(src[1]), socket.htons(dst[1]))


@dataclass
class DirEntry:
    key: bytes
    src: tuple             # rewritten source (host, port)
    dst: tuple             # rewritten destination
    seq_delta: int
    ack_delta: int
    handover_end: int
    ifindex: int
    ts_base: int
    direction: int
    flags: int
    win_shift_in: int
    win_shift_out: int

    def pack(self, slot: int, gen: int) -> bytes:
        _, s = _addr16(self.src[0])
        _, d = _addr16(self.dst[0])
        return _DIR.pack(s, d, socket.htons(self.src[1]), socket.htons(self.dst[1]),
                         self.seq_delta & 0xFFFFFFFF, self.ack_delta & 0xFFFFFFFF,
                         self.handover_end & 0xFFFFFFFF, slot, self.ifindex,
                         self.ts_base & 0xFFFFFFFF, self.direction, self.flags,
                         self.win_shift_in, self.win_shift_out, gen)


@dataclass
class SpliceSide:
    """One of the proxy's two sockets: its addresses and state at arm time."""

    local: tuple           # getsockname()
    peer: tuple            # getpeername()
    snap: RepairSnapshot
    facts: TcpFacts


def flow_entries(c: SpliceSide, b: SpliceSide, *, c_out: int, b_out: int,
                 c_neigh: bool, b_neigh: bool) -> tuple[DirEntry, DirEntry]:
    """The two directions of one flow. Every byte the client sends from c.copied_seq on goes
    to the backend from b.write_seq on (the proxy writes the queued ones itself first);
    the backend's bytes from b.copied_seq on go to the client from c.write_seq on.

    c_out: ifindex towards the client (b2c packets leave there), b_out: towards the backend.
    """
    ts = F_TSTAMP if (c.facts.timestamps and b.facts.timestamps) else 0
    c2b = DirEntry(
        key=pack_key(c.peer, c.local), src=b.local, dst=b.peer,
        seq_delta=b.snap.write_seq - c.snap.copied_seq,
        ack_delta=b.snap.copied_seq - c.snap.write_seq,
        handover_end=0, ifindex=b_out, ts_base=b.snap.ts_base, direction=C2B,
        flags=ts | (F_NEIGH if b_neigh else 0),
        win_shift_in=c.facts.snd_wscale, win_shift_out=b.facts.rcv_wscale)
    b2c = DirEntry(
        key=pack_key(b.peer, b.local), src=c.local, dst=c.peer,
        seq_delta=c.snap.write_seq - b.snap.copied_seq,
        ack_delta=c.snap.copied_seq - b.snap.write_seq,
        handover_end=b.snap.write_seq + c.snap.queued, ifindex=c_out, ts_base=c.snap.ts_base,
        direction=B2C, flags=ts | (F_NEIGH if c_neigh else 0),
        win_shift_in=b.facts.snd_wscale, win_shift_out=c.facts.rcv_wscale)
    return c2b, b2c


@dataclass
class FlowState:
    bytes: tuple[int, int]
    packets: tuple[int, int]
    last_ns: int
    frozen: int
    fin: tuple[int, int]
    fin_acked: tuple[int, int]
    rst: bool
    engaged: bool
    reported: bool
    gen: int
    nxt: tuple[int, int]
    rst_from: int | None = None     # the direction (C2B: the client) whose RST came first
    fin_seq: tuple[int, int] = (0, 0)   # per direction: sequence number after its FIN

    @classmethod
    def unpack(cls, raw: bytes) -> "FlowState":
        f = _FLOW.unpack(raw)
        # tsoff0 tsoff1 fin_seq0 fin_seq1 tsl0 tsl1 fin0 fin1 fa0 fa1 rst engaged reported
        # ring gen pad2 frozen ctr
        # per direction: bytes packets last_ns nxt pad
        c0 = _CTR.unpack_from(f[17], 0)
        c1 = _CTR.unpack_from(f[17], _CTR.size)
        return cls((c0[0], c1[0]), (c0[1], c1[1]), max(c0[2], c1[2]), f[16], (f[6], f[7]),
                   (f[8], f[9]), bool(f[10]), bool(f[11]), bool(f[12]), f[14], (c0[3], c1[3]),
                   f[10] - 1 if f[10] else None, (f[2], f[3]))


def new_flow_value(ring: int, gen: int, nxt: tuple[int, int] = (0, 0)) -> bytes:
    now = time.monotonic_ns()       # last seen: the idle timeout counts from the arm
    ctr = (_CTR.pack(0, 0, now, nxt[0] & 0xFFFFFFFF, 0) +
           _CTR.pack(0, 0, now, nxt[1] & 0xFFFFFFFF, 0))
    return _FLOW.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ring, gen, 0, 0, ctr)


_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _pid() -> int:
    """os.getpid() without its syscall per hand-over (reset in every forked child)."""
    return _PID[0]


def seq_span(start: int, end: int) -> int:
    """Bytes from sequence number `start` to `end` (mod 2**32)."""
    return (end - start) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- tc hooks
@dataclass
class _Attached:
    ifindex: int
    name: str
    created_qdisc: bool
    filters: list[tuple[int, int, int]] = field(default_factory=list)  # (point, handle, prio)


class TcpSpliceDataPath:
    """The loaded object, its tc filters, and the flow maps (fds shared with forked workers)."""

    def __init__(self, obj: BpfObject, max_flows: int, claims: Map | None = None):
        self.obj = obj
        self.max_flows = max_flows
        self.flows = obj.map("sni_proxy_tsfw")
        self.state = obj.map("sni_proxy_tsfl")
        self.rings = obj.map("sni_proxy_tsrg")
        self.stat = obj.map("sni_proxy_tsst")
        # Slot claims shared by every worker: update(slot, pid, BPF_NOEXIST) is atomic
        # across processes, so two workers never arm the same slot.
        # value: (pid, counter row) of the claiming worker; pid 0: a flow of a previous
        # proxy, for the worker whose ring index is the row (see orphan_claims).
        self.claims = claims if claims is not None else Map.create(
            BPF_MAP_TYPE_HASH, 4, 8, max_flows, "sni_proxy_tscl")
        self.pin_dir: str | None = None
        self.pins: list[str] = []        # files this data path keeps pinned (removed at close)
        self.inherited = 0               # flows found in the pinned maps at start
        self.pin_note = ""               # why pinned maps found at start were not reused
        self._rings: dict[int, Map] = {}
        self.attached: list[_Attached] = []
        self._ifindexes: frozenset[int] | None = None      # cache of `ifindexes`
        self.stale_replaced = 0          # leftover filters of a killed proxy, replaced
        # Smallest MTU of the attached interfaces when they differ, else None: see mss_clamp().
        self.clamp_mtu: int | None = None
        # ebpf.sockstate.SocketStateReader: the hand-over reads each socket in one getsockopt;
        # None: with TCP_REPAIR (state_reader_note says why).
        self.state_reader = None
        self.state_reader_note = ""

    @classmethod
    def load(cls, max_flows: int, *, rings: int = MAX_RINGS,
             pin_dir: str | None = None) -> "TcpSpliceDataPath":
        """Load the object. With `pin_dir`, the flow maps (and the slot claims) pinned there
        by a previous proxy are reused, so its live flows go on (`inherited`); else new
        ones are created and pinned there."""
        old, note = None, ""
        if pin_dir:
            try:
                old = open_pinned(pin_dir, max_flows)
            except PinnedMismatch as exc:
                note = str(exc)
        obj = BpfObject(OBJECT, map_sizes={"sni_proxy_tsfw": 2 * max_flows,
                                           "sni_proxy_tsfl": max_flows,
                                           "sni_proxy_tsrg": rings}, layouts=LAYOUTS)
        try:
            if old is not None:
                obj.reuse_map("sni_proxy_tsfw", old[PIN_FLOWS])
                obj.reuse_map("sni_proxy_tsfl", old[PIN_STATE])
            obj.load()
        except Exception:
            for m in (old or {}).values():
                m.close()
            raise
        try:
            dp = cls(obj, max_flows, old[PIN_CLAIMS] if old is not None else None)
            dp.pin_note = note
            if old is not None:
                old[PIN_FLOWS].close()             # libbpf holds its own duplicate
                old[PIN_STATE].close()
                dp.inherited = len(dp.claimed())
            if pin_dir:
                dp._pin(pin_dir, fresh=old is None)
            return dp
        except Exception:
            obj.close()
            raise

    def _pin(self, pin_dir: str, *, fresh: bool) -> None:
        os.makedirs(pin_dir, exist_ok=True)
        self.pin_dir = pin_dir
        for name, m in ((PIN_FLOWS, self.flows), (PIN_STATE, self.state),
                        (PIN_CLAIMS, self.claims)):
            path = os.path.join(pin_dir, name)
            if fresh:
                m.pin(path)
            self.pins.append(path)

    def orphan_claims(self, workers: int) -> int:
        """Every claimed slot becomes a previous proxy's flow (pid 0), spread over the new
        workers by ring index (row = slot % workers): each is watched by exactly one of
        them, which removes it when it ended and lingered or went idle. How many."""
        n = 0
        for slot in list(self.claimed()):
            self.claims.update(slot, struct.pack("=II", 0, slot % max(1, workers)), BPF_ANY)
            n += 1
        return n

    def unpin(self) -> None:
        """Remove the pins (the maps live on while a program or fd holds them)."""
        for path in self.pins:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.pins.clear()
        if self.pin_dir:
            try:
                os.rmdir(self.pin_dir)
            except OSError:
                pass                      # not empty (not only ours) or already gone

    # --- interfaces ---------------------------------------------------------------------
    def attach(self, interfaces: list[str]) -> None:
        """clsact ingress + egress on each interface; on failure, removes what it added."""
        try:
            for name in interfaces:
                ifindex = socket.if_nametoindex(name)
                if any(a.ifindex == ifindex for a in self.attached):
                    continue
                created = _lb.tc_hook_create(ifindex)
                att = _Attached(ifindex, name, created)
                self.attached.append(att)
                self._ifindexes = None
                for point, prog in ((_lb.BPF_TC_INGRESS, INGRESS_PROG),
                                    (_lb.BPF_TC_EGRESS, EGRESS_PROG)):
                    fd = self.obj.program(prog).fd
                    try:
                        handle, prio = _lb.tc_attach(ifindex, point, fd, TC_PRIORITY, TC_HANDLE)
                    except BpfError as exc:
                        if exc.errno != errno.EEXIST:
                            raise
                        # A killed proxy's filter, replaced atomically: with pinned maps
                        # its flows go on in ours; without, they end here (their next
                        # packet meets a stack without their sockets: a RST).
                        self.stale_replaced += 1
                        # ... and the clsact qdisc it sits on was that proxy's creation too
                        # (the alternative, leaving it, would leave it forever).
                        att.created_qdisc = True
                        handle, prio = _lb.tc_replace(ifindex, point, fd, TC_PRIORITY, TC_HANDLE)
                    att.filters.append((point, handle, prio))
        except Exception:
            self.detach()
            raise
        mtus = {_mtu(a.name) for a in self.attached} - {None}
        self.clamp_mtu = min(mtus) if len(mtus) > 1 else None

    def mss_clamp(self, family: int) -> int | None:
        """The TCP_MAXSEG for a socket of `family` that may be spliced, or None (no clamp).

        A spliced segment keeps its size from one connection to the other, so every segment
        either end sends must fit the smallest MTU of the interfaces a flow can use: the MSS
        the proxy advertises (listener, backend socket before connect) is clamped to it."""
        if self.clamp_mtu is None:
            return None
        return self.clamp_mtu - (60 if family == socket.AF_INET6 else 40)

    def clamp(self, sock: socket.socket) -> None:
        """TCP_MAXSEG before listen() (accepted sockets inherit it and their SYN-ACK advertises
        it) or before connect() (the SYN does), when the attached interfaces' MTUs differ."""
        if self.clamp_mtu is None:      # before sock.family: an IntEnum built per call
            return
        mss = self.mss_clamp(sock.family)
        if mss is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)

    @property
    def ifindexes(self) -> frozenset[int]:
        """The attached interfaces (read by every hand-over: built once per change)."""
        if self._ifindexes is None:
            self._ifindexes = frozenset(a.ifindex for a in self.attached)
        return self._ifindexes

    def detach(self) -> None:
        """Remove exactly our filters, and the clsact qdisc where we created it."""
        errors = []
        for att in reversed(self.attached):
            try:
                for point, handle, prio in att.filters:
                    _lb.tc_detach(att.ifindex, point, handle, prio)
                if att.created_qdisc:
                    _lb.tc_hook_destroy(att.ifindex)
            except BpfError as exc:
                errors.append(f"{att.name}: {exc}")
        self.attached.clear()
        self._ifindexes = None
        if errors:
            raise BpfError("removing the tcp_splice tc hooks", errno.EIO,
                           hint="; ".join(errors) + " (see `tc filter show dev IF ingress`)")

    # --- rings ----------------------------------------------------------------------------
    def new_ring(self, index: int) -> Map:
        return install_ring(self.rings, self._rings, index, RING_BYTES, "sni_proxy_tsrb")

    # --- flows ----------------------------------------------------------------------------
    def claim_slot(self, start: int, row: int = 0) -> int | None:
        """A free flow slot (claimed for this process), searching from `start`; None: full."""
        pid = struct.pack("=II", _pid(), row)
        n = self.max_flows
        for i in range(n):
            slot = (start + i) % n
            try:
                self.claims.update(slot, pid, BPF_NOEXIST)
                return slot
            except BpfError as exc:
                if exc.errno == errno.EEXIST:
                    continue
                if exc.errno == errno.E2BIG:
                    return None
                raise
        return None

    def release_slot(self, slot: int) -> None:
        self.claims.delete(slot)

    def insert(self, slot: int, gen: int, ring: int, entries: tuple[DirEntry, DirEntry],
               starts: tuple[int, int] = (0, 0)) -> None:
        """Flow state first, then both directions (BPF_NOEXIST: a tuple already spliced is
        refused). On failure nothing stays in the maps. `starts`: the first sequence number
        of each direction in the receiver's space (for the byte counts)."""
        self.state.update(slot, new_flow_value(ring, gen, starts), BPF_ANY)
        done = []
        try:
            for entry in entries:
                self.flows.update(entry.key, entry.pack(slot, gen), BPF_NOEXIST)
                done.append(entry)
        except BpfError as exc:
            for entry in done:
                self.flows.delete(entry.key)
            if exc.errno == errno.EEXIST:
                raise ArmError("tuple_busy", "this 4-tuple is still spliced (lingering flow)")
            if exc.errno == errno.E2BIG:
                raise ArmError("map_full", "the tcp_splice flow map is full "
                               "(raise ebpf.tcp_splice.max_flows)")
            raise

    def update(self, slot: int, gen: int, entry: DirEntry) -> None:
        self.flows.update(entry.key, entry.pack(slot, gen), BPF_ANY)

    def remove(self, entries: tuple[DirEntry, ...], slot: int | None = None,
               gen: int | None = None) -> None:
        """Delete the entries; with slot and gen, only those still of that flow (see
        delete_keys)."""
        if slot is None:
            for entry in entries:
                self.flows.delete(entry.key)
        else:
            self.delete_keys([e.key for e in entries], slot, gen)

    def delete_keys(self, keys: list[bytes], slot: int, gen: int) -> None:
        """Delete the flow-map keys that still point at (slot, gen): the BPF program deletes
        a finished flow's entries when a SYN reuses its tuple, and the new connection may be
        spliced on the same keys before the old flow's linger is over."""
        for key in keys:
            raw = self.flows.lookup(key)
            if raw is None:
                continue
            f = _DIR.unpack(raw)
            if (f[7], f[14]) == (slot, gen):
                self.flows.delete(key)

    def claimed(self) -> dict[int, tuple[int, int]]:
        """slot -> (pid, counter row) of every claimed flow slot (O(n): at worker start)."""
        return {int.from_bytes(k, "little"): struct.unpack("=II", v)
                for k, v in self.claims.items()}

    def entries_of(self, slot: int) -> list[bytes]:
        """The flow-map keys pointing at `slot` (O(n): orphan clean-up only)."""
        out = []
        for key, value in self.flows.items():
            if _DIR.unpack(value)[7] == slot:
                out.append(key)
        return out

    def flow(self, slot: int) -> FlowState:
        raw = self.state.lookup(slot)
        return FlowState.unpack(raw)

    def stats(self) -> dict[str, int]:
        return {name: self.stat.percpu_sum(i) for i, name in enumerate(_STAT_NAMES)}

    def entries(self) -> int:
        return self.flows.count()

    def close(self) -> None:
        try:
            self.detach()
        finally:
            self.unpin()
            for ring in self._rings.values():
                ring.close()
            self._rings.clear()
            self.claims.close()
            if self.state_reader is not None:
                self.state_reader.close()
                self.state_reader = None
            self.obj.close()


def pid_alive(pid: int) -> bool:
    """The process that claimed a flow slot still runs (a zombie does not: a killed proxy's
    workers may wait a while for a parent to reap them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold one)
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


# Pinned under ebpf.tcp_splice.pin_path: file name -> what
PIN_FLOWS, PIN_STATE, PIN_CLAIMS = "flows", "state", "claims"


def open_pinned(pin_dir: str, max_flows: int) -> dict[str, Map] | None:
    """The maps a previous proxy pinned in `pin_dir`, if all are there and fit this config;
    else None (leftovers that do not fit are unpinned: their flows cannot be kept)."""
    shapes = {PIN_FLOWS: (_KEY.size, _DIR.size, 2 * max_flows),
              PIN_STATE: (4, _FLOW.size, max_flows),
              PIN_CLAIMS: (4, 8, max_flows)}
    paths = {name: os.path.join(pin_dir, name) for name in shapes}
    present = [name for name, path in paths.items() if os.path.exists(path)]
    if not present:
        return None
    maps: dict[str, Map] = {}
    why = ""
    try:
        if len(present) != len(paths):
            why = f"only {', '.join(present)} of {', '.join(paths)} are pinned"
        else:
            for name, path in paths.items():
                maps[name] = m = Map.from_pinned(path)
                if (m.key_size, m.value_size, m.max_entries) != shapes[name]:
                    why = (f"{path} has {m.max_entries} entries of {m.key_size}/{m.value_size}"
                           f" bytes, this configuration needs {shapes[name][2]} of "
                           f"{shapes[name][0]}/{shapes[name][1]} (ebpf.tcp_splice.max_flows "
                           "changed, or another sni-proxy version)")
                    break
    except OSError as exc:              # BpfError is an OSError
        why = f"opening the pinned maps in {pin_dir} failed: {exc}"
    if not why:
        return maps
    for m in maps.values():
        m.close()
    for path in paths.values():
        try:
            os.unlink(path)
        except OSError:
            pass
    raise PinnedMismatch(why)


class PinnedMismatch(Exception):
    """The pinned maps of a previous proxy cannot be used (now unpinned); str() says why."""


class FlowEnd:
    """A flow's final state as its end event carries it: the FlowState fields the relay reads
    at the end (so the end costs no map lookup)."""

    __slots__ = ("gen", "fin", "fin_acked", "rst_from", "fin_seq", "nxt")

    def __init__(self, gen: int, rst: int, fin: tuple[int, int], fin_acked: tuple[int, int],
                 fin_seq: tuple[int, int], nxt: tuple[int, int]):
        self.gen = gen
        self.fin = fin
        self.fin_acked = fin_acked
        self.rst_from = rst - 1 if rst else None
        self.fin_seq = fin_seq
        self.nxt = nxt


def parse_event(raw: bytes) -> tuple[int, int, int, FlowEnd]:
    f = _EVENT.unpack(raw[:_EVENT.size])
    # flow gen why rst fin0 fin1 fa0 fa1 fin_seq0 fin_seq1 nxt0 nxt1
    return f[0], f[1], f[2], FlowEnd(f[1], f[3], (f[4], f[5]), (f[6], f[7]), (f[8], f[9]),
                                     (f[10], f[11]))


class EventRing(MmapRingReader[tuple[int, int, int, FlowEnd]]):
    """Consumer of one worker's ring buffer: sni_proxy_ts_event records -> (flow, gen, why,
    FlowEnd)."""

    def __init__(self, ring: Map):
        super().__init__(ring, _EVENT.size, parse_event)
