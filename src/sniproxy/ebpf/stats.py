"""Counters of the kernel data path, shared by every worker process.

Two sources, both created in the supervisor before it forks, so all workers write the same ones:
* the BPF per-CPU array `sni_proxy_stat` (redirected skbs/bytes per direction, FIN skbs
  dropped, redirect failures, notifications), summed over CPUs when read;
* `SharedCounters`: an anonymous shared mapping with one row of u64 counters per worker slot,
  for what user space decides (insertions, fallbacks by reason, pauses, DNS cache levels).
  Each row has a single writer (its worker, single-threaded), so no locking is needed;
  readers sum the rows.
"""
from __future__ import annotations

import mmap
import struct


FALLBACK_REASONS = ("map_full", "close_wait", "duplicate", "insert_error", "socket_error")
# Why a connection could not be spliced in tc (relay/tcpsplice.py) and took the next kind.
TCP_SPLICE_FALLBACK_REASONS = (
    "map_full", "tuple_busy", "not_established", "family_mismatch", "mss_mismatch",
    "no_route", "interface_not_attached", "backend_data_queued", "client_unacked_data",
    "socket_error",
)

COUNTER_NAMES = (
    "inserted", "removed", "pauses", "resumes", "over_limit",
    *(f"fallback_{r}" for r in FALLBACK_REASONS),
    "dns_l1_hit", "dns_l2_hit", "dns_miss", "dns_l2_expired", "dns_put", "dns_l2_errors",
    "ts_armed", "ts_ended", "ts_removed", "ts_adopted",
    *(f"ts_fallback_{r}" for r in TCP_SPLICE_FALLBACK_REASONS),
)
_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}
_U64 = struct.Struct("=Q")


class CounterRow:
    """The counters one worker writes."""

    __slots__ = ("_mem", "_base")

    def __init__(self, mem: mmap.mmap, base: int):
        self._mem, self._base = mem, base

    def add(self, name: str, n: int = 1) -> None:
        off = self._base + _INDEX[name] * 8
        _U64.pack_into(self._mem, off, _U64.unpack_from(self._mem, off)[0] + n)

    def get(self, name: str) -> int:
        return _U64.unpack_from(self._mem, self._base + _INDEX[name] * 8)[0]

    def retire_active(self) -> None:
        """A new worker takes this row: the previous one's pairs are gone with its process."""
        off_removed = self._base + _INDEX["removed"] * 8
        _U64.pack_into(self._mem, off_removed, self.get("inserted"))


class SharedCounters:
    """Rows of u64 counters in memory shared across fork()."""

    def __init__(self, rows: int):
        self.rows = rows
        self.row_bytes = len(COUNTER_NAMES) * 8
        self._mem = mmap.mmap(-1, rows * self.row_bytes, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._mem).cast("Q")

    def row(self, index: int) -> CounterRow:
        if not 0 <= index < self.rows:
            raise IndexError(f"counter row {index} of {self.rows}")
        return CounterRow(self._mem, index * self.row_bytes)

    def total(self, name: str) -> int:
        # A strided slice of a u64 view sums every row in C: this runs once per connection
        # (the map-capacity check), over up to MAX_RINGS rows.
        return sum(self._words[_INDEX[name]::len(COUNTER_NAMES)])

    def totals(self) -> dict[str, int]:
        return {name: self.total(name) for name in COUNTER_NAMES}

    def close(self) -> None:
        self._words.release()
        try:
            self._mem.close()
        except (BufferError, ValueError):
            pass


def hit_rate(hits: int, lookups: int) -> float:
    return hits / lookups if lookups else 0.0
