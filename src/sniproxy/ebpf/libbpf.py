"""The one ctypes boundary of sni-proxy: libbpf.so.1 signatures and the raw syscalls eBPF needs.

Everything else in the project talks to the kernel through the Pythonic functions below and
never imports ctypes. Rules this module follows (each one was a crash or a silent bug once):

* every C function gets ``argtypes`` and ``restype``: a pointer returned as the default ``int``
  is truncated to 32 bits and the next call with it segfaults;
* the ``libbpf_set_print`` callback is a module global: if it is garbage-collected libbpf calls
  freed memory; it formats the ``va_list`` with libc ``vsnprintf``;
* libbpf 1.x returns ``-errno`` (ints) or ``NULL`` + ``errno`` (pointers): every failure becomes a
  :class:`BpfError` carrying errno, libbpf's own messages and, for a rejected program, the
  verifier log (which libbpf only hands out through the print callback, so it is captured per
  call in a thread-local buffer);
* only API present in Debian 12's libbpf 1.1.2 is used.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import logging
import os
import platform
import resource
import threading
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("sniproxy.ebpf.libbpf")

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_int = ctypes.c_int
c_uint = ctypes.c_uint
c_uint32 = ctypes.c_uint32
c_uint64 = ctypes.c_uint64
c_size_t = ctypes.c_size_t
c_long = ctypes.c_long
c_bool = ctypes.c_bool

# ---------------------------------------------------------------------------------------------
# Kernel UAPI constants used by the project (linux/bpf.h, linux/perf_event.h)
# ---------------------------------------------------------------------------------------------
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_F_NO_PREALLOC = 1

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERF_EVENT_ARRAY = 4
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_STACK_TRACE = 7
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_MAP_TYPES = frozenset(
    {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LRU_PERCPU_HASH, 20}
)  # 20 = PERCPU_CGROUP_STORAGE

BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_XDP = 6
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_PERF_EVENT = 7
BPF_PROG_TYPE_SK_SKB = 14
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26
BPF_PROG_TYPE_LSM = 29

BPF_SK_SKB_STREAM_PARSER = 4
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_SK_MSG_VERDICT = 7
BPF_TRACE_RAW_TP = 23
BPF_TRACE_FENTRY = 24
BPF_TRACE_FEXIT = 25
BPF_XDP = 37
BPF_CGROUP_GETSOCKOPT = 21
BPF_SK_SKB_VERDICT = 38

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3

BTF_KIND_STRUCT = 4
BTF_KIND_ENUM = 6
BTF_KIND_FUNC = 12
BTF_KIND_TYPEDEF = 8
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15

BPF_STATS_RUN_TIME = 0

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_FLAG_FD_CLOEXEC = 1 << 3
_PERF_ATTR_FLAG_FREQ = 1 << 10

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

_SYSCALLS = {  # (perf_event_open, bpf)
    "x86_64": (298, 321),
    "aarch64": (241, 280),
    "riscv64": (241, 280),
}

_PROG_TYPE_NAMES = {
    1: "socket_filter", 2: "kprobe", 3: "sched_cls", 4: "sched_act", 5: "tracepoint", 6: "xdp",
    7: "perf_event", 8: "cgroup_skb", 13: "sock_ops", 14: "sk_skb", 16: "sk_msg",
    17: "raw_tracepoint", 26: "tracing", 27: "struct_ops", 28: "ext", 29: "lsm", 30: "sk_lookup",
}
_MAP_TYPE_NAMES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 9: "lru_hash", 10: "lru_percpu_hash", 15: "sockmap",
    18: "sockhash", 27: "ringbuf",
}


def prog_type_name(prog_type: int) -> str:
    return _PROG_TYPE_NAMES.get(prog_type, f"type{prog_type}")


def map_type_name(map_type: int) -> str:
    return _MAP_TYPE_NAMES.get(map_type, f"type{map_type}")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
_VERIFIER_BEGIN = "-- BEGIN PROG LOAD LOG --"
_VERIFIER_END = "-- END PROG LOAD LOG --"
# A verifier log can be megabytes; the exception's text shows the end, where the reason is.
_VERIFIER_TAIL_LINES = 40


ENOTSUPP = _ENOTSUPP = 524  # kernel-internal "operation not supported" that leaks out of bpf()


def _hint_for(err: int) -> str:
    if err in (errno_mod.EPERM, errno_mod.EACCES):
        return (
            "missing privilege: BPF needs CAP_BPF (kernel >= 5.8, else CAP_SYS_ADMIN), tracing "
            "also CAP_PERFMON, sockmap/XDP also CAP_NET_ADMIN; run `sni-proxy check` for the fix"
        )
    if err == errno_mod.ENOENT:
        return "the kernel object, file or attach point does not exist"
    if err == errno_mod.E2BIG:
        return "map full or value too big"
    if err in (errno_mod.EINVAL, errno_mod.EOPNOTSUPP, _ENOTSUPP):
        return "the kernel refused the request (unsupported feature or wrong argument)"
    return ""


class BpfError(OSError):
    """A failed libbpf call or BPF syscall: what failed, errno, libbpf's messages, verifier log.

    An OSError, so `except OSError` catches it and `exc.errno` compares with the `errno`
    module's names; `not_supported` / `not_permitted` tell the two refusals apart (as
    cilium/ebpf's ErrNotSupported and EPERM).
    """

    def __init__(
        self,
        what: str,
        err: int,
        libbpf_message: str = "",
        verifier_log: str | None = None,
        hint: str | None = None,
    ) -> None:
        err = abs(err)
        super().__init__(err, os.strerror(err) if err else "failed")
        self.what = what
        self.libbpf_message = libbpf_message
        self.verifier_log = verifier_log
        if hint is None:
            hint = ("the verifier rejected the program: the log below says at which instruction "
                    "and why" if verifier_log else _hint_for(err))
        self.hint = hint
        self._text = self._render()

    def __str__(self) -> str:
        return self._text

    def __reduce__(self):
        return (type(self), (self.what, self.errno, self.libbpf_message, self.verifier_log,
                             self.hint))

    @property
    def not_permitted(self) -> bool:
        """The kernel supports it but these privileges may not (EPERM / EACCES)."""
        return self.errno in (errno_mod.EPERM, errno_mod.EACCES)

    @property
    def not_supported(self) -> bool:
        """This kernel (or its config) lacks the feature, whatever the privileges."""
        return self.errno in (errno_mod.EOPNOTSUPP, _ENOTSUPP, errno_mod.ENOSYS,
                              errno_mod.ENOTSUP)

    def _render(self) -> str:
        text = f"{self.what}: {os.strerror(self.errno) if self.errno else 'failed'} (errno {self.errno})"
        if self.hint:
            text += f"; {self.hint}"
        if self.verifier_log:
            lines = self.verifier_log.rstrip().splitlines()
            tail = lines[-_VERIFIER_TAIL_LINES:]
            skipped = len(lines) - len(tail)
            text += "\nverifier log" + (f" (last {len(tail)} of {len(lines)} lines)" if skipped else "")
            text += ":\n" + "\n".join(tail)
        elif self.libbpf_message:
            text += "\nlibbpf: " + self.libbpf_message.strip().replace("\n", "\nlibbpf: ")
        return text


# ---------------------------------------------------------------------------------------------
# Loading libbpf and libc
# ---------------------------------------------------------------------------------------------
class LibbpfUnavailable(BpfError):
    """libbpf.so.1 could not be loaded at all."""


def _load_libbpf() -> ctypes.CDLL | None:
    candidates = ["libbpf.so.1", ctypes.util.find_library("bpf")]
    for name in candidates:
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    return None


_lib = _load_libbpf()
_libc = ctypes.CDLL(None, use_errno=True)

# vsnprintf runs inside libbpf's print callback: a handle without use_errno, so formatting a
# message never swaps errno under libbpf's feet.
_libc_fmt = ctypes.CDLL(None)
_libc_fmt.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc_fmt.vsnprintf.restype = c_int
_libc.syscall.restype = c_long


def libbpf_available() -> bool:
    return _lib is not None


def _require_lib() -> ctypes.CDLL:
    if _lib is None:
        raise LibbpfUnavailable(
            "loading libbpf.so.1",
            errno_mod.ENOENT,
            hint="install the libbpf1 package (Debian/Ubuntu: `apt-get install libbpf1`)",
        )
    return _lib


_SIGNATURES: dict[str, tuple[list, object]] = {
    # version and errors
    "libbpf_major_version": ([], c_uint32),
    "libbpf_minor_version": ([], c_uint32),
    "libbpf_strerror": ([c_int, c_char_p, c_size_t], c_int),
    "libbpf_get_error": ([c_void_p], c_long),
    "libbpf_num_possible_cpus": ([], c_int),
    "libbpf_set_print": ([c_void_p], c_void_p),
    # objects
    "bpf_object__open_file": ([c_char_p, c_void_p], c_void_p),
    "bpf_object__load": ([c_void_p], c_int),
    "bpf_object__close": ([c_void_p], None),
    "bpf_object__name": ([c_void_p], c_char_p),
    "bpf_object__btf": ([c_void_p], c_void_p),
    "bpf_object__next_program": ([c_void_p, c_void_p], c_void_p),
    "bpf_object__next_map": ([c_void_p, c_void_p], c_void_p),
    "bpf_object__find_map_by_name": ([c_void_p, c_char_p], c_void_p),
    # programs
    "bpf_program__name": ([c_void_p], c_char_p),
    "bpf_program__section_name": ([c_void_p], c_char_p),
    "bpf_program__fd": ([c_void_p], c_int),
    "bpf_program__type": ([c_void_p], c_int),
    "bpf_program__set_type": ([c_void_p, c_int], c_int),
    "bpf_program__autoload": ([c_void_p], c_bool),
    "bpf_program__set_autoload": ([c_void_p, c_bool], c_int),
    "bpf_program__expected_attach_type": ([c_void_p], c_int),
    "bpf_program__attach": ([c_void_p], c_void_p),
    "bpf_program__attach_perf_event": ([c_void_p, c_int], c_void_p),
    "bpf_program__attach_raw_tracepoint": ([c_void_p, c_char_p], c_void_p),
    "bpf_program__attach_tracepoint": ([c_void_p, c_char_p, c_char_p], c_void_p),
    "bpf_program__attach_uprobe": ([c_void_p, c_bool, c_int, c_char_p, c_size_t], c_void_p),
    # links
    "bpf_link__destroy": ([c_void_p], c_int),
    "bpf_link__fd": ([c_void_p], c_int),
    "bpf_link_create": ([c_int, c_int, c_int, c_void_p], c_int),
    "bpf_prog_attach": ([c_int, c_int, c_int, c_uint], c_int),
    "bpf_prog_detach2": ([c_int, c_int, c_int], c_int),
    "bpf_raw_tracepoint_open": ([c_char_p, c_int], c_int),
    # maps
    "bpf_map__name": ([c_void_p], c_char_p),
    "bpf_map__fd": ([c_void_p], c_int),
    "bpf_map__type": ([c_void_p], c_int),
    "bpf_map__key_size": ([c_void_p], c_uint32),
    "bpf_map__value_size": ([c_void_p], c_uint32),
    "bpf_map__max_entries": ([c_void_p], c_uint32),
    "bpf_map__set_max_entries": ([c_void_p, c_uint32], c_int),
    "bpf_map__is_internal": ([c_void_p], c_bool),
    "bpf_map__initial_value": ([c_void_p, ctypes.POINTER(c_size_t)], c_void_p),
    "bpf_map__set_pin_path": ([c_void_p, c_char_p], c_int),
    "bpf_map__reuse_fd": ([c_void_p, c_int], c_int),
    "bpf_map_create": ([c_int, c_char_p, c_uint32, c_uint32, c_uint32, c_void_p], c_int),
    "bpf_map_lookup_elem": ([c_int, c_void_p, c_void_p], c_int),
    "bpf_map_update_elem": ([c_int, c_void_p, c_void_p, c_uint64], c_int),
    "bpf_map_delete_elem": ([c_int, c_void_p], c_int),
    "bpf_map_get_next_key": ([c_int, c_void_p, c_void_p], c_int),
    "bpf_map_lookup_and_delete_elem": ([c_int, c_void_p, c_void_p], c_int),
    "bpf_map_lookup_batch": (
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p], c_int),
    "bpf_map_lookup_and_delete_batch": (
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p], c_int),
    "bpf_map_update_batch": (
        [c_int, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p], c_int),
    "bpf_map_delete_batch": ([c_int, c_void_p, ctypes.POINTER(c_uint32), c_void_p], c_int),
    "bpf_obj_pin": ([c_int, c_char_p], c_int),
    "bpf_obj_get": ([c_char_p], c_int),
    "bpf_obj_get_info_by_fd": ([c_int, c_void_p, ctypes.POINTER(c_uint32)], c_int),
    "bpf_prog_get_fd_by_id": ([c_uint32], c_int),
    # raw program loading (probes), stats
    "bpf_prog_load": ([c_int, c_char_p, c_char_p, c_void_p, c_size_t, c_void_p], c_int),
    "bpf_enable_stats": ([c_int], c_int),
    # BTF
    "btf__load_vmlinux_btf": ([], c_void_p),
    "btf__free": ([c_void_p], None),
    "btf__find_by_name_kind": ([c_void_p, c_char_p, c_uint32], c_int),
    "btf__type_by_id": ([c_void_p, c_uint32], c_void_p),
    "btf__name_by_offset": ([c_void_p, c_uint32], c_char_p),
}

if _lib is not None:
    for _name, (_args, _res) in _SIGNATURES.items():
        _fn = getattr(_lib, _name)
        _fn.argtypes = _args
        _fn.restype = _res


def libbpf_version() -> str:
    lib = _require_lib()
    return f"{lib.libbpf_major_version()}.{lib.libbpf_minor_version()}"


# ---------------------------------------------------------------------------------------------
# libbpf's print callback: capture per call (thread-local), otherwise forward to logging
# ---------------------------------------------------------------------------------------------
_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_capture = threading.local()
# libbpf's debug output is large (every relocation); only formatted on request.
_DEBUG = os.environ.get("SNI_PROXY_LIBBPF_DEBUG") == "1"
_PRINT_BUF_SIZE = 8192


# va_list is a small struct (x86_64: 24 bytes, aarch64: 32) that vsnprintf consumes; copying the
# bytes is what va_copy does there, so a message longer than the first buffer can be re-formatted.
_VA_LIST_COPY_SIZE = 32
# A verifier log arrives as one message; beyond this it is cut (the tail is what explains).
_PRINT_MAX_MESSAGE = 16 * 1024 * 1024


def _format_va(fmt: bytes, va_list: int) -> str:
    va_copy = ctypes.create_string_buffer(ctypes.string_at(va_list, _VA_LIST_COPY_SIZE),
                                          _VA_LIST_COPY_SIZE)
    buf = ctypes.create_string_buffer(_PRINT_BUF_SIZE)
    needed = _libc_fmt.vsnprintf(buf, _PRINT_BUF_SIZE, fmt, va_list)
    if needed >= _PRINT_BUF_SIZE:
        size = min(needed + 1, _PRINT_MAX_MESSAGE)
        buf = ctypes.create_string_buffer(size)
        _libc_fmt.vsnprintf(buf, size, fmt, ctypes.addressof(va_copy))
    return buf.value.decode("utf-8", "replace")


def _print_callback(level: int, fmt: bytes, va_list: int) -> int:
    try:
        if level == LIBBPF_DEBUG and not _DEBUG:
            return 0
        text = _format_va(fmt, va_list)
        lines = getattr(_capture, "lines", None)
        if lines is not None:
            lines.append(text)
        elif level == LIBBPF_WARN:
            log.warning("libbpf: %s", text.rstrip())
        else:
            log.debug("libbpf: %s", text.rstrip())
    except Exception:  # noqa: BLE001 - an exception must never cross into C
        pass
    return 0


# Must stay referenced for the life of the process: libbpf keeps the raw pointer.
_PRINT_CALLBACK = _PRINT_FN(_print_callback)
if _lib is not None:
    _lib.libbpf_set_print(ctypes.cast(_PRINT_CALLBACK, c_void_p))


@contextlib.contextmanager
def capture_libbpf_output() -> Iterator[list[str]]:
    """Collect libbpf's messages printed by calls made in this thread inside the block."""
    previous = getattr(_capture, "lines", None)
    lines: list[str] = []
    _capture.lines = lines
    try:
        yield lines
    finally:
        _capture.lines = previous
        if previous is not None:
            previous.extend(lines)


def _split_verifier_log(text: str) -> tuple[str, str | None]:
    if _VERIFIER_BEGIN not in text:
        return text, None
    before, _, rest = text.partition(_VERIFIER_BEGIN)
    verifier, _, after = rest.partition(_VERIFIER_END)
    return (before + after), verifier.strip("\n")


def _error(what: str, err: int, lines: list[str] | None = None, hint: str | None = None) -> BpfError:
    text = "".join(lines or [])
    message, verifier = _split_verifier_log(text)
    return BpfError(what, err, message, verifier, hint)


def _check_int(ret: int, what: str, lines: list[str] | None = None) -> int:
    if ret < 0:
        # libbpf 1.x returns -errno (and sets errno to the same value)
        raise _error(what, -ret, lines)
    return ret


def _check_ptr(ptr: int | None, what: str, lines: list[str] | None = None,
               hint: str | None = None) -> int:
    err = ctypes.get_errno()
    if not ptr:
        raise _error(what, err or errno_mod.EINVAL, lines, hint)
    e = _require_lib().libbpf_get_error(ptr)
    if e:
        raise _error(what, -e, lines, hint)
    return ptr


def _b(s: str) -> bytes:
    return s.encode()


def _s(b: bytes | None) -> str:
    return b.decode() if b else ""


# ---------------------------------------------------------------------------------------------
# Process limits and CPUs
# ---------------------------------------------------------------------------------------------
def raise_memlock_rlimit() -> bool:
    """Raise RLIMIT_MEMLOCK for kernels < 5.11 that charge BPF memory to it.

    Since 5.11 the memory cgroup is charged instead, so failing to raise it (no
    CAP_SYS_RESOURCE) is harmless: never an error, returns whether the limit is now infinite.
    """
    inf = resource.RLIM_INFINITY
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (inf, inf))
        return True
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        return False


def _parse_cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def online_cpus() -> list[int]:
    with open("/sys/devices/system/cpu/online") as f:
        return _parse_cpu_list(f.read())


def possible_cpus() -> int:
    """Number of possible CPUs: the length of a per-CPU map value list."""
    if _lib is not None:
        n = _lib.libbpf_num_possible_cpus()
        if n > 0:
            return n
    with open("/sys/devices/system/cpu/possible") as f:
        return max(_parse_cpu_list(f.read())) + 1


# ---------------------------------------------------------------------------------------------
# bpf_object
# ---------------------------------------------------------------------------------------------
def object_open(path: str) -> int:
    lib = _require_lib()
    with capture_libbpf_output() as lines:
        ptr = lib.bpf_object__open_file(_b(path), None)
    return _check_ptr(ptr, f"opening BPF object {path}", lines)


def object_load(obj: int, name: str) -> None:
    lib = _require_lib()
    with capture_libbpf_output() as lines:
        ret = lib.bpf_object__load(obj)
    if ret < 0:
        failed = [ln for ln in lines if "failed to load program" in ln or "prog '" in ln]
        what = f"loading BPF object {name}"
        if failed:
            what += f" ({failed[-1].strip()})"
        raise _error(what, -ret, lines)


def object_close(obj: int) -> None:
    if obj:
        _require_lib().bpf_object__close(obj)


def object_programs(obj: int) -> list[int]:
    lib = _require_lib()
    out, prog = [], None
    while True:
        prog = lib.bpf_object__next_program(obj, prog)
        if not prog:
            return out
        out.append(prog)


def object_maps(obj: int) -> list[int]:
    lib = _require_lib()
    out, m = [], None
    while True:
        m = lib.bpf_object__next_map(obj, m)
        if not m:
            return out
        out.append(m)


def object_find_map(obj: int, name: str) -> int | None:
    return _require_lib().bpf_object__find_map_by_name(obj, _b(name)) or None


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("offset", c_uint32), ("size", c_uint32)]


def object_datasec_variables(obj: int, section: str) -> dict[str, tuple[int, int]]:
    """Variables of a data section (e.g. ``.rodata``) in an opened object: name -> (offset, size)."""
    lib = _require_lib()
    btf = lib.bpf_object__btf(obj)
    if not btf:
        return {}
    type_id = lib.btf__find_by_name_kind(btf, _b(section), BTF_KIND_DATASEC)
    if type_id <= 0:
        return {}
    t = _BtfType.from_address(lib.btf__type_by_id(btf, type_id))
    vlen = t.info & 0xFFFF
    secinfo_addr = lib.btf__type_by_id(btf, type_id) + ctypes.sizeof(_BtfType)
    out: dict[str, tuple[int, int]] = {}
    for i in range(vlen):
        vsi = _BtfVarSecinfo.from_address(secinfo_addr + i * ctypes.sizeof(_BtfVarSecinfo))
        var = _BtfType.from_address(lib.btf__type_by_id(btf, vsi.type))
        out[_s(lib.btf__name_by_offset(btf, var.name_off))] = (vsi.offset, vsi.size)
    return out


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", c_uint32), ("val", ctypes.c_int32)]


def _object_btf_type(obj: int, name: str, kind: int):
    """(btf pointer, btf_type, address of the type's trailing records) or None."""
    lib = _require_lib()
    btf = lib.bpf_object__btf(obj)
    if not btf:
        return None
    type_id = lib.btf__find_by_name_kind(btf, _b(name), kind)
    if type_id <= 0:
        return None
    addr = lib.btf__type_by_id(btf, type_id)
    return btf, _BtfType.from_address(addr), addr + ctypes.sizeof(_BtfType)


def object_btf_struct(obj: int, name: str) -> tuple[int, list[tuple[str, int]]] | None:
    """`struct name` in an opened object's BTF: (size, [(member, byte offset)]), or None."""
    found = _object_btf_type(obj, name, BTF_KIND_STRUCT)
    if found is None:
        return None
    btf, t, records = found
    lib = _require_lib()
    kind_flag = t.info >> 31          # set: the low 24 bits of offset are the bit offset
    members = []
    for i in range(t.info & 0xFFFF):
        m = _BtfMember.from_address(records + i * ctypes.sizeof(_BtfMember))
        bits = m.offset & 0xFFFFFF if kind_flag else m.offset
        members.append((_s(lib.btf__name_by_offset(btf, m.name_off)), bits // 8))
    return t.size_or_type, members


def object_btf_enum(obj: int, name: str) -> list[tuple[str, int]] | None:
    """`enum name` in an opened object's BTF: [(enumerator, value)] in declaration order."""
    found = _object_btf_type(obj, name, BTF_KIND_ENUM)
    if found is None:
        return None
    btf, t, records = found
    lib = _require_lib()
    values = []
    for i in range(t.info & 0xFFFF):
        e = _BtfEnum.from_address(records + i * ctypes.sizeof(_BtfEnum))
        values.append((_s(lib.btf__name_by_offset(btf, e.name_off)), e.val))
    return values


def map_write_initial_value(map_ptr: int, offset: int, data: bytes) -> None:
    """Write into an internal map's (``.rodata``/``.data``) initial image before load."""
    lib = _require_lib()
    size = c_size_t(0)
    addr = lib.bpf_map__initial_value(map_ptr, ctypes.byref(size))
    if not addr:
        raise BpfError("reading the initial value of a data section", errno_mod.EINVAL,
                       hint="set .rodata constants after open() and before load()")
    if offset + len(data) > size.value:
        raise BpfError("writing a data section variable", errno_mod.ERANGE,
                       hint=f"offset {offset}+{len(data)} is past the section size {size.value}")
    ctypes.memmove(addr + offset, data, len(data))


# ---------------------------------------------------------------------------------------------
# bpf_program
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProgramDesc:
    name: str
    section: str
    type: int
    autoload: bool


def program_describe(prog: int) -> ProgramDesc:
    lib = _require_lib()
    return ProgramDesc(
        name=_s(lib.bpf_program__name(prog)),
        section=_s(lib.bpf_program__section_name(prog)),
        type=lib.bpf_program__type(prog),
        autoload=bool(lib.bpf_program__autoload(prog)),
    )


def program_fd(prog: int) -> int:
    return _require_lib().bpf_program__fd(prog)


def program_set_autoload(prog: int, autoload: bool) -> None:
    _check_int(_require_lib().bpf_program__set_autoload(prog, autoload), "setting autoload")


def _attach(fn_name: str, what: str, *args, hint: str | None = None) -> int:
    lib = _require_lib()
    with capture_libbpf_output() as lines:
        ptr = getattr(lib, fn_name)(*args)
    return _check_ptr(ptr, what, lines, hint)


def program_attach(prog: int, name: str) -> int:
    """``bpf_program__attach``: attach by SEC() name. Returns a ``struct bpf_link *``."""
    return _attach("bpf_program__attach", f"attaching program {name}", prog)


def program_attach_perf_event(prog: int, perf_fd: int, name: str) -> int:
    return _attach("bpf_program__attach_perf_event",
                   f"attaching program {name} to perf event fd {perf_fd}", prog, perf_fd)


def program_attach_raw_tracepoint(prog: int, tp_name: str, name: str) -> int:
    return _attach("bpf_program__attach_raw_tracepoint",
                   f"attaching program {name} to raw tracepoint {tp_name}", prog, _b(tp_name))


TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_mount() -> str | None:
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def program_attach_tracepoint(prog: int, category: str, tp_name: str, name: str) -> int:
    what = f"attaching program {name} to tracepoint {category}/{tp_name}"
    if tracefs_mount() is None:
        raise BpfError(
            what, errno_mod.ENOENT,
            hint="tracefs is not mounted (neither /sys/kernel/tracing nor "
                 "/sys/kernel/debug/tracing has events/), so tracepoint ids cannot be read; use a "
                 "SEC(\"tp_btf/...\") or SEC(\"raw_tp/...\") program (no tracefs needed) or, as "
                 "root, `mount -t tracefs tracefs /sys/kernel/tracing`",
        )
    return _attach("bpf_program__attach_tracepoint", what, prog, _b(category), _b(tp_name))


def program_attach_uprobe(prog: int, retprobe: bool, pid: int, binary: str, offset: int,
                          name: str) -> int:
    kind = "uretprobe" if retprobe else "uprobe"
    return _attach("bpf_program__attach_uprobe",
                   f"attaching program {name} as {kind} to {binary}+{offset:#x} (pid {pid})",
                   prog, retprobe, pid, _b(binary), offset)


def link_destroy(link: int) -> None:
    if link:
        _require_lib().bpf_link__destroy(link)


def link_fd(link: int) -> int:
    return _require_lib().bpf_link__fd(link)


class _LinkCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t), ("flags", c_uint32), ("iter_info", c_void_p), ("iter_info_len", c_uint32),
        ("target_btf_id", c_uint32), ("union_space", c_uint64 * 5),
    ]


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0,
                what: str = "creating BPF link") -> int:
    """``bpf_link_create``: a kernel link fd (e.g. XDP with mode flags); close the fd to detach."""
    opts = _LinkCreateOpts(sz=ctypes.sizeof(_LinkCreateOpts), flags=flags)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_link_create(prog_fd, target_fd, attach_type, ctypes.byref(opts))
    return _check_int(ret, what, lines)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0,
                what: str = "bpf_prog_attach") -> None:
    _check_int(_require_lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), what)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int,
                what: str = "bpf_prog_detach2") -> None:
    _check_int(_require_lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), what)


def raw_tracepoint_open(tp_name: str | None, prog_fd: int) -> int:
    """Attach a raw_tp (name) or tp_btf (name None: taken from the program's BTF id) program."""
    ret = _require_lib().bpf_raw_tracepoint_open(_b(tp_name) if tp_name else None, prog_fd)
    return _check_int(ret, f"opening raw tracepoint {tp_name or '(BTF)'}")


# ---------------------------------------------------------------------------------------------
# bpf_map
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MapDesc:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    internal: bool


def map_describe(map_ptr: int) -> MapDesc:
    lib = _require_lib()
    return MapDesc(
        name=_s(lib.bpf_map__name(map_ptr)),
        type=lib.bpf_map__type(map_ptr),
        key_size=lib.bpf_map__key_size(map_ptr),
        value_size=lib.bpf_map__value_size(map_ptr),
        max_entries=lib.bpf_map__max_entries(map_ptr),
        internal=bool(lib.bpf_map__is_internal(map_ptr)),
    )


def map_fd(map_ptr: int) -> int:
    return _require_lib().bpf_map__fd(map_ptr)


def map_set_max_entries(map_ptr: int, n: int, name: str) -> None:
    _check_int(_require_lib().bpf_map__set_max_entries(map_ptr, n),
               f"setting max_entries={n} of map {name} (only possible before load)")


def map_reuse_fd(map_ptr: int, fd: int, name: str) -> None:
    _check_int(_require_lib().bpf_map__reuse_fd(map_ptr, fd), f"reusing an fd for map {name}")


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t), ("btf_fd", c_uint32), ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32), ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32), ("map_flags", c_uint32), ("map_extra", c_uint64),
        ("numa_node", c_uint32), ("map_ifindex", c_uint32),
    ]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_map_create(map_type, _b(name) if name else None, key_size,
                                            value_size, max_entries, ctypes.byref(opts))
    return _check_int(
        ret, f"creating {map_type_name(map_type)} map {name!r} (key {key_size} B, value "
             f"{value_size} B, {max_entries} entries)", lines)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    ret = _require_lib().bpf_map_lookup_elem(fd, key, value)
    if ret < 0:
        if -ret == errno_mod.ENOENT:
            return None
        _check_int(ret, f"looking up a key in map fd {fd}")
    return value.raw


def map_lookup_and_delete(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    ret = _require_lib().bpf_map_lookup_and_delete_elem(fd, key, value)
    if ret < 0:
        if -ret == errno_mod.ENOENT:
            return None
        _check_int(ret, f"lookup-and-delete in map fd {fd}")
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    ret = _require_lib().bpf_map_update_elem(fd, key, value, flags)
    if ret < 0:
        err = -ret
        hint = None
        if err == errno_mod.EEXIST:
            hint = "key exists and BPF_NOEXIST was given"
        elif err == errno_mod.ENOENT:
            hint = "key does not exist and BPF_EXIST was given"
        elif err == errno_mod.E2BIG:
            hint = "map is full (max_entries reached) or index out of range"
        raise BpfError(f"updating map fd {fd}", err, hint=hint)


def map_delete(fd: int, key: bytes) -> bool:
    ret = _require_lib().bpf_map_delete_elem(fd, key)
    if ret < 0:
        if -ret == errno_mod.ENOENT:
            return False
        _check_int(ret, f"deleting a key from map fd {fd}")
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(max(key_size, 1))
    ret = _require_lib().bpf_map_get_next_key(fd, key, out)
    if ret < 0:
        if -ret == errno_mod.ENOENT:
            return None
        _check_int(ret, f"iterating map fd {fd}")
    return out.raw[:key_size]


class _BatchOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


def map_lookup_batch(fd: int, key_size: int, value_size: int, batch_size: int,
                     in_batch: bytes | None, delete: bool = False,
                     ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """One ``bpf_map_lookup[_and_delete]_batch`` call.

    Returns (pairs, next_token); next_token None means the map is exhausted. The token buffer
    is sized for hash maps (key_size) and array maps (4) alike.
    """
    lib = _require_lib()
    token_size = max(key_size, 8)
    in_buf = ctypes.create_string_buffer(in_batch, token_size) if in_batch is not None else None
    out_buf = ctypes.create_string_buffer(token_size)
    keys = ctypes.create_string_buffer(key_size * batch_size)
    values = ctypes.create_string_buffer(value_size * batch_size)
    count = c_uint32(batch_size)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    fn = lib.bpf_map_lookup_and_delete_batch if delete else lib.bpf_map_lookup_batch
    ret = fn(fd, in_buf, out_buf, keys, values, ctypes.byref(count), ctypes.byref(opts))
    done = False
    if ret < 0:
        err = -ret
        if err != errno_mod.ENOENT:
            raise BpfError(f"batch lookup in map fd {fd}", err,
                           hint="batch operations need kernel >= 5.6 and a hash/array map")
        done = True  # ENOENT: last (possibly partial) batch
    n = count.value
    kr, vr = keys.raw, values.raw
    pairs = [(kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size])
             for i in range(n)]
    return pairs, (None if done else out_buf.raw)


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int,
                     flags: int = BPF_ANY) -> int:
    """One ``bpf_map_update_batch`` call over `count` packed keys and values: all or raises.

    On an error the kernel stops at the failing element; the BpfError's `done` attribute says
    how many went in before it, so the caller can undo exactly those.
    """
    n = c_uint32(count)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts), elem_flags=flags)
    ret = _require_lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(n),
                                              ctypes.byref(opts))
    if ret < 0:
        err = -ret
        hint = {errno_mod.EEXIST: "a key exists and BPF_NOEXIST was given",
                errno_mod.E2BIG: "map is full (max_entries reached)"}.get(err)
        exc = BpfError(f"batch update of {count} keys in map fd {fd}", err, hint=hint)
        exc.done = n.value
        raise exc
    return n.value


def map_delete_batch(fd: int, keys: bytes, count: int) -> int:
    """One ``bpf_map_delete_batch`` call; returns how many were deleted. Stops at the first
    missing key (ENOENT): the caller deletes the rest one by one."""
    n = c_uint32(count)
    opts = _BatchOpts(sz=ctypes.sizeof(_BatchOpts))
    ret = _require_lib().bpf_map_delete_batch(fd, keys, ctypes.byref(n), ctypes.byref(opts))
    if ret < 0 and -ret != errno_mod.ENOENT:
        _check_int(ret, f"batch delete of {count} keys in map fd {fd}")
    return n.value


def obj_pin(fd: int, path: str) -> None:
    ret = _require_lib().bpf_obj_pin(fd, _b(path))
    if ret < 0:
        err = -ret
        hint = None
        if err in (errno_mod.ENOENT, errno_mod.EPERM, errno_mod.EINVAL):
            hint = ("the directory must be on a mounted bpffs: "
                    "`mount -t bpf bpf /sys/fs/bpf` (as root) and create the subdirectory")
        elif err == errno_mod.EEXIST:
            hint = "the path is already pinned: reuse it with from_pinned() or unlink it"
        raise BpfError(f"pinning fd {fd} at {path}", err, hint=hint)


def obj_get(path: str) -> int:
    ret = _require_lib().bpf_obj_get(_b(path))
    return _check_int(ret, f"opening pinned BPF object {path}")


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32), ("value_size", c_uint32),
        ("max_entries", c_uint32), ("map_flags", c_uint32), ("name", ctypes.c_char * 16),
        ("ifindex", c_uint32), ("btf_vmlinux_value_type_id", c_uint32), ("netns_dev", c_uint64),
        ("netns_ino", c_uint64), ("btf_id", c_uint32), ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32), ("pad", c_uint32), ("map_extra", c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("id", c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32), ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64), ("xlated_prog_insns", c_uint64), ("load_time", c_uint64),
        ("created_by_uid", c_uint32), ("nr_map_ids", c_uint32), ("map_ids", c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", c_uint32), ("gpl_compatible", c_uint32),
        ("netns_dev", c_uint64), ("netns_ino", c_uint64), ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32), ("jited_ksyms", c_uint64), ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32), ("func_info_rec_size", c_uint32), ("func_info", c_uint64),
        ("nr_func_info", c_uint32), ("nr_line_info", c_uint32), ("line_info", c_uint64),
        ("jited_line_info", c_uint64), ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32), ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32), ("prog_tags", c_uint64), ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64), ("recursion_misses", c_uint64), ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32), ("attach_btf_id", c_uint32), ("pad", c_uint32),
    ]


def _get_info(fd: int, info: ctypes.Structure, what: str) -> None:
    length = c_uint32(ctypes.sizeof(info))
    ret = _require_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(length))
    _check_int(ret, what)


def _fdinfo(fd: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def map_info(fd: int) -> dict:
    """Kernel's view of a map (bpf_obj_get_info_by_fd) plus memlock bytes from fdinfo."""
    info = _MapInfo()
    _get_info(fd, info, f"reading info of map fd {fd}")
    out = {
        "id": info.id, "type": info.type, "type_name": map_type_name(info.type),
        "name": _s(info.name), "key_size": info.key_size, "value_size": info.value_size,
        "max_entries": info.max_entries, "flags": info.map_flags,
    }
    memlock = _fdinfo(fd).get("memlock")
    if memlock is not None and memlock.isdigit():
        out["memlock_bytes"] = int(memlock)
    return out


def prog_info(fd: int) -> dict:
    """Kernel's view of a program: id, type, name, tag, run_time_ns, run_cnt (BPF stats)."""
    info = _ProgInfo()
    _get_info(fd, info, f"reading info of program fd {fd}")
    out = {
        "id": info.id, "type": info.type, "type_name": prog_type_name(info.type),
        "name": _s(info.name), "tag": bytes(info.tag).hex(), "run_time_ns": info.run_time_ns,
        "run_cnt": info.run_cnt, "recursion_misses": info.recursion_misses,
        "verified_insns": info.verified_insns, "jited_prog_len": info.jited_prog_len,
        "xlated_prog_len": info.xlated_prog_len,
    }
    memlock = _fdinfo(fd).get("memlock")
    if memlock is not None and memlock.isdigit():
        out["memlock_bytes"] = int(memlock)
    return out


# ---------------------------------------------------------------------------------------------
# Raw program loading (feature probes) and BTF ids
# ---------------------------------------------------------------------------------------------
class _ProgLoadOpts(ctypes.Structure):
    _fields_ = [
        ("sz", c_size_t), ("attempts", c_int), ("expected_attach_type", c_int),
        ("prog_btf_fd", c_uint32), ("prog_flags", c_uint32), ("prog_ifindex", c_uint32),
        ("kern_version", c_uint32), ("attach_btf_id", c_uint32), ("attach_prog_fd", c_uint32),
        ("attach_btf_obj_fd", c_uint32), ("fd_array", c_void_p), ("func_info", c_void_p),
        ("func_info_cnt", c_uint32), ("func_info_rec_size", c_uint32), ("line_info", c_void_p),
        ("line_info_cnt", c_uint32), ("line_info_rec_size", c_uint32), ("log_level", c_uint32),
        ("log_size", c_uint32), ("log_buf", c_void_p),
    ]


# "r0 = 0; exit": the smallest valid program for every type the project probes.
RETURN_ZERO_INSNS = bytes.fromhex("b700000000000000" "9500000000000000")
_PROBE_LOG_SIZE = 64 * 1024


def prog_load_raw(prog_type: int, insns: bytes, name: str = "", license: str = "GPL",
                  expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load raw instructions; returns the program fd. The verifier log is in the error."""
    log_buf = ctypes.create_string_buffer(_PROBE_LOG_SIZE)
    opts = _ProgLoadOpts(
        sz=ctypes.sizeof(_ProgLoadOpts), expected_attach_type=expected_attach_type,
        attach_btf_id=attach_btf_id, log_level=1, log_size=_PROBE_LOG_SIZE,
        log_buf=ctypes.cast(log_buf, c_void_p),
    )
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_prog_load(prog_type, _b(name) if name else None, _b(license),
                                           insns, len(insns) // 8, ctypes.byref(opts))
    if ret < 0:
        err = -ret
        verifier = log_buf.value.decode("utf-8", "replace") or None
        raise BpfError(f"loading a {prog_type_name(prog_type)} program", err,
                       "".join(lines), verifier)
    return ret


_vmlinux_btf_lock = threading.Lock()
_vmlinux_btf: int | None = None


def vmlinux_btf_type_id(name: str, kind: int) -> int:
    """BTF type id in the kernel's vmlinux BTF (e.g. a FUNC for fentry); raises if absent."""
    global _vmlinux_btf
    lib = _require_lib()
    with _vmlinux_btf_lock:
        if _vmlinux_btf is None:
            with capture_libbpf_output() as lines:
                ptr = lib.btf__load_vmlinux_btf()
            _vmlinux_btf = _check_ptr(ptr, "loading the kernel's BTF (/sys/kernel/btf/vmlinux)",
                                      lines, hint="the kernel needs CONFIG_DEBUG_INFO_BTF=y")
        ret = lib.btf__find_by_name_kind(_vmlinux_btf, _b(name), kind)
    return _check_int(ret, f"finding {name} in the kernel's BTF")


# ---------------------------------------------------------------------------------------------
# Raw syscalls: perf_event_open, BPF stats
# ---------------------------------------------------------------------------------------------
class PerfEventAttr(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32), ("size", c_uint32), ("config", c_uint64),
        ("sample_period_or_freq", c_uint64), ("sample_type", c_uint64), ("read_format", c_uint64),
        ("flags", c_uint64), ("wakeup_events", c_uint32), ("bp_type", c_uint32),
        ("config1", c_uint64), ("config2", c_uint64), ("branch_sample_type", c_uint64),
        ("sample_regs_user", c_uint64), ("sample_stack_user", c_uint32), ("clockid", ctypes.c_int32),
        ("sample_regs_intr", c_uint64), ("aux_watermark", c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", c_uint32), ("reserved_3", c_uint32), ("sig_data", c_uint64),
    ]  # 128 bytes = PERF_ATTR_SIZE_VER8


def _syscall_numbers() -> tuple[int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise BpfError(f"raw syscalls on {machine}", errno_mod.ENOSYS,
                       hint="add the syscall numbers of this architecture to libbpf._SYSCALLS")
    return _SYSCALLS[machine]


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, group_fd: int = -1,
                    flags: int = PERF_FLAG_FD_CLOEXEC, what: str = "perf_event_open") -> int:
    attr.size = ctypes.sizeof(PerfEventAttr)
    nr = _syscall_numbers()[0]
    ret = _libc.syscall(c_long(nr), ctypes.byref(attr), c_int(pid), c_int(cpu), c_int(group_fd),
                        ctypes.c_ulong(flags))
    if ret < 0:
        err = ctypes.get_errno()
        hint = None
        if err in (errno_mod.EACCES, errno_mod.EPERM):
            hint = ("needs CAP_PERFMON (or CAP_SYS_ADMIN), or kernel.perf_event_paranoid <= 1 for "
                    "own processes; `setcap cap_perfmon,cap_bpf+ep` on the interpreter")
        elif err == errno_mod.ENOENT:
            hint = "this event (PMU) does not exist in this kernel"
        raise BpfError(what, err, hint=hint)
    return ret


def perf_event_open_cpu_clock(cpu: int, freq_hz: int, pid: int = -1) -> int:
    """A software cpu-clock sampling event at ``freq_hz`` (pid -1: every task on ``cpu``)."""
    attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_CPU_CLOCK,
                         sample_period_or_freq=freq_hz, flags=_PERF_ATTR_FLAG_FREQ)
    return perf_event_open(attr, pid, cpu,
                           what=f"perf_event_open(cpu-clock {freq_hz} Hz, cpu {cpu}, pid {pid})")


def perf_event_open_probe(pmu_type: int, target: str, offset: int, what: str) -> int:
    """A kprobe/uprobe perf event via its PMU (config1 = symbol or path, config2 = offset)."""
    target_buf = ctypes.create_string_buffer(_b(target))
    attr = PerfEventAttr(type=pmu_type, sample_period_or_freq=1,
                         config1=ctypes.addressof(target_buf), config2=offset)
    return perf_event_open(attr, -1, 0, what=what)


def enable_bpf_stats() -> int:
    """``BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)``: stats stay on while the returned fd is open."""
    ret = _require_lib().bpf_enable_stats(BPF_STATS_RUN_TIME)
    if ret < 0:
        raise BpfError("enabling BPF run-time statistics (BPF_ENABLE_STATS)", -ret,
                       hint="needs CAP_SYS_ADMIN and kernel >= 5.8; alternatively "
                            "`sysctl kernel.bpf_stats_enabled=1`")
    return ret


# ---------------------------------------------------------------------------------------------
# Tracers (issue 12): ring buffers, uprobes by function name, tracepoint prototypes from BTF
# ---------------------------------------------------------------------------------------------
#: ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
RINGBUF_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)

_TRACER_SIGNATURES: dict[str, tuple[list, object]] = {
    "ring_buffer__new": ([c_int, RINGBUF_SAMPLE_FN, c_void_p, c_void_p], c_void_p),
    "ring_buffer__poll": ([c_void_p, c_int], c_int),
    "ring_buffer__consume": ([c_void_p], c_int),
    "ring_buffer__free": ([c_void_p], None),
    "bpf_program__attach_uprobe_opts": ([c_void_p, c_int, c_char_p, c_size_t, c_void_p], c_void_p),
}
if _lib is not None:
    for _name, (_args, _res) in _TRACER_SIGNATURES.items():
        _fn = getattr(_lib, _name)
        _fn.argtypes = _args
        _fn.restype = _res


# ---------------------------------------------------------------------------------------------
# tc (clsact) hooks for the kernel TCP splice (ebpf/tcpsplice.py), libbpf >= 0.6
# ---------------------------------------------------------------------------------------------
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2


class BpfTcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf.h): sz, ifindex, attach_point, parent."""

    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int),
                ("parent", c_uint32)]


class BpfTcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf.h): sz, prog_fd, flags, prog_id, handle, priority."""

    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32),
                ("prog_id", c_uint32), ("handle", c_uint32), ("priority", c_uint32)]


_TC_SIGNATURES = {
    "bpf_tc_hook_create": ([ctypes.POINTER(BpfTcHook)], c_int),
    "bpf_tc_hook_destroy": ([ctypes.POINTER(BpfTcHook)], c_int),
    "bpf_tc_attach": ([ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)], c_int),
    "bpf_tc_detach": ([ctypes.POINTER(BpfTcHook), ctypes.POINTER(BpfTcOpts)], c_int),
}
if _lib is not None:
    for _name, (_args, _res) in _TC_SIGNATURES.items():
        _fn = getattr(_lib, _name)
        _fn.argtypes = _args
        _fn.restype = _res


class RingBuffer:
    """libbpf's ``struct ring_buffer`` over one BPF_MAP_TYPE_RINGBUF map.

    ``callback(data: bytes)`` runs inside poll()/consume() for each record (in the calling
    thread; the GIL is released while libbpf waits). An exception in the callback is kept
    and re-raised by poll() after libbpf returns, never across the C boundary.
    """

    def __init__(self, map_fd: int, callback, what: str = "ring buffer") -> None:
        self._callback = callback
        self._error: BaseException | None = None
        # Referenced by self for as long as libbpf may call it.
        self._c_callback = RINGBUF_SAMPLE_FN(self._on_sample)
        with capture_libbpf_output() as lines:
            ptr = _require_lib().ring_buffer__new(map_fd, self._c_callback, None, None)
        self._ptr = _check_ptr(ptr, f"creating a ring buffer reader for {what}", lines)
        self.what = what

    def _on_sample(self, _ctx: int, data: int, size: int) -> int:
        try:
            self._callback(ctypes.string_at(data, size))
        except BaseException as exc:  # noqa: BLE001 - kept, re-raised after the C call
            self._error = exc
            return -1  # stops this poll round
        return 0

    def _raise_kept(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records and handle them; returns how many."""
        if not self._ptr:
            return 0
        ret = _require_lib().ring_buffer__poll(self._ptr, timeout_ms)
        self._raise_kept()
        if ret < 0 and -ret != errno_mod.EINTR:
            _check_int(ret, f"polling {self.what}")
        return max(ret, 0)

    def consume(self) -> int:
        """Handle every record already there, without waiting."""
        if not self._ptr:
            return 0
        ret = _require_lib().ring_buffer__consume(self._ptr)
        self._raise_kept()
        if ret < 0 and -ret != errno_mod.EINTR:
            _check_int(ret, f"consuming {self.what}")
        return max(ret, 0)

    def epoll_fd(self) -> int:
        """libbpf's epoll fd over the ring (readable when the kernel woke the reader): to
        wait in select/poll without holding whatever serializes poll() and consume()."""
        return ring_buffer_epoll_fd(self._ptr, self.what)

    def close(self) -> None:
        ptr, self._ptr = self._ptr, 0
        if ptr:
            _require_lib().ring_buffer__free(ptr)


class _UprobeOpts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("ref_ctr_offset", c_size_t), ("bpf_cookie", c_uint64),
                ("retprobe", c_bool), ("func_name", c_char_p)]


def program_attach_uprobe_func(prog: int, retprobe: bool, pid: int, binary: str,
                               func_name: str, name: str) -> int:
    """``bpf_program__attach_uprobe_opts`` by function name (libbpf resolves the ELF symbol)."""
    kind = "uretprobe" if retprobe else "uprobe"
    opts = _UprobeOpts(sz=ctypes.sizeof(_UprobeOpts), retprobe=retprobe, func_name=_b(func_name))
    return _attach("bpf_program__attach_uprobe_opts",
                   f"attaching program {name} as {kind} to {binary}:{func_name} (pid {pid})",
                   prog, pid, _b(binary), 0, ctypes.byref(opts),
                   hint="uprobes need CAP_SYS_ADMIN or CAP_PERFMON+CAP_BPF and a kernel with "
                        "CONFIG_UPROBES; the function must be in the binary's symbol table")


_BTF_KIND_PTR = 2
_BTF_KIND_FUNC_PROTO = 13


def vmlinux_tracepoint_arg_count(tracepoint: str) -> int:
    """Arguments of a tracepoint from its ``btf_trace_<name>`` typedef in the kernel's BTF,
    without the leading ``void *__data`` (e.g. 3 for tcp_retransmit_skb since 2025)."""
    lib = _require_lib()
    type_id = vmlinux_btf_type_id(f"btf_trace_{tracepoint}", BTF_KIND_TYPEDEF)
    with _vmlinux_btf_lock:
        for _ in range(4):  # typedef -> pointer -> func_proto
            t = _BtfType.from_address(lib.btf__type_by_id(_vmlinux_btf, type_id))
            kind = (t.info >> 24) & 0x1F
            if kind == _BTF_KIND_FUNC_PROTO:
                return max((t.info & 0xFFFF) - 1, 0)
            type_id = t.size_or_type
    raise BpfError(f"reading the prototype of tracepoint {tracepoint} from BTF", errno_mod.EINVAL)
def _tc_hook(ifindex: int, attach_point: int) -> BpfTcHook:
    return BpfTcHook(ctypes.sizeof(BpfTcHook), ifindex, attach_point, 0)


def tc_hook_create(ifindex: int) -> bool:
    """Create the clsact qdisc on `ifindex`. True: created by us; False: it existed already."""
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_tc_hook_create(ctypes.byref(_tc_hook(ifindex, BPF_TC_INGRESS)))
    if ret == -errno_mod.EEXIST:
        return False
    _check_int(ret, f"creating the clsact qdisc on ifindex {ifindex}", lines)
    return True


def tc_hook_destroy(ifindex: int) -> None:
    """Delete the clsact qdisc of `ifindex` (ingress and egress together, with any filter)."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_tc_hook_destroy(ctypes.byref(hook))
    if ret not in (0, -errno_mod.ENOENT, -errno_mod.ENODEV):
        _check_int(ret, f"deleting the clsact qdisc on ifindex {ifindex}", lines)


def tc_attach(ifindex: int, attach_point: int, prog_fd: int, priority: int = 0,
              handle: int = 0) -> tuple[int, int]:
    """Attach a SCHED_CLS program (direct action) to a clsact hook; (handle, priority)."""
    opts = BpfTcOpts(ctypes.sizeof(BpfTcOpts), prog_fd, 0, 0, handle, priority)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_tc_attach(ctypes.byref(_tc_hook(ifindex, attach_point)),
                                           ctypes.byref(opts))
    _check_int(ret, f"attaching a tc program on ifindex {ifindex}", lines)
    return opts.handle, opts.priority


def tc_detach(ifindex: int, attach_point: int, handle: int, priority: int) -> None:
    """Remove exactly the filter (handle, priority) that tc_attach added."""
    opts = BpfTcOpts(ctypes.sizeof(BpfTcOpts), 0, 0, 0, handle, priority)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_tc_detach(ctypes.byref(_tc_hook(ifindex, attach_point)),
                                           ctypes.byref(opts))
    if ret not in (0, -errno_mod.ENOENT, -errno_mod.ENODEV):
        _check_int(ret, f"detaching a tc program on ifindex {ifindex}", lines)


# --- tcp_splice: atomic replacement of a tc filter ------------------------------------------
BPF_TC_F_REPLACE = 1


def tc_replace(ifindex: int, attach_point: int, prog_fd: int, priority: int,
               handle: int) -> tuple[int, int]:
    """Put `prog_fd` in the filter at (handle, priority), atomically (no packet meets an
    empty hook: a restarted tcp_splice keeps its predecessor's live flows); (handle, priority)."""
    opts = BpfTcOpts(ctypes.sizeof(BpfTcOpts), prog_fd, BPF_TC_F_REPLACE, 0, handle, priority)
    with capture_libbpf_output() as lines:
        ret = _require_lib().bpf_tc_attach(ctypes.byref(_tc_hook(ifindex, attach_point)),
                                           ctypes.byref(opts))
    _check_int(ret, f"replacing a tc program on ifindex {ifindex}", lines)
    return opts.handle, opts.priority


class BpfTestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf.h, 1.1)."""

    _fields_ = [("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
                ("data_size_in", c_uint32), ("data_size_out", c_uint32),
                ("ctx_in", c_void_p), ("ctx_out", c_void_p),
                ("ctx_size_in", c_uint32), ("ctx_size_out", c_uint32),
                ("retval", c_uint32), ("repeat", c_int), ("duration", c_uint32),
                ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32)]


if _lib is not None:
    _lib.bpf_prog_test_run_opts.argtypes = [c_int, ctypes.POINTER(BpfTestRunOpts)]
    _lib.bpf_prog_test_run_opts.restype = c_int


def prog_test_run(prog_fd: int, data: bytes, out_size: int = 65536) -> tuple[int, bytes]:
    """BPF_PROG_TEST_RUN once on a packet: (return value, the packet after the program)."""
    buf_in = ctypes.create_string_buffer(data, len(data))
    buf_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts),
                          data_in=ctypes.cast(buf_in, c_void_p),
                          data_out=ctypes.cast(buf_out, c_void_p),
                          data_size_in=len(data), data_size_out=out_size, repeat=1)
    ret = _require_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    _check_int(ret, "BPF_PROG_TEST_RUN")
    return opts.retval, buf_out.raw[:opts.data_size_out]


# --- tracer ring reader (flaky CLI stop): wait for the ring without holding its lock ------------
if _lib is not None:
    _lib.ring_buffer__epoll_fd.argtypes = [c_void_p]
    _lib.ring_buffer__epoll_fd.restype = c_int


def ring_buffer_epoll_fd(ptr: int, what: str = "ring buffer") -> int:
    """``ring_buffer__epoll_fd``: the epoll fd ring_buffer__poll() waits on (libbpf >= 0.3)."""
    if not ptr:
        raise BpfError(f"epoll fd of {what}", errno_mod.EBADF, hint="the reader is closed")
    return _check_int(_require_lib().ring_buffer__epoll_fd(ptr), f"epoll fd of {what}")
