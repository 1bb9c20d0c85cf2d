"""Reading a BPF ring buffer map through mmap, without libbpf's callback machinery.

Used where a worker only needs fixed-size records on its own epoll loop (sockmap credit
notifications, tc splice end-of-flow events): no thread, no C callback, one mmap read per
record. The kernel maps the data area twice in a row, so a record that wraps is contiguous.
"""
from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from typing import Generic, TypeVar

from sniproxy.ebpf.objects import BPF_MAP_TYPE_RINGBUF, Map

T = TypeVar("T")
_U64 = struct.Struct("=Q")


def install_ring(outer: Map, rings: dict[int, Map], index: int, size: int, name: str) -> Map:
    """A fresh ring buffer in slot `index` of an array-of-maps `outer` (the worker about to use
    that slot gets it); the ring it replaces, kept in `rings`, is closed."""
    ring = Map.create(BPF_MAP_TYPE_RINGBUF, 0, 0, size, name)
    try:
        outer.update(index, ring.fd.to_bytes(4, "little"))
    except Exception:
        ring.close()
        raise
    old = rings.pop(index, None)
    if old is not None:
        old.close()
    rings[index] = ring
    return ring


class MmapRingReader(Generic[T]):
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map whose records are `record_size` bytes."""

    _BUSY = 1 << 31
    _DISCARD = 1 << 30

    def __init__(self, ring: Map, record_size: int, decode: Callable[[bytes], T]):
        self.ring = ring
        self.record_size = record_size
        self.decode = decode
        self.page = mmap.PAGESIZE
        self.mask = ring.max_entries - 1
        self._consumer = mmap.mmap(ring.fd, self.page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(ring.fd, self.page + 2 * ring.max_entries, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=self.page)

    def fileno(self) -> int:
        return self.ring.fd

    def drain(self, limit: int = 4096) -> list[T]:
        """Every committed record (at most `limit`), oldest first, decoded; frees their space.
        Records of another size (none are written) and discarded ones are skipped."""
        out: list[T] = []
        cons = _U64.unpack_from(self._consumer, 0)[0]
        prod = _U64.unpack_from(self._producer, 0)[0]
        data, base, size = self._producer, self.page, self.record_size
        while cons < prod and len(out) < limit:
            at = base + (cons & self.mask)
            header = int.from_bytes(data[at:at + 4], "little")
            if header & self._BUSY:
                break                   # being written; the kernel wakes us again when done
            length = header & ~(self._BUSY | self._DISCARD)
            if not header & self._DISCARD and length == size:
                start = base + ((cons + 8) & self.mask)
                out.append(self.decode(data[start:start + size]))
            cons += (length + 8 + 7) & ~7
        _U64.pack_into(self._consumer, 0, cons)
        return out

    def close(self) -> None:
        for m in (self._consumer, self._producer):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
