"""Pythonic BPF objects over libbpf: BpfObject -> Program / Map -> Link.

Shaped after cilium/ebpf (a collection you open, load and close; maps you look up, update and
iterate; links you close) with context managers instead of Close(). Nothing here knows ctypes:
every kernel call goes through :mod:`sniproxy.ebpf.libbpf`.

    with BpfObject("sni_proxy_probe", rodata={"sni_proxy_tgid": os.getpid()}) as obj:
        with obj.program("sni_proxy_rawtp").attach():
            ...
        print(obj.map("sni_proxy_pcpu").lookup(1))     # per-CPU: one bytes per possible CPU
"""
from __future__ import annotations

import errno as errno_mod
import os
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import libbpf as _lb
from .libbpf import (  # re-exported: users import everything eBPF from here
    BPF_ANY,
    BPF_EXIST,
    BPF_F_NO_PREALLOC,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_PERF_EVENT_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    BPF_MAP_TYPE_SOCKHASH,
    BPF_MAP_TYPE_SOCKMAP,
    BPF_MAP_TYPE_STACK_TRACE,
    BPF_NOEXIST,
    BPF_SK_MSG_VERDICT,
    BPF_SK_SKB_STREAM_PARSER,
    BPF_SK_SKB_STREAM_VERDICT,
    BPF_SK_SKB_VERDICT,
    BPF_XDP,
    XDP_FLAGS_DRV_MODE,
    XDP_FLAGS_SKB_MODE,
    XDP_FLAGS_UPDATE_IF_NOEXIST,
    BpfError,
    RingBuffer,
    online_cpus,
    perf_event_open_cpu_clock,
    possible_cpus,
    raise_memlock_rlimit,
)

__all__ = [
    "BPF_DIR", "BpfError", "BpfObject", "Map", "TypedMap", "Program", "Link", "StatsHandle",
    "RingBuffer",
    "enable_bpf_stats", "release_attached", "object_path", "available_objects", "online_cpus", "possible_cpus",
    "perf_event_open_cpu_clock", "raise_memlock_rlimit",
    "BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "BPF_F_NO_PREALLOC",
    "BPF_MAP_TYPE_HASH", "BPF_MAP_TYPE_ARRAY", "BPF_MAP_TYPE_PERCPU_HASH",
    "BPF_MAP_TYPE_PERCPU_ARRAY", "BPF_MAP_TYPE_STACK_TRACE", "BPF_MAP_TYPE_LRU_HASH",
    "BPF_MAP_TYPE_LRU_PERCPU_HASH", "BPF_MAP_TYPE_SOCKMAP", "BPF_MAP_TYPE_SOCKHASH",
    "BPF_MAP_TYPE_RINGBUF", "BPF_MAP_TYPE_PERF_EVENT_ARRAY",
    "BPF_SK_SKB_STREAM_PARSER", "BPF_SK_SKB_STREAM_VERDICT", "BPF_SK_MSG_VERDICT",
    "BPF_SK_SKB_VERDICT", "BPF_XDP", "XDP_FLAGS_SKB_MODE", "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_UPDATE_IF_NOEXIST",
]

BPF_DIR = Path(__file__).resolve().parent / "bpf"

# Iteration over a map is bounded: a hash map being modified concurrently can make
# get_next_key restart from the first key, so we stop after this many rounds of max_entries.
_ITERATION_BOUND_FACTOR = 2
_DEFAULT_BATCH = 256


def object_path(name_or_path: str | os.PathLike) -> Path:
    """`sni_proxy_probe` -> the packaged `bpf/sni_proxy_probe.bpf.o`; a path stays a path."""
    text = os.fspath(name_or_path)
    if os.sep in text or text.endswith(".o"):
        return Path(text)
    return BPF_DIR / f"{text}.bpf.o"


def available_objects() -> list[Path]:
    """Every compiled object shipped in the package's bpf directory, sorted by name."""
    return sorted(BPF_DIR.glob("*.bpf.o"))


# ------------------------------------------------------------------------------------------
# Key / value encoding
# ------------------------------------------------------------------------------------------
def _encode(value: Any, size: int, what: str) -> bytes:
    """bytes (exact size), int (native-endian, sized) or a buffer (ctypes.Structure) -> bytes."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        try:
            return value.to_bytes(size, sys.byteorder, signed=value < 0)
        except OverflowError:
            raise ValueError(f"{what}: {value} does not fit in {size} bytes") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        try:
            data = memoryview(value).tobytes()
        except TypeError:
            raise TypeError(
                f"{what}: expected bytes, int or a ctypes structure, got {type(value).__name__}"
            ) from None
    if len(data) != size:
        raise ValueError(f"{what}: got {len(data)} bytes, the map expects {size}")
    return data


def _encode_simple(value: Any, size: int) -> bytes | None:
    """The common cases of _encode (a fitting unsigned int, bytes of the exact size) without
    its checks and message; None for anything else. The sockmap hand-over encodes ~20 keys and
    values per connection."""
    kind = type(value)
    if kind is int and value >= 0 and value.bit_length() <= 8 * size:
        return value.to_bytes(size, sys.byteorder)
    if kind is bytes and len(value) == size:
        return value
    return None


def _round8(n: int) -> int:
    return (n + 7) & ~7


# ------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------
class Link:
    """An attachment; close() detaches it. Context manager. Idempotent close."""

    def __init__(self, description: str, closer: Callable[[], None], fd: int = -1,
                 on_close: Callable[["Link"], None] | None = None) -> None:
        self.description = description
        self.fd = fd
        self._closer: Callable[[], None] | None = closer
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self._closer is None

    def close(self) -> None:
        closer, self._closer = self._closer, None
        if closer is None:
            return
        try:
            closer()
        finally:
            self.fd = -1
            if self._on_close is not None:
                self._on_close(self)

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Link {self.description}{' closed' if self.closed else ''}>"


def release_attached(links: list, *owned) -> None:
    """Close what a loaded-and-attached program set holds, links first (they pin programs),
    then each of `owned` that is not None (the BPF stats handle, the object); `links` is
    emptied. The caller forgets its references."""
    for link in links:
        link.close()
    links.clear()
    for item in owned:
        if item is not None:
            item.close()


class StatsHandle:
    """Kernel BPF run-time statistics stay enabled while this handle is open."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "StatsHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_bpf_stats() -> StatsHandle:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): run_time_ns / run_cnt count while the handle is open."""
    return StatsHandle(_lb.enable_bpf_stats())


# ------------------------------------------------------------------------------------------
# Maps
# ------------------------------------------------------------------------------------------
class Map:
    """A BPF map by fd. Keys and values: bytes, int (native-endian) or ctypes structures.

    Per-CPU maps return a list of values, one per possible CPU, and accept either such a list
    or one value (written to every CPU) on update.
    """

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int, *, owned: bool) -> None:
        self.fd = fd
        self.name = name
        self.type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._owned = owned
        self._batch_supported: bool | None = None
        # update()'s fast path: a value already in the map's byte layout goes as it is.
        self._plain_values = map_type not in _lb.PERCPU_MAP_TYPES

    # construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str, flags: int = 0) -> "Map":
        """A map created from user space (e.g. the DNS LRU shared by workers). Owns its fd."""
        _check_name(name, "map")
        fd = _lb.map_create(map_type, name, key_size, value_size, max_entries, flags)
        return cls(fd, name, map_type, key_size, value_size, max_entries, owned=True)

    @classmethod
    def from_fd(cls, fd: int, *, owned: bool = True) -> "Map":
        info = _lb.map_info(fd)
        return cls(fd, info["name"], info["type"], info["key_size"], info["value_size"],
                   info["max_entries"], owned=owned)

    @classmethod
    def from_pinned(cls, path: str | os.PathLike) -> "Map":
        """Open a map pinned on bpffs (e.g. by another worker)."""
        return cls.from_fd(_lb.obj_get(os.fspath(path)), owned=True)

    def pin(self, path: str | os.PathLike) -> None:
        _lb.obj_pin(self.fd, os.fspath(path))

    def close(self) -> None:
        """Close a map this object owns (created / from_pinned); maps of a BpfObject close with it."""
        fd, self.fd = self.fd, -1
        if self._owned and fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # properties -------------------------------------------------------------------------
    @property
    def percpu(self) -> bool:
        return self.type in _lb.PERCPU_MAP_TYPES

    @property
    def type_name(self) -> str:
        return _lb.map_type_name(self.type)

    def _value_buffer_size(self) -> int:
        if self.percpu:
            return _round8(self.value_size) * possible_cpus()
        return self.value_size

    def _key(self, key: Any) -> bytes:
        return _encode_simple(key, self.key_size) or _encode(key, self.key_size,
                                                             f"key of map {self.name}")

    def _encode_value(self, value: Any) -> bytes:
        if not self.percpu:
            return _encode_simple(value, self.value_size) or _encode(
                value, self.value_size, f"value of map {self.name}")
        what = f"value of map {self.name}"
        slot = _round8(self.value_size)
        ncpu = possible_cpus()
        values = value if isinstance(value, (list, tuple)) else [value] * ncpu
        if len(values) != ncpu:
            raise ValueError(f"{what}: per-CPU update needs {ncpu} values (possible CPUs), "
                             f"got {len(values)}")
        return b"".join(_encode(v, self.value_size, what).ljust(slot, b"\0") for v in values)

    def _decode_value(self, raw: bytes) -> bytes | list[bytes]:
        if not self.percpu:
            return raw
        slot = _round8(self.value_size)
        return [raw[i:i + self.value_size] for i in range(0, len(raw), slot)]

    # element operations ---------------------------------------------------------------
    def lookup(self, key: Any) -> bytes | list[bytes] | None:
        raw = _lb.map_lookup(self.fd, self._key(key), self._value_buffer_size())
        return None if raw is None else self._decode_value(raw)

    def lookup_and_delete(self, key: Any) -> bytes | list[bytes] | None:
        raw = _lb.map_lookup_and_delete(self.fd, self._key(key), self._value_buffer_size())
        return None if raw is None else self._decode_value(raw)

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        # Keys and values the caller packed already (struct.Struct) skip the generic encoder:
        # a tcp_splice hand-over makes five updates per connection.
        if type(key) is not bytes or len(key) != self.key_size:
            key = self._key(key)
        if type(value) is not bytes or len(value) != self.value_size or not self._plain_values:
            value = self._encode_value(value)
        _lb.map_update(self.fd, key, value, flags)

    def delete(self, key: Any) -> bool:
        """True if the key was there."""
        return _lb.map_delete(self.fd, self._key(key))

    def update_batch(self, items: list[tuple[Any, Any]]) -> None:
        """All items in one syscall (hash and array maps; not sockmaps, which refuse batches).

        The kernel takes no BPF_NOEXIST here. If it stops at an element, the BpfError's
        `done` says how many went in before it.
        """
        keys = b"".join(self._key(k) for k, _ in items)
        values = b"".join(self._encode_value(v) for _, v in items)
        _lb.map_update_batch(self.fd, keys, values, len(items))

    def delete_batch(self, keys: list[Any]) -> int:
        """Delete keys in one syscall; stops at the first missing one. How many went."""
        return _lb.map_delete_batch(self.fd, b"".join(self._key(k) for k in keys), len(keys))

    def __contains__(self, key: Any) -> bool:
        return self.lookup(key) is not None

    def percpu_sum(self, key: Any) -> int:
        """Sum of an unsigned per-CPU counter (value_size <= 8) over all CPUs; 0 if absent."""
        value = self.lookup(key)
        if value is None:
            return 0
        values = value if isinstance(value, list) else [value]
        return sum(int.from_bytes(v, sys.byteorder) for v in values)

    # iteration --------------------------------------------------------------------------
    def keys(self) -> Iterator[bytes]:
        key: bytes | None = None
        bound = max(self.max_entries, 1) * _ITERATION_BOUND_FACTOR + 1
        for _ in range(bound):
            key = _lb.map_next_key(self.fd, key, self.key_size)
            if key is None:
                return
            yield key

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
        """All (key, value) pairs, by batch lookup where the kernel supports it."""
        if self._batch_supported is not False:
            try:
                pairs = self.lookup_batch()
            except BpfError as e:
                if e.errno not in (errno_mod.EINVAL, errno_mod.ENOTSUP, _lb.ENOTSUPP, errno_mod.EPERM):
                    raise
                self._batch_supported = False
            else:
                self._batch_supported = True
                yield from pairs
                return
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:  # deleted meanwhile
                yield key, value

    def values(self) -> Iterator[bytes | list[bytes]]:
        for _, value in self.items():
            yield value

    def count(self) -> int:
        """Number of entries (by iterating keys: O(n) syscalls)."""
        return sum(1 for _ in self.keys())

    def _batch(self, delete: bool, batch_size: int) -> list[tuple[bytes, bytes | list[bytes]]]:
        out: list[tuple[bytes, bytes | list[bytes]]] = []
        token: bytes | None = None
        vsize = self._value_buffer_size()
        bound = max(self.max_entries, 1) * _ITERATION_BOUND_FACTOR // batch_size + 2
        for _ in range(bound):
            pairs, token = _lb.map_lookup_batch(self.fd, self.key_size, vsize, batch_size,
                                                token, delete=delete)
            out.extend((k, self._decode_value(v)) for k, v in pairs)
            if token is None:
                break
        return out

    def lookup_batch(self, batch_size: int = _DEFAULT_BATCH) -> list[tuple[bytes, Any]]:
        """Every entry through BPF_MAP_LOOKUP_BATCH (kernel >= 5.6; hash and array maps)."""
        return self._batch(False, batch_size)

    def lookup_and_delete_batch(self, batch_size: int = _DEFAULT_BATCH) -> list[tuple[bytes, Any]]:
        """Drain a hash map atomically per batch; falls back to lookup+delete per key."""
        try:
            return self._batch(True, batch_size)
        except BpfError as e:
            if e.errno not in (errno_mod.EINVAL, errno_mod.ENOTSUP, _lb.ENOTSUPP):
                raise
        out = []
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None and self.delete(key):
                out.append((key, value))
        return out

    def clear(self) -> int:
        """Delete every key; returns how many were deleted (not for array maps)."""
        return sum(1 for key in list(self.keys()) if self.delete(key))

    # views and info ---------------------------------------------------------------------
    def typed(self, key_type: Any = int, value_type: Any = int) -> "TypedMap":
        return TypedMap(self, key_type, value_type)

    def info(self) -> dict:
        """The kernel's view: id, type, name, sizes, flags and memlock_bytes where reported."""
        return _lb.map_info(self.fd)

    @property
    def id(self) -> int:
        return self.info()["id"]

    def __repr__(self) -> str:
        return (f"<Map {self.name} {self.type_name} key={self.key_size} value={self.value_size} "
                f"max={self.max_entries} fd={self.fd}>")


class TypedMap:
    """A view of a Map that encodes and decodes keys/values: int or ctypes types."""

    def __init__(self, raw: Map, key_type: Any, value_type: Any) -> None:
        self.raw = raw
        self.key_type = key_type
        self.value_type = value_type

    @staticmethod
    def _decode(data: bytes, kind: Any) -> Any:
        if kind is int:
            return int.from_bytes(data, sys.byteorder)
        if kind is bytes:
            return data
        return kind.from_buffer_copy(data)

    def _value(self, raw: Any) -> Any:
        if isinstance(raw, list):
            return [self._decode(v, self.value_type) for v in raw]
        return self._decode(raw, self.value_type)

    def lookup(self, key: Any) -> Any:
        raw = self.raw.lookup(key)
        return None if raw is None else self._value(raw)

    def __getitem__(self, key: Any) -> Any:
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.raw.update(key, value)

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        self.raw.update(key, value, flags)

    def delete(self, key: Any) -> bool:
        return self.raw.delete(key)

    def keys(self) -> Iterator[Any]:
        for k in self.raw.keys():
            yield self._decode(k, self.key_type)

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k, v in self.raw.items():
            yield self._decode(k, self.key_type), self._value(v)


# ------------------------------------------------------------------------------------------
# Programs
# ------------------------------------------------------------------------------------------
class Program:
    """A loaded program of a BpfObject. Attach methods return Links the object also tracks."""

    def __init__(self, owner: "BpfObject", ptr: int, desc: _lb.ProgramDesc) -> None:
        self._owner = owner
        self._ptr = ptr
        self.name = desc.name
        self.section = desc.section
        self.type = desc.type
        self.fd = _lb.program_fd(ptr)
        self.id = _lb.prog_info(self.fd)["id"] if self.fd >= 0 else 0

    @property
    def type_name(self) -> str:
        return _lb.prog_type_name(self.type)

    def _loaded(self) -> None:
        if self.fd < 0:
            raise BpfError(f"program {self.name}", errno_mod.EBADF,
                           hint="the program is not loaded (autoload off) or its object is closed")

    def _libbpf_link(self, ptr: int, description: str) -> Link:
        return self._owner._track(Link(description, lambda: _lb.link_destroy(ptr),
                                       fd=_lb.link_fd(ptr)))

    def attach(self) -> Link:
        """Attach by the SEC() name (tp_btf/, raw_tp/, uprobe/..., xdp needs attach_xdp)."""
        self._loaded()
        return self._libbpf_link(_lb.program_attach(self._ptr, self.name),
                                 f"{self.name} ({self.section})")

    def attach_perf_event(self, perf_fd: int) -> Link:
        """Attach to an open perf event. The Link owns perf_fd: closing the link closes it."""
        self._loaded()
        try:
            ptr = _lb.program_attach_perf_event(self._ptr, perf_fd, self.name)
        except BpfError:
            os.close(perf_fd)  # ownership was handed over: do not leak it on failure
            raise
        return self._libbpf_link(ptr, f"{self.name} -> perf event fd {perf_fd}")

    def attach_raw_tracepoint(self, name: str) -> Link:
        self._loaded()
        return self._libbpf_link(_lb.program_attach_raw_tracepoint(self._ptr, name, self.name),
                                 f"{self.name} -> raw_tp/{name}")

    def attach_tracepoint(self, category: str, name: str) -> Link:
        """Classic tracepoint: needs tracefs mounted; prefer tp_btf/raw_tp programs otherwise."""
        self._loaded()
        ptr = _lb.program_attach_tracepoint(self._ptr, category, name, self.name)
        return self._libbpf_link(ptr, f"{self.name} -> tracepoint/{category}/{name}")

    def attach_uprobe(self, pid: int, binary_path: str, offset: int,
                      retprobe: bool = False) -> Link:
        """uprobe at a file offset of binary_path; pid -1 for every process mapping it."""
        self._loaded()
        ptr = _lb.program_attach_uprobe(self._ptr, retprobe, pid, binary_path, offset, self.name)
        kind = "uretprobe" if retprobe else "uprobe"
        return self._libbpf_link(ptr, f"{self.name} -> {kind} {binary_path}+{offset:#x}")

    def attach_uprobe_func(self, pid: int, binary_path: str, func_name: str,
                           retprobe: bool = False) -> Link:
        """uprobe at a function of binary_path found by name (libbpf reads its ELF symbols);
        pid -1 for every process mapping the binary."""
        self._loaded()
        ptr = _lb.program_attach_uprobe_func(self._ptr, retprobe, pid, binary_path, func_name,
                                             self.name)
        kind = "uretprobe" if retprobe else "uprobe"
        return self._libbpf_link(ptr, f"{self.name} -> {kind} {binary_path}:{func_name}")

    def attach_cgroup(self, cgroup_fd: int, attach_type: int, path: str = "") -> Link:
        """A cgroup program through a kernel link (BPF_F_ALLOW_MULTI semantics: other programs
        on the cgroup keep running); detached when the link is closed or its holders exit."""
        self._loaded()
        where = path or f"cgroup fd {cgroup_fd}"
        fd = _lb.link_create(self.fd, cgroup_fd, attach_type, 0,
                             what=f"attaching cgroup program {self.name} to {where}")
        return self._owner._track(
            Link(f"{self.name} -> cgroup {where}", lambda: os.close(fd), fd=fd))

    def attach_xdp(self, ifindex: int, flags: int = 0) -> Link:
        """XDP through a kernel link (detached when closed or when the process dies).

        flags: 0 lets the kernel choose (native if the driver has it), XDP_FLAGS_SKB_MODE forces
        generic XDP (works on any device, e.g. lo and veth), XDP_FLAGS_DRV_MODE requires native.
        """
        self._loaded()
        fd = _lb.link_create(self.fd, ifindex, BPF_XDP, flags,
                             what=f"attaching XDP program {self.name} to ifindex {ifindex}")
        return self._owner._track(
            Link(f"{self.name} -> xdp ifindex {ifindex}", lambda: os.close(fd), fd=fd))

    def attach_to_map(self, bpf_map: Map, attach_type: int) -> Link:
        """bpf_prog_attach to a sockmap/sockhash (BPF_SK_SKB_STREAM_VERDICT, BPF_SK_MSG_VERDICT...).

        The link keeps its own duplicates of both fds, so detaching (bpf_prog_detach2 on
        close) works whatever is closed first.
        """
        self._loaded()
        what = f"attaching {self.name} to map {bpf_map.name} (attach type {attach_type})"
        _lb.prog_attach(self.fd, bpf_map.fd, attach_type, what=what)
        prog_fd, map_fd = os.dup(self.fd), os.dup(bpf_map.fd)

        def detach() -> None:
            try:
                _lb.prog_detach(prog_fd, map_fd, attach_type,
                                what=f"detaching {self.name} from map {bpf_map.name}")
            finally:
                os.close(prog_fd)
                os.close(map_fd)

        return self._owner._track(Link(f"{self.name} -> map {bpf_map.name}", detach))

    def info(self) -> dict:
        self._loaded()
        return _lb.prog_info(self.fd)

    def run_stats(self) -> tuple[int, int]:
        """(run_time_ns, run_cnt) since load; counts only while BPF stats are enabled."""
        info = self.info()
        return info["run_time_ns"], info["run_cnt"]

    def __repr__(self) -> str:
        return f"<Program {self.name} {self.type_name} id={self.id} fd={self.fd}>"


# ------------------------------------------------------------------------------------------
# Objects
# ------------------------------------------------------------------------------------------
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
MAX_OBJ_NAME = 15


def _check_name(name: str, kind: str) -> None:
    if not name or len(name) > MAX_OBJ_NAME or not set(name) <= _NAME_CHARS:
        raise ValueError(f"BPF {kind} name {name!r}: the kernel allows 1-15 characters of "
                         "[A-Za-z0-9_.] (sni-proxy names them sni_proxy_<5 chars>)")


def _encode_constant(name: str, value: int | bytes | float, size: int) -> bytes:
    what = f"rodata {name}"
    if isinstance(value, float):
        if size not in (4, 8):
            raise ValueError(f"{what}: a float needs a 4 or 8 byte variable, it has {size}")
        return struct.pack("=d" if size == 8 else "=f", value)
    if isinstance(value, (bytes, bytearray)):
        if len(value) > size:
            raise ValueError(f"{what}: {len(value)} bytes do not fit in {size}")
        return bytes(value).ljust(size, b"\0")
    return _encode(value, size, what)


class BpfObject:
    """One compiled `.bpf.o`: open (set rodata, map sizes), load, use, close everything.

    `with BpfObject(...) as obj:` opens and loads; leaving the block closes links, programs
    and maps (every fd).
    """

    def __init__(self, name_or_path: str | os.PathLike, *,
                 rodata: dict[str, int | bytes | float] | None = None,
                 map_sizes: dict[str, int] | None = None,
                 autoload: dict[str, bool] | None = None,
                 layouts: tuple = ()) -> None:
        self.path = object_path(name_or_path)
        self.layouts = tuple(layouts)   # ebpf.layout.StructLayout / EnumLayout, checked at open
        self.name = self.path.name.removesuffix(".o").removesuffix(".bpf")
        self.rodata = dict(rodata or {})
        self.map_sizes = dict(map_sizes or {})
        self.autoload = dict(autoload or {})
        self._ptr = 0
        self._loaded = False
        self._reuse: dict[str, Map] = {}
        self._links: list[Link] = []
        self.programs: dict[str, Program] = {}
        self.maps: dict[str, Map] = {}

    # lifecycle ----------------------------------------------------------------------------
    def open(self) -> "BpfObject":
        if self._ptr:
            return self
        if not self.path.is_file():
            raise BpfError(
                f"BPF object {self.path}", errno_mod.ENOENT,
                hint="not built: run `make bpf` (needs clang, libbpf-dev and bpftool) or "
                     "install the sni-proxy wheel, which ships the compiled objects",
            )
        raise_memlock_rlimit()
        self._ptr = _lb.object_open(str(self.path))
        try:
            self._apply_open_settings()
        except Exception:
            self.close()
            raise
        return self

    def _apply_open_settings(self) -> None:
        if self.layouts:
            from sniproxy.ebpf.layout import check_layouts
            check_layouts(self._ptr, self.name, self.layouts)
        by_name = {_lb.map_describe(m).name: m for m in _lb.object_maps(self._ptr)}
        for name, size in self.map_sizes.items():
            if name not in by_name:
                raise BpfError(f"map_sizes: {self.name} has no map {name!r}", errno_mod.ENOENT,
                               hint=f"maps: {', '.join(sorted(by_name))}")
            _lb.map_set_max_entries(by_name[name], size, name)
        progs = {_lb.program_describe(p).name: p for p in _lb.object_programs(self._ptr)}
        for name, flag in self.autoload.items():
            if name not in progs:
                raise BpfError(f"autoload: {self.name} has no program {name!r}",
                               errno_mod.ENOENT, hint=f"programs: {', '.join(sorted(progs))}")
            _lb.program_set_autoload(progs[name], flag)
        if self.rodata:
            self._write_rodata()

    def _write_rodata(self) -> None:
        variables = _lb.object_datasec_variables(self._ptr, ".rodata")
        rodata_map = _lb.object_find_map(self._ptr, ".rodata")
        unknown = sorted(set(self.rodata) - set(variables))
        if unknown or rodata_map is None:
            raise BpfError(
                f"rodata: {self.name} has no constant(s) {', '.join(unknown) or '(no .rodata)'}",
                errno_mod.ENOENT,
                hint="declare them as `const volatile` globals in the BPF C file; available: "
                     + (", ".join(sorted(variables)) or "none"),
            )
        for name, value in self.rodata.items():
            offset, size = variables[name]
            _lb.map_write_initial_value(rodata_map, offset, _encode_constant(name, value, size))

    def set_rodata(self, name: str, value: int | bytes | float) -> None:
        """Set one `const volatile` constant: after open(), before load()."""
        if self._loaded:
            raise BpfError(f"rodata {name}", errno_mod.EBUSY,
                           hint="constants are frozen at load: set them before load()")
        self.rodata[name] = value
        if self._ptr:
            self._write_rodata()

    def reuse_map(self, name: str, existing: Map) -> None:
        """Before load: make map `name` use an existing map (e.g. a pinned, shared DNS cache)."""
        self._reuse[name] = existing

    def check_layouts(self) -> None:
        """Open (no load, no privilege needed) and compare `layouts` with the object's BTF."""
        self.open()

    def load(self) -> "BpfObject":
        if self._loaded:
            return self
        self.open()
        try:
            for name, existing in self._reuse.items():
                ptr = _lb.object_find_map(self._ptr, name)
                if ptr is None:
                    raise BpfError(f"reuse_map: {self.name} has no map {name!r}", errno_mod.ENOENT)
                _lb.map_reuse_fd(ptr, existing.fd, name)
            _lb.object_load(self._ptr, self.name)
            self._loaded = True
            for ptr in _lb.object_programs(self._ptr):
                desc = _lb.program_describe(ptr)
                if desc.autoload:
                    self.programs[desc.name] = Program(self, ptr, desc)
            for ptr in _lb.object_maps(self._ptr):
                d = _lb.map_describe(ptr)
                self.maps[d.name] = Map(_lb.map_fd(ptr), d.name, d.type, d.key_size,
                                        d.value_size, d.max_entries, owned=False)
        except Exception:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Detach every link made from this object's programs, then free programs and maps."""
        errors: list[BaseException] = []
        for link in list(reversed(self._links)):
            try:
                link.close()
            except BpfError as e:
                errors.append(e)
        self._links.clear()
        ptr, self._ptr = self._ptr, 0
        _lb.object_close(ptr)
        for m in self.maps.values():
            m.fd = -1
        for p in self.programs.values():
            p.fd = -1
        self._loaded = False
        if errors:
            raise errors[0]

    def __enter__(self) -> "BpfObject":
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, link: Link) -> Link:
        self._links.append(link)
        link._on_close = self._untrack
        return link

    def _untrack(self, link: Link) -> None:
        if link in self._links:
            self._links.remove(link)

    # access ---------------------------------------------------------------------------------
    def map(self, name: str) -> Map:
        if not self._loaded:
            raise BpfError(f"map {name}", errno_mod.EBADF, hint="load() the object first")
        try:
            return self.maps[name]
        except KeyError:
            raise BpfError(f"{self.name} has no map {name!r}", errno_mod.ENOENT,
                           hint=f"maps: {', '.join(sorted(self.maps))}") from None

    def program(self, name: str) -> Program:
        if not self._loaded:
            raise BpfError(f"program {name}", errno_mod.EBADF, hint="load() the object first")
        try:
            return self.programs[name]
        except KeyError:
            raise BpfError(f"{self.name} has no loaded program {name!r}", errno_mod.ENOENT,
                           hint=f"programs: {', '.join(sorted(self.programs))}") from None

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else ("open" if self._ptr else "closed")
        return f"<BpfObject {self.name} {state}>"
