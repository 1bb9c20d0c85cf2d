"""The DNS cache's shared level: a BPF LRU hash map used by all workers.

Costs measured here (issue 5): a map lookup from Python is a syscall, 1.2-3.7 us, against
0.06-0.17 us for a dict. So the proxy uses two levels (`proxy.resolver.TwoLevelDnsCache`):
* level 1: a small `MemoryDnsCache` per worker (no syscall);
* level 2: this module's `SharedDnsMap`, the LRU map `sni_proxy_dns` (one syscall), filled by
  whichever worker resolved the name first. A level-2 hit is copied into level 1.
Both levels honour the answer's TTL (`expires_at` on CLOCK_MONOTONIC, the resolver's clock,
which is the same for every process of a boot). The kernel evicts least-recently-used
entries at `max_entries`.

Sharing: the map is created in the supervisor before it forks (workers inherit the fd) and,
when a bpffs is mounted at the pin path, pinned there so it also survives a restart of the
whole proxy (`open_dns_map`). Without bpffs and as root, /sys/fs/bpf is mounted first (logged).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from sniproxy.ebpf import bpffs
from sniproxy.ebpf.objects import BPF_ANY, BPF_MAP_TYPE_LRU_HASH, BpfError, Map

log = logging.getLogger("sniproxy")

MAP_NAME = "sni_proxy_dns"
PIN_FILE = "dns_cache"
# A DNS name is at most 253 characters; the key is the name NUL-padded to this size.
KEY_BYTES = 256
MAX_ADDRESSES = 8           # addresses kept per name (Happy Eyeballs needs few)
REASON_BYTES = 64           # the text of a negative answer ("NXDOMAIN ..."), truncated
# expires_at (f64), negative, count, reason length, pad, then addresses (family + 16 bytes).
_HEAD = struct.Struct("=dBBB5x")
_ADDR = struct.Struct("=B16s")
VALUE_BYTES = _HEAD.size + MAX_ADDRESSES * _ADDR.size + REASON_BYTES


class DnsRecord(NamedTuple):
    """One cached answer as the map stores it (the same fields as the resolver's CachedAnswer)."""
    addresses: tuple[str, ...]
    expires_at: float           # CLOCK_MONOTONIC seconds
    negative: bool = False
    reason: str = ""


def encode_key(name: str) -> bytes | None:
    raw = name.encode("idna" if not name.isascii() else "ascii", "replace")
    return raw.ljust(KEY_BYTES, b"\0") if len(raw) < KEY_BYTES else None


def encode_answer(answer) -> bytes:
    """Any object with DnsRecord's fields (the resolver's CachedAnswer) -> the map value."""
    addrs = []
    for text in answer.addresses[:MAX_ADDRESSES]:
        ip = ipaddress.ip_address(text)
        addrs.append(_ADDR.pack(ip.version, ip.packed.ljust(16, b"\0")))
    reason = answer.reason.encode("utf-8", "replace")[:REASON_BYTES]
    return (_HEAD.pack(answer.expires_at, int(answer.negative), len(addrs), len(reason))
            + b"".join(addrs).ljust(MAX_ADDRESSES * _ADDR.size, b"\0")
            + reason.ljust(REASON_BYTES, b"\0"))


def decode_answer(raw: bytes) -> DnsRecord:
    expires, negative, count, reason_len = _HEAD.unpack_from(raw, 0)
    addrs = []
    for i in range(min(count, MAX_ADDRESSES)):
        version, packed = _ADDR.unpack_from(raw, _HEAD.size + i * _ADDR.size)
        addrs.append(str(ipaddress.IPv4Address(packed[:4]) if version == 4
                         else ipaddress.IPv6Address(packed)))
    start = _HEAD.size + MAX_ADDRESSES * _ADDR.size
    reason = raw[start:start + reason_len].decode("utf-8", "replace")
    return DnsRecord(tuple(addrs), expires, bool(negative), reason)


# ----------------------------------------------------------------------------- the map
@dataclass
class DnsMap:
    map: Map
    pinned_at: str | None       # file on bpffs, or None (shared by fd inheritance only)
    note: str                   # how it was opened, or why pinning is off


def _compatible(m: Map, max_entries: int) -> bool:
    return (m.type == BPF_MAP_TYPE_LRU_HASH and m.key_size == KEY_BYTES
            and m.value_size == VALUE_BYTES and m.max_entries == max_entries)


def open_dns_map(max_entries: int, pin_path: str | None, *,
                 pin_problem: str | None = None) -> DnsMap:
    """The shared LRU map: the pinned one when compatible, else a new one (pinned if possible).

    `pin_problem`: why pin_path cannot be used, as the start-up code's `bpffs.ensure_mounted`
    found (it mounts bpffs when it may); None means look here (no mounting). Raises BpfError
    when the map cannot be created at all.
    """
    if pin_path is None:
        m = Map.create(BPF_MAP_TYPE_LRU_HASH, KEY_BYTES, VALUE_BYTES, max_entries, MAP_NAME)
        return DnsMap(m, None, "ebpf.dns_cache.pin_path is null: shared by fd inheritance only")
    why_not = pin_problem
    if why_not is None and not bpffs.is_bpffs(pin_path):
        why_not = (f"{pin_path} is not on a bpffs (mount one: `mount -t bpf bpf <dir>`, or use "
                   f"a path under {bpffs.DEFAULT})")
    if why_not is not None:
        m = Map.create(BPF_MAP_TYPE_LRU_HASH, KEY_BYTES, VALUE_BYTES, max_entries, MAP_NAME)
        return DnsMap(m, None, why_not)
    file = str(Path(pin_path) / PIN_FILE)
    if os.path.exists(file):
        try:
            old = Map.from_pinned(file)
        except BpfError as exc:
            old = None
            log.warning("cannot open the pinned DNS cache %s (%s): replacing it", file, exc)
        if old is not None:
            if _compatible(old, max_entries):
                return DnsMap(old, file, f"reused the pinned map {file}")
            log.info("pinned DNS cache %s has another layout or size (max_entries %d, wanted %d): "
                     "replacing it", file, old.max_entries, max_entries)
            old.close()
        os.unlink(file)
    m = Map.create(BPF_MAP_TYPE_LRU_HASH, KEY_BYTES, VALUE_BYTES, max_entries, MAP_NAME)
    try:
        os.makedirs(pin_path, exist_ok=True)
        m.pin(file)
    except OSError as exc:
        return DnsMap(m, None, f"pinning at {file} failed: {exc}")
    return DnsMap(m, file, f"pinned at {file}")


# ----------------------------------------------------------------------------- the cache
class SharedDnsMap:
    """Level 2 of the proxy's DNS cache: get/put on the shared map, expiry on read, counted."""

    def __init__(self, dns_map: Map, counters=None):
        self.map = dns_map
        self.max_entries = dns_map.max_entries
        self.counters = counters          # stats.CounterRow (shared by all workers) or None
        self.local = {"dns_l2_hit": 0, "dns_miss": 0, "dns_l2_expired": 0, "dns_put": 0,
                      "dns_l2_errors": 0}

    def count(self, name: str) -> None:
        self.local[name] = self.local.get(name, 0) + 1
        if self.counters is not None:
            self.counters.add(name)

    def get(self, name: str, now: float) -> DnsRecord | None:
        key = encode_key(name)
        raw = None
        if key is not None:
            try:
                raw = self.map.lookup(key)
            except BpfError:
                self.count("dns_l2_errors")
        if raw is None:
            self.count("dns_miss")
            log.debug("DNS cache miss: %s", name)
            return None
        record = decode_answer(raw)
        if record.expires_at <= now:
            self.count("dns_l2_expired")
            self.count("dns_miss")
            log.debug("DNS cache miss: %s (expired in the shared map)", name)
            try:
                self.map.delete(key)
            except BpfError:
                pass
            return None
        self.count("dns_l2_hit")
        log.debug("DNS cache hit: %s (level 2, shared BPF map)", name)
        return record

    def put(self, name: str, answer) -> None:
        key = encode_key(name)
        if key is None:
            return
        self.count("dns_put")
        try:
            self.map.update(key, encode_answer(answer), BPF_ANY)
        except (BpfError, ValueError):
            self.count("dns_l2_errors")

    def stats(self) -> dict[str, int]:
        return {"l2_max_entries": self.max_entries,
                **{k.removeprefix("dns_"): v for k, v in self.local.items()}}
