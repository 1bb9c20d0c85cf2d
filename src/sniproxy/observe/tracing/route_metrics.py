"""The proxy's own TCP figures per route, measured by the kernel (config: ebpf.tracing.network).

The network tracer's BPF object in its `scope_cookies` mode: the proxy tags each socket it
creates (backend, before connect) or accepts (client, once routed) with the route, by socket
cookie, in a shared LRU map; the programs count only tagged sockets, into per-CPU per-route
counters: connect latency histogram (SYN_SENT -> ESTABLISHED), connect failures by reason,
retransmitted segments, smoothed RTT at close. No ring buffer, no user-space work per
connection beyond one map update (a bpf(2) call) per tagged socket.

Started in the supervisor before the workers fork, so every worker inherits the tag map.
"""
from __future__ import annotations

import socket
import zlib
from dataclasses import dataclass

from sniproxy.ebpf.layout import EnumLayout, StructLayout

from .base import BaseTracer, TracerError

OBJECT = "sni_proxy_trace_tcp"
MAP_TAGS, MAP_ROUTES = "sni_proxy_tcrt", "sni_proxy_tcagg"
SIDE_BACKEND, SIDE_CLIENT = 0, 1
SIDES = {SIDE_BACKEND: "backend", SIDE_CLIENT: "client"}
_SIDE_IDS = {name: i for i, name in SIDES.items()}
HIST_SLOTS = 32
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)

# What Python reads of the object, checked against its BTF at open (ebpf/layout.py).
FAIL_LAYOUT = EnumLayout("fail_reason", "FAIL_",
                         ("refused", "reset", "timed_out", "unreachable", "aborted", "other"),
                         end="FAIL_MAX")
FAIL_REASONS = FAIL_LAYOUT.names
TAG_LAYOUT = StructLayout("route_tag", (("route", "I"), ("side", "I")))
STATS_LAYOUT = StructLayout("route_stats", (
    ("connect_hist", f"{HIST_SLOTS}Q"), ("connects", "Q"), ("connect_sum_us", "Q"),
    ("connect_fail", f"{len(FAIL_REASONS)}Q"), ("retrans_segs", "Q"), ("closes", "Q"),
    ("srtt_sum_us", "Q")))
LAYOUTS = (FAIL_LAYOUT, TAG_LAYOUT, STATS_LAYOUT)
_TAG = TAG_LAYOUT.struct
_STATS = STATS_LAYOUT.struct
#: (route, side) -> packed tag kept; routes are few, the bound only guards against misuse.
_MAX_CACHED_VALUES = 4096
#: Sockets tagged at once (LRU beyond: the oldest tag goes, its socket is no longer counted).
DEFAULT_MAX_TAGGED = 65536


def route_id(name: str) -> int:
    """The 32-bit id of a route name in the kernel maps."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class RouteTcpStats:
    route: int
    side: str
    connect_hist_us: tuple[int, ...]   # log2 buckets: i = [2^i, 2^(i+1)) us
    connects: int
    connect_sum_us: int
    connect_failures: dict[str, int]
    retrans_segs: int
    closes: int
    srtt_sum_us: int


class RouteNetworkTracer(BaseTracer):
    NAME = "route network tracer"
    OBJECT = OBJECT
    LAYOUTS = LAYOUTS
    PROGRAMS = {"tp_btf": ("sni_proxy_tcstb", "sni_proxy_tcrtb"),
                "raw_tp": ("sni_proxy_tcstr", "sni_proxy_tcrtr")}

    def __init__(self, max_tagged: int = DEFAULT_MAX_TAGGED) -> None:
        super().__init__()
        if max_tagged <= 0:
            raise TracerError("route network tracer: max_tagged must be positive")
        self.max_tagged = max_tagged
        self._tags = None
        self._values: dict[tuple[str, str], bytes] = {}

    def _rodata(self) -> dict:
        from sniproxy.ebpf import libbpf
        try:
            has_err = libbpf.vmlinux_tracepoint_arg_count("tcp_retransmit_skb") >= 3
        except libbpf.BpfError:
            has_err = False
        return {"scope_cookies": 1, "emit_close": 0, "emit_connect": 0,
                "retrans_has_err": int(has_err)}

    def _map_sizes(self) -> dict:
        # the ring buffer is unused in this mode: the smallest the kernel takes
        return {MAP_TAGS: self.max_tagged, "sni_proxy_tcrb": 4096, "sni_proxy_tcsk": 1}

    def _after_attach(self) -> None:
        self._tags = self._obj.map(MAP_TAGS)

    def tag(self, sock: socket.socket, route: str, side: str) -> bool:
        """Count this socket's TCP figures under `route`, side "backend" (call before connect())
        or "client". False when not running or the kernel refused; never raises (it runs on
        the proxy's connection path)."""
        tags = self._tags
        if tags is None:
            return False
        value = self._values.get((route, side))
        try:
            if value is None:
                if len(self._values) >= _MAX_CACHED_VALUES:
                    self._values.clear()
                value = self._values[(route, side)] = _TAG.pack(route_id(route), _SIDE_IDS[side])
            # SO_COOKIE's 8 bytes are the map key as they come (native order, both sides)
            tags.update(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), value)
            return True
        except (OSError, KeyError, ValueError):
            return False

    def read(self) -> list[RouteTcpStats]:
        obj = self._require_obj("read()")
        out = []
        for key, per_cpu in obj.map(MAP_ROUTES).lookup_batch():
            rid, side = _TAG.unpack(key)
            sums = [0] * (HIST_SLOTS + 2 + len(FAIL_REASONS) + 3)
            for raw in per_cpu:
                for i, v in enumerate(_STATS.unpack(raw)):
                    sums[i] += v
            hist = tuple(sums[:HIST_SLOTS])
            connects, connect_sum = sums[HIST_SLOTS], sums[HIST_SLOTS + 1]
            fails = sums[HIST_SLOTS + 2:HIST_SLOTS + 2 + len(FAIL_REASONS)]
            retrans, closes, srtt_sum = sums[-3:]
            out.append(RouteTcpStats(route=rid, side=SIDES.get(side, str(side)),
                                     connect_hist_us=hist, connects=connects,
                                     connect_sum_us=connect_sum,
                                     connect_failures=dict(zip(FAIL_REASONS, fails)),
                                     retrans_segs=retrans, closes=closes,
                                     srtt_sum_us=srtt_sum))
        return out
