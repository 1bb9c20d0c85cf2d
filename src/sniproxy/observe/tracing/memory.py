"""EbpfMemoryTracer: outstanding allocations by call stack (bcc memleak).

User mode (one process): uprobes on its libc's malloc, calloc, realloc, posix_memalign,
aligned_alloc, free, mmap and munmap. Kernel mode: kmem:kmalloc / kmem:kfree (tp_btf, raw_tp
fallback). snapshot() groups what is still allocated by stack and symbolizes with the
profiler's Symbolizer::

    with EbpfMemoryTracer(pid=1234) as t:
        time.sleep(10)
        for s in t.snapshot(min_age_s=5, top=10).stacks:
            print(s.bytes, s.count, [f.label for f in s.frames])

CPython's pymalloc serves requests up to 512 bytes from its own arenas: run a Python process
with PYTHONMALLOC=malloc to see its small allocations.
"""
from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass

from ..symbolize import Frame, Symbolizer
from sniproxy.ebpf.layout import EnumLayout, StructLayout

from .base import BaseTracer, TracerError

OBJECT = "sni_proxy_trace_memory"
MAP_ALLOCS, MAP_STACKS, MAP_STATS = "sni_proxy_mmal", "sni_proxy_mmstk", "sni_proxy_mmsta"
# What Python reads of the object, checked against its BTF at open (ebpf/layout.py).
#: Slots of sni_proxy_mmsta (enum mem_stat); "stacks_lost" is C's STACK_LOST.
STATS_LAYOUT = EnumLayout("mem_stat", "MEM_STAT_",
                          ("allocs_full", "stacks_lost", "pending_lost", "allocs", "frees"),
                          end="MEM_STAT_MAX",
                          c_names=("allocs_full", "stack_lost", "pending_lost", "allocs", "frees"))
STAT_NAMES = STATS_LAYOUT.names
ALLOC_LAYOUT = StructLayout("mem_alloc", (
    ("size", "Q"), ("ts_ns", "Q"), ("stack_id", "i"), ("tgid", "I")))
LAYOUTS = (STATS_LAYOUT, ALLOC_LAYOUT)
_ALLOC = ALLOC_LAYOUT.struct
PERF_MAX_STACK_DEPTH = 127
_STACK = struct.Struct(f"={PERF_MAX_STACK_DEPTH}Q")

#: (entry program, return program or None, libc function)
USER_PROBES = (
    ("sni_proxy_mmmal", "sni_proxy_mmmar", "malloc"),
    ("sni_proxy_mmcal", "sni_proxy_mmcar", "calloc"),
    ("sni_proxy_mmrea", "sni_proxy_mmrer", "realloc"),
    ("sni_proxy_mmpma", "sni_proxy_mmpmr", "posix_memalign"),
    ("sni_proxy_mmala", "sni_proxy_mmalr", "aligned_alloc"),
    ("sni_proxy_mmfre", None, "free"),
    ("sni_proxy_mmmap", "sni_proxy_mmmpr", "mmap"),
    ("sni_proxy_mmunm", None, "munmap"),
)
_USER_PROGRAMS = tuple(p for e, r, _ in USER_PROBES for p in (e, r) if p)
_KERNEL_PROGRAMS = {"tp_btf": ("sni_proxy_mmkmb", "sni_proxy_mmkfb"),
                    "raw_tp": ("sni_proxy_mmkmr", "sni_proxy_mmkfr")}

DEFAULT_MAX_ALLOCS = 1 << 17
MAX_ALLOCS_LIMIT = 1 << 22
DEFAULT_STACKS = 8192   # stack traces kept (1 KiB each, preallocated)
_LIBC_RE = re.compile(r"/libc(\.so\.\d+|-[\d.]+\.so)$")


def _without_tracer_frames(frames: list[Frame]) -> list[Frame]:
    """A kernel stack taken in a tracepoint program starts with the program and the
    tracepoint glue (bpf_trace_run*): the allocation site is what comes after them."""
    i = 0
    while i < len(frames) and (frames[i].module == "[bpf]" or
                               (frames[i].name or "").startswith(("bpf_trace_run", "__bpf_trace"))):
        i += 1
    return frames[i:]


def find_libc(pid: int) -> str:
    """Path of the C library mapped by `pid`, as that process sees it."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TracerError(f"memory tracer: cannot read /proc/{pid}/maps ({exc.strerror}): is "
                          f"pid {pid} alive and are we allowed to trace it (CAP_SYS_PTRACE)?"
                          ) from None
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and _LIBC_RE.search(fields[5]):
            path = fields[5]
            # The process may live in another mount namespace: its root first.
            for candidate in (path, f"/proc/{pid}/root{path}"):
                if os.path.exists(candidate):
                    return candidate
    raise TracerError(f"memory tracer: pid {pid} maps no libc.so (static binary or musl?): "
                      "user-mode tracing hooks glibc's allocator; use --kernel for kmalloc")


@dataclass(frozen=True)
class AllocStack:
    stack_id: int
    pid: int
    bytes: int
    count: int
    frames: tuple[Frame, ...]    # leaf first

    def labels(self) -> list[str]:
        return [f.label for f in self.frames]


@dataclass(frozen=True)
class MemorySnapshot:
    stacks: list[AllocStack]     # largest outstanding first (top N when asked)
    total_bytes: int             # all outstanding tracked (older than min_age_s)
    total_count: int
    stats: dict[str, int]
    elapsed_s: float
    sample_every: int


class EbpfMemoryTracer(BaseTracer):
    NAME = "memory tracer"
    OBJECT = OBJECT
    LAYOUTS = LAYOUTS

    def __init__(self, *, pid: int | None = None, kernel: bool = False, sample_every: int = 1,
                 min_size: int = 0, max_allocs: int = DEFAULT_MAX_ALLOCS,
                 libc: str | None = None, symbolizer: Symbolizer | None = None) -> None:
        super().__init__()
        if not kernel and not pid:
            raise TracerError("memory tracer: user-mode tracing needs a pid (memleak -p PID); "
                              "use kernel=True (--kernel) for kernel allocations")
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise TracerError(f"memory tracer: pid {pid!r}: a pid is a positive integer")
        if not isinstance(sample_every, int) or sample_every < 1:
            raise TracerError(f"memory tracer: sample rate {sample_every!r}: 1 (every "
                              "allocation) or more (1 in N)")
        if not 0 < max_allocs <= MAX_ALLOCS_LIMIT:
            raise TracerError(f"memory tracer: max_allocs {max_allocs}: 1..{MAX_ALLOCS_LIMIT}")
        self.pid = pid
        self.kernel = kernel
        self.sample_every = sample_every
        self.min_size = min_size
        self.max_allocs = max_allocs
        self.libc = libc
        self.symbolizer = symbolizer or Symbolizer()
        self._final: MemorySnapshot | None = None
        self.PROGRAMS = dict(_KERNEL_PROGRAMS) if kernel else {"uprobe": _USER_PROGRAMS}
        self.ALL_PROGRAMS = _USER_PROGRAMS + tuple(p for v in _KERNEL_PROGRAMS.values()
                                                   for p in v)

    def start(self) -> None:
        if not self.kernel:
            self.libc = self.libc or find_libc(self.pid)
            self.symbolizer.snapshot_process(self.pid)
        super().start()

    def _rodata(self) -> dict:
        return {"filter_tgid": (self.pid or 0) if self.kernel else 0,
                "sample_every": self.sample_every, "min_size": self.min_size}

    def _map_sizes(self) -> dict:
        return {MAP_ALLOCS: self.max_allocs, MAP_STACKS: DEFAULT_STACKS}

    def _attach(self, obj, programs):
        if self.kernel:
            return super()._attach(obj, programs)
        links = []
        # pid-scoped uprobes: other processes mapping the same libc never hit them.
        for entry, ret, func in USER_PROBES:
            links.append(obj.program(entry).attach_uprobe_func(self.pid, self.libc, func))
            if ret:
                links.append(obj.program(ret).attach_uprobe_func(self.pid, self.libc, func,
                                                                 retprobe=True))
        return links

    def _before_release(self) -> None:
        self._final = self.snapshot()

    def stats(self) -> dict[str, int]:
        return self._stat_counters(MAP_STATS, STAT_NAMES)

    def snapshot(self, min_age_s: float = 0.0, top: int | None = None) -> MemorySnapshot:
        """Outstanding allocations older than min_age_s, grouped by stack, largest first."""
        if self._obj is None and self._final is not None:
            return self._final
        obj = self._require_obj("snapshot()")
        t = time.thread_time_ns()
        try:
            now = time.monotonic_ns()   # bpf_ktime_get_ns() is CLOCK_MONOTONIC
            cutoff = now - int(min_age_s * 1e9)
            groups: dict[tuple[int, int], list[int]] = {}
            total = count = 0
            for _, raw in obj.map(MAP_ALLOCS).lookup_batch():
                size, ts, stack_id, tgid = _ALLOC.unpack(raw)
                if ts > cutoff:
                    continue
                g = groups.setdefault((tgid, stack_id), [0, 0])
                g[0] += size
                g[1] += 1
                total += size
                count += 1
            ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
            if top is not None:
                ranked = ranked[:top]
            if not self.kernel and self.pid:
                self.symbolizer.refresh_process(self.pid)
            stack_map = obj.map(MAP_STACKS)
            stacks = []
            for (tgid, stack_id), (nbytes, n) in ranked:
                ips: list[int] = []
                if stack_id >= 0:
                    raw = stack_map.lookup(stack_id)
                    if raw:
                        values = _STACK.unpack(raw)
                        ips = list(values[:values.index(0)] if 0 in values else values)
                if self.kernel:
                    frames = tuple(_without_tracer_frames(self.symbolizer.kernel_frames(ips)))
                else:
                    frames = tuple(self.symbolizer.user_frames(tgid, ips))
                stacks.append(AllocStack(stack_id=stack_id, pid=tgid, bytes=nbytes, count=n,
                                         frames=frames))
            return MemorySnapshot(stacks=stacks, total_bytes=total, total_count=count,
                                  stats=self.stats(), elapsed_s=self.elapsed_s(),
                                  sample_every=self.sample_every)
        finally:
            self._add_cpu(time.thread_time_ns() - t)
