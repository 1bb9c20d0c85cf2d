"""EbpfNetworkTracer: TCP lifecycle rows, connect latency and failures, retransmits.

One BPF object (sni_proxy_trace_tcp) on sock:inet_sock_set_state and tcp:tcp_retransmit_skb;
events arrive through a ring buffer read by a thread into a bounded list::

    with EbpfNetworkTracer(events=("close", "connect", "retrans"), pid=os.getpid()) as t:
        ...
        for ev in t.snapshot().events:
            print(ev.kind, ev.saddr, ev.sport, ev.daddr, ev.dport, ev.tx_bytes, ev.rx_bytes)
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sniproxy.ebpf.layout import EnumLayout, StructLayout

from .base import BaseTracer, RingReader, TracerError

OBJECT = "sni_proxy_trace_tcp"
MAP_SOCKS, MAP_RING, MAP_STATS = "sni_proxy_tcsk", "sni_proxy_tcrb", "sni_proxy_tcsta"
# What Python reads of the object, checked against its BTF at open (ebpf/layout.py).
#: Slots of sni_proxy_tcsta (enum tcp_stat); "sockets_full" is C's SOCKS_FULL.
STATS_LAYOUT = EnumLayout("tcp_stat", "TCP_STAT_", ("ring_full", "sockets_full", "events"),
                          end="TCP_STAT_MAX", c_names=("ring_full", "socks_full", "events"))
STAT_NAMES = STATS_LAYOUT.names
#: enum tcp_event_kind (from 1); "connect_failed" is C's CONNECT_FAIL.
KIND_LAYOUT = EnumLayout("tcp_event_kind", "TCP_EV_",
                         ("close", "connect", "connect_failed", "retrans"), first=1,
                         c_names=("close", "connect", "connect_fail", "retrans"))
#: struct tcp_event (128 bytes): the compiler pads 4 bytes before ts_ns.
EVENT_LAYOUT = StructLayout("tcp_event", (
    ("kind", "B"), ("family", "B"), ("state", "B"), ("pad", "B"), ("tgid", "I"), ("tid", "I"),
    ("err", "i"), ("saddr", "16s"), ("daddr", "16s"), ("sport", "H"), ("dport", "H"),
    ("ts_ns", "4xQ"), ("duration_ns", "Q"), ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("srtt_us", "I"), ("total_retrans", "I"), ("segs", "I"), ("pad2", "I"), ("cookie", "Q"),
    ("comm", "16s")))
LAYOUTS = (STATS_LAYOUT, KIND_LAYOUT, EVENT_LAYOUT)
MAX_PORTS = 8
EVENT_KINDS = ("close", "connect", "retrans")
_KIND_NAMES = {KIND_LAYOUT.value(name): name for name in KIND_LAYOUT.names}
_EVENT = EVENT_LAYOUT.struct

DEFAULT_MAX_EVENTS = 100_000
DEFAULT_RING_BYTES = 1 << 20
DEFAULT_MAX_SOCKETS = 65536

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}


def connect_failure_reason(err: int) -> str:
    """sk_err of a socket that left SYN_SENT for CLOSE -> the reason operators know.

    A RST answering the SYN is ECONNREFUSED in the kernel (tcp_reset() in SYN_SENT), an ICMP
    error is its errno (host/net unreachable), the SYN retries running out is ETIMEDOUT,
    an abort by tcp_disconnect() is ECONNRESET; 0 means the application closed the socket
    before the handshake ended (its own connect timeout, typically)."""
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ECONNRESET:
        return "reset"
    if err == errno.ETIMEDOUT:
        return "timed_out"
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN):
        return "unreachable"
    if err == 0:
        return "aborted"
    return errno.errorcode.get(err, f"errno_{err}").lower()


@dataclass(frozen=True)
class TcpEvent:
    kind: str               # close | connect | connect_failed | retrans
    pid: int
    tid: int
    comm: str
    family: int             # 4 or 6
    saddr: str
    sport: int
    daddr: str
    dport: int
    ts_ns: int              # CLOCK_MONOTONIC of the event
    duration_ns: int        # close: lifetime; connect*: SYN_SENT -> outcome
    tx_bytes: int           # close: bytes sent and acknowledged (tcp_sock.bytes_acked)
    rx_bytes: int           # close: bytes received (tcp_sock.bytes_received)
    srtt_us: int            # smoothed RTT
    total_retrans: int      # segments retransmitted over the life (close, retrans)
    segs: int               # retrans: segments in this retransmission
    err: int                # connect_failed: sk_err; close: sk_err; retrans: send error
    state: str              # close: state before CLOSE; retrans: current state
    sock: int               # kernel socket address: one flow while it lives

    @property
    def reason(self) -> str:
        return connect_failure_reason(self.err) if self.kind == "connect_failed" else ""

    @property
    def flow(self) -> tuple[str, int, str, int]:
        return self.saddr, self.sport, self.daddr, self.dport


def _addr(raw: bytes, family: int) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def decode_event(data: bytes) -> TcpEvent:
    (kind, family, state, _pad, tgid, tid, err, saddr, daddr, sport, dport, ts, duration,
     acked, received, srtt, retrans, segs, _pad2, cookie, comm) = _EVENT.unpack_from(data)
    return TcpEvent(
        kind=_KIND_NAMES.get(kind, f"kind_{kind}"), pid=tgid, tid=tid,
        comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
        family=4 if family == socket.AF_INET else 6, saddr=_addr(saddr, family), sport=sport,
        daddr=_addr(daddr, family), dport=dport, ts_ns=ts, duration_ns=duration,
        tx_bytes=acked, rx_bytes=received, srtt_us=srtt, total_retrans=retrans, segs=segs,
        err=err, state=TCP_STATES.get(state, str(state)) if state else "", sock=cookie)


@dataclass(frozen=True)
class NetworkSnapshot:
    events: list[TcpEvent]
    stats: dict[str, int]    # ring_full, sockets_full, events (BPF side)
    dropped: int             # events dropped in user space (max_events reached)
    elapsed_s: float

    def of_kind(self, *kinds: str) -> list[TcpEvent]:
        return [e for e in self.events if e.kind in kinds]

    def retrans_by_flow(self) -> dict[tuple[str, int, str, int], int]:
        """Retransmitted segments per (saddr, sport, daddr, dport): tcpretrans -c."""
        out: dict[tuple[str, int, str, int], int] = {}
        for e in self.of_kind("retrans"):
            out[e.flow] = out.get(e.flow, 0) + max(e.segs, 1)
        return out


def _ports(ports: Iterable[int] | None, what: str) -> tuple[int, ...]:
    out = tuple(sorted(set(ports or ())))
    if len(out) > MAX_PORTS:
        raise TracerError(f"network tracer: {len(out)} {what} ports: at most {MAX_PORTS}")
    if any(not 0 < p < 65536 for p in out):
        raise TracerError(f"network tracer: {what} ports {out}: a port is 1..65535")
    return out


class EbpfNetworkTracer(BaseTracer):
    """TCP events of every process or one pid, filtered by family and ports in BPF."""

    NAME = "network tracer"
    OBJECT = OBJECT
    LAYOUTS = LAYOUTS
    PROGRAMS = {"tp_btf": ("sni_proxy_tcstb", "sni_proxy_tcrtb"),
                "raw_tp": ("sni_proxy_tcstr", "sni_proxy_tcrtr")}

    def __init__(self, *, events: Iterable[str] = EVENT_KINDS, pid: int | None = None,
                 family: int | None = None, local_ports: Iterable[int] | None = None,
                 remote_ports: Iterable[int] | None = None,
                 max_events: int = DEFAULT_MAX_EVENTS, ring_bytes: int = DEFAULT_RING_BYTES,
                 max_sockets: int = DEFAULT_MAX_SOCKETS,
                 on_event: Callable[[TcpEvent], None] | None = None) -> None:
        super().__init__()
        self.events = tuple(events)
        bad = [e for e in self.events if e not in EVENT_KINDS]
        if bad or not self.events:
            raise TracerError(f"network tracer: events {bad or '()'}: choose among "
                              f"{', '.join(EVENT_KINDS)}")
        if family not in (None, 4, 6):
            raise TracerError(f"network tracer: family {family!r}: 4, 6 or None (both)")
        if ring_bytes < 4096 or ring_bytes & (ring_bytes - 1):
            raise TracerError(f"network tracer: ring_bytes {ring_bytes}: a power of two "
                              ">= 4096 (the kernel's rule for ring buffers)")
        if max_events <= 0 or max_sockets <= 0:
            raise TracerError("network tracer: max_events and max_sockets must be positive")
        self.pid = pid
        self.family = family
        self.local_ports = _ports(local_ports, "local")
        self.remote_ports = _ports(remote_ports, "remote")
        self.max_events = max_events
        self.ring_bytes = ring_bytes
        self.max_sockets = max_sockets
        self.on_event = on_event
        self._reader: RingReader | None = None
        self._final: NetworkSnapshot | None = None

    def _rodata(self) -> dict:
        from sniproxy.ebpf import libbpf
        try:
            has_err = libbpf.vmlinux_tracepoint_arg_count("tcp_retransmit_skb") >= 3
        except libbpf.BpfError:
            has_err = False
        lports = list(self.local_ports) + [0] * (MAX_PORTS - len(self.local_ports))
        dports = list(self.remote_ports) + [0] * (MAX_PORTS - len(self.remote_ports))
        return {
            "filter_tgid": self.pid or 0,
            "filter_family": {None: 0, 4: socket.AF_INET, 6: socket.AF_INET6}[self.family],
            "filter_lports": struct.pack(f"={MAX_PORTS}H", *lports),
            "filter_nlports": len(self.local_ports),
            "filter_dports": struct.pack(f"={MAX_PORTS}H", *dports),
            "filter_ndports": len(self.remote_ports),
            "emit_close": int("close" in self.events),
            "emit_connect": int("connect" in self.events),
            "retrans_has_err": int(has_err),
        }

    def _map_sizes(self) -> dict:
        return {MAP_SOCKS: self.max_sockets, MAP_RING: self.ring_bytes}

    def _programs_for(self, hook: str) -> tuple[str, ...]:
        state, retrans = self.PROGRAMS[hook]
        wanted = []
        if "close" in self.events or "connect" in self.events:
            wanted.append(state)
        if "retrans" in self.events:
            wanted.append(retrans)
        return tuple(wanted)

    def _after_attach(self) -> None:
        self._reader = RingReader(self, MAP_RING, decode_event, self.max_events, self.on_event)

    def _before_release(self) -> None:
        # The links are closed: after the reader's last consume nothing more can come.
        reader, self._reader = self._reader, None
        events, dropped = [], 0
        if reader is not None:
            reader.close()
            events, dropped = reader.take(clear=False)
        self._final = NetworkSnapshot(events=events, stats=self.stats(), dropped=dropped,
                                      elapsed_s=self.elapsed_s())

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        super()._release()

    def stats(self) -> dict[str, int]:
        return self._stat_counters(MAP_STATS, STAT_NAMES)

    def snapshot(self, clear: bool = False) -> NetworkSnapshot:
        """Events so far (clear=True: and forget them). After stop(): the final snapshot."""
        if self._obj is None and self._final is not None:
            return self._final
        self._require_obj("snapshot()")
        assert self._reader is not None
        t = time.thread_time_ns()
        try:
            self._reader.flush()
            events, dropped = self._reader.take(clear)
            return NetworkSnapshot(events=events, stats=self.stats(), dropped=dropped,
                                   elapsed_s=self.elapsed_s())
        finally:
            self._add_cpu(time.thread_time_ns() - t)

    def wait_for(self, predicate: Callable[[NetworkSnapshot], bool],
                 timeout_s: float) -> NetworkSnapshot:
        """Wait (woken by each arriving event) until predicate(snapshot) holds or timeout_s
        passes; returns the last snapshot either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self._reader.received if self._reader is not None else 0
            snap = self.snapshot()
            left = deadline - time.monotonic()
            if predicate(snap) or left <= 0 or self._reader is None:
                return snap
            self._reader.wait_new(seen, left)
