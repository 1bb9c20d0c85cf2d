"""pprof output: a gzip-compressed `profile.proto` (github.com/google/pprof/proto/profile.proto).

`go tool pprof`, speedscope and Grafana Pyroscope read it. The message is small and stable, so it
is hand-encoded here in protobuf wire format (varints and length-delimited fields) instead of
carrying generated code; tests decode it with the protobuf runtime from a descriptor built from
the same field numbers, so an encoding mistake fails there.

Layout: sample types `samples/count` and `cpu/nanoseconds` (count x period); one Location per
distinct (module, address), one Function per distinct (name, module); labels pid, tid, comm.
"""
from __future__ import annotations

import gzip
from collections.abc import Iterable
from typing import Protocol


class _Frame(Protocol):
    label: str
    module: str
    address: int
    offset: int
    kernel: bool


class _Sample(Protocol):
    tgid: int
    tid: int
    comm: str
    count: int

    def stack(self) -> Iterable[_Frame]: ...


class _Profile(Protocol):
    samples: list
    sample_rate_hz: int
    start_time_ns: int
    duration_ns: int


# -- protobuf wire format -------------------------------------------------------------------
_VARINT, _LEN = 0, 2


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1     # int64 negative: two's complement, 10 bytes
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _int(field: int, value: int) -> bytes:
    """A scalar varint field; proto3 omits zero values."""
    return _key(field, _VARINT) + _varint(value) if value else b""


def _bytes(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _packed(field: int, values: Iterable[int]) -> bytes:
    payload = b"".join(_varint(v) for v in values)
    return _bytes(field, payload) if payload else b""


class _Strings:
    """The string table: index 0 must be the empty string."""

    def __init__(self) -> None:
        self.table: list[str] = [""]
        self._index: dict[str, int] = {"": 0}

    def __call__(self, s: str) -> int:
        i = self._index.get(s)
        if i is None:
            i = self._index[s] = len(self.table)
            self.table.append(s)
        return i


def encode_profile(profile: _Profile) -> bytes:
    """The uncompressed Profile message."""
    strings = _Strings()
    period_ns = 1_000_000_000 // max(profile.sample_rate_hz, 1)
    mappings: dict[str, int] = {}
    functions: dict[tuple[str, str], int] = {}
    locations: dict[tuple[str, int, str], tuple[int, int, int]] = {}  # -> (id, mapping, function)
    samples_out = []

    for sample in profile.samples:
        location_ids = []
        for frame in reversed(list(sample.stack())):       # pprof wants the leaf first
            module = frame.module or "[unknown]"
            mapping_id = mappings.setdefault(module, len(mappings) + 1)
            fkey = (frame.label, module)
            function_id = functions.setdefault(fkey, len(functions) + 1)
            lkey = (module, frame.address, frame.label)
            if lkey not in locations:
                locations[lkey] = (len(locations) + 1, mapping_id, function_id)
            location_ids.append(locations[lkey][0])
        labels = (
            _bytes(3, _int(1, strings("pid")) + _int(3, sample.tgid))
            + _bytes(3, _int(1, strings("tid")) + _int(3, sample.tid))
            + _bytes(3, _int(1, strings("comm")) + _int(2, strings(sample.comm)))
        )
        samples_out.append(_bytes(2, _packed(1, location_ids)
                                  + _packed(2, [sample.count, sample.count * period_ns]) + labels))

    out = bytearray()
    out += _bytes(1, _int(1, strings("samples")) + _int(2, strings("count")))
    out += _bytes(1, _int(1, strings("cpu")) + _int(2, strings("nanoseconds")))
    out += b"".join(samples_out)
    for module, mapping_id in mappings.items():
        # Addresses are runtime addresses of many processes; the mapping only names the module.
        out += _bytes(3, _int(1, mapping_id) + _int(5, strings(module))
                      + _int(7, 1))                               # has_functions
    for (module, address, _label), (location_id, mapping_id, function_id) in locations.items():
        out += _bytes(4, _int(1, location_id) + _int(2, mapping_id) + _int(3, address)
                      + _bytes(4, _int(1, function_id)))
    for (label, module), function_id in functions.items():
        name = strings(label)
        out += _bytes(5, _int(1, function_id) + _int(2, name) + _int(3, name)
                      + _int(4, strings(module)))
    out += _int(9, profile.start_time_ns)
    out += _int(10, profile.duration_ns)
    out += _bytes(11, _int(1, strings("cpu")) + _int(2, strings("nanoseconds")))
    out += _int(12, period_ns)
    # Last, once every string above has its index.
    out += b"".join(_bytes(6, s.encode()) for s in strings.table)
    return bytes(out)


def to_pprof(profile: _Profile) -> bytes:
    """gzip(Profile): the `.pb.gz` file `go tool pprof` opens."""
    return gzip.compress(encode_profile(profile), mtime=0)
