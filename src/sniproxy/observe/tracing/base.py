"""What every tracer shares: loading with a tp_btf -> raw_tp fallback, errors that say what
to do, BPF run-time accounting, a ring-buffer reader thread, start/stop/context manager.

The kernel side of each tracer is one `sni_proxy_trace_*.bpf.o`; the tracer classes in
syscalls.py, network.py and memory.py say which programs to load and how to read the maps.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sniproxy.ebpf.objects import BpfObject, Link, StatsHandle

log = logging.getLogger(__name__)

#: How long the reader thread waits for a wake-up before it drains the ring anyway: the bound
#: on how stale events are before someone reads them (snapshot() drains them itself).
POLL_TIMEOUT_MS = 100
BTF_PATH = "/sys/kernel/btf/vmlinux"
HOOK_TP_BTF, HOOK_RAW_TP = "tp_btf", "raw_tp"


class TracerError(RuntimeError):
    """A tracer could not start or run; str() says what happened, why and what to do."""


class TracerPermissionDenied(TracerError):
    """Missing CAP_BPF / CAP_PERFMON (uprobes: CAP_SYS_ADMIN) or root."""


class TracerUnsupported(TracerError):
    """This kernel lacks a hook the tracer needs (BTF, tracepoint, uprobe PMU)."""


PERMISSION_FIX = ("grant CAP_BPF and CAP_PERFMON (uprobes on another user's process also need "
                  "CAP_SYS_ADMIN or CAP_SYS_PTRACE): `sudo setcap cap_bpf,cap_perfmon+ep "
                  "$(readlink -f $(which python3))`, or run as root")


def translate(exc: BaseException, what: str) -> TracerError:
    """A BpfError/OSError -> the TracerError subclass with the fix in its text."""
    err = getattr(exc, "errno", None)
    if err in (errno.EPERM, errno.EACCES):
        return TracerPermissionDenied(f"{what}: permission denied: {PERMISSION_FIX}. "
                                      f"Detail: {exc}")
    # BpfError.not_supported also knows the kernel-internal ENOTSUPP (524) bpf() leaks.
    if getattr(exc, "not_supported", False) or err in (errno.ENOENT, errno.EOPNOTSUPP,
                                                       errno.ENOSYS, errno.EINVAL):
        return TracerUnsupported(f"{what}: the kernel refused it ({os.strerror(err)}): "
                                 f"the hook may not exist on this kernel; run `sni-proxy check`. "
                                 f"Detail: {exc}")
    return TracerError(f"{what}: {exc}")


@dataclass(frozen=True)
class TracerOverhead:
    """Measured cost of one tracer since start()."""

    name: str
    cpu_percent: float       # (BPF run time + tracer's user-space CPU) / (wall x CPUs)
    bpf_run_time_ns: int     # sum of run_time_ns of the tracer's programs (BPF_ENABLE_STATS)
    bpf_run_count: int       # program runs (hook hits that reached the program)
    user_cpu_ns: int         # thread CPU time of the reader thread and snapshots
    setup_cpu_ns: int        # one-off CPU time of start() (load, verify, attach): not in %
    wall_ns: int
    cpus: int
    map_memory_bytes: int    # memlock of the tracer's maps and programs
    stats_enabled: bool      # False: BPF stats could not be enabled, bpf_* are 0

    @property
    def bpf_ns_per_run(self) -> float:
        return self.bpf_run_time_ns / self.bpf_run_count if self.bpf_run_count else 0.0


def online_cpu_count() -> int:
    from sniproxy.ebpf.objects import online_cpus
    return max(len(online_cpus()), 1)


class BaseTracer:
    """start() loads and attaches, stop() releases every fd; `with tracer:` does both."""

    NAME = "tracer"
    OBJECT = ""
    #: ebpf.layout StructLayout / EnumLayout this tracer reads, checked against OBJECT's BTF
    #: when it is opened (a C change not mirrored in Python fails start() naming it).
    LAYOUTS: tuple = ()
    #: hook kind -> programs to load for it; the first kind that loads wins.
    PROGRAMS: dict[str, tuple[str, ...]] = {}

    def __init__(self) -> None:
        self._obj: BpfObject | None = None
        self._links: list[Link] = []
        self._stats_handle: StatsHandle | None = None
        self._cpu_lock = threading.Lock()
        self._user_cpu_ns = 0
        self._setup_cpu_ns = 0
        self._t0 = 0.0
        self._t_end: float | None = None
        self._final_overhead: TracerOverhead | None = None
        self.hook_mode: str | None = None
        #: Hook kinds to try, in order (default: PROGRAMS' order, tp_btf first). Tests set
        #: ("raw_tp",) to prove the fallback programs on a kernel where tp_btf works.
        self.hook_order: tuple[str, ...] | None = None
        self.program_ids: list[int] = []
        self.map_ids: list[int] = []

    # -- to override -------------------------------------------------------------------------
    def _rodata(self) -> dict[str, Any]:
        return {}

    def _map_sizes(self) -> dict[str, int]:
        return {}

    def _programs_for(self, hook: str) -> tuple[str, ...]:
        return self.PROGRAMS[hook]

    def _attach(self, obj: BpfObject, programs: tuple[str, ...]) -> list[Link]:
        return [obj.program(p).attach() for p in programs]

    def _after_attach(self) -> None:
        pass

    def _before_release(self) -> None:
        pass

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._obj is not None

    def start(self) -> None:
        if self._obj is not None:
            raise TracerError(f"{self.NAME}: start(): already running; stop() it first")
        if not os.path.exists(BTF_PATH):
            raise TracerUnsupported(
                f"{self.NAME}: {BTF_PATH} is missing: the kernel was built without BTF "
                "(CONFIG_DEBUG_INFO_BTF=y), which the CO-RE tracer programs need")
        t_cpu = time.thread_time_ns()
        from sniproxy.ebpf import objects
        if not objects.object_path(self.OBJECT).is_file():
            raise TracerError(f"{objects.object_path(self.OBJECT)} is not built: run `make bpf` "
                              "(needs clang, libbpf-dev and bpftool)")
        try:
            self._load_and_attach(objects)
            try:
                self._stats_handle = objects.enable_bpf_stats()
            except objects.BpfError as exc:
                log.warning("%s: BPF run-time statistics unavailable (%s): get_overhead() "
                            "will not include the BPF programs' time", self.NAME, exc)
            self._after_attach()
        except BaseException:
            self._release()
            raise
        self._t0 = time.monotonic()
        self._t_end = None
        self._final_overhead = None
        with self._cpu_lock:
            self._user_cpu_ns = 0
            self._setup_cpu_ns = time.thread_time_ns() - t_cpu
        log.info("%s started (%s hooks)", self.NAME, self.hook_mode)

    def _load_and_attach(self, objects: Any) -> None:
        errors: list[str] = []
        hooks = list(self.hook_order or self.PROGRAMS)
        for i, hook in enumerate(hooks):
            wanted = self._programs_for(hook)
            every = set(getattr(self, "ALL_PROGRAMS", ())) | {
                p for progs in self.PROGRAMS.values() for p in progs}
            obj = objects.BpfObject(self.OBJECT, rodata=self._rodata(),
                                    map_sizes=self._map_sizes(),
                                    autoload={p: p in wanted for p in every},
                                    layouts=self.LAYOUTS)
            try:
                obj.load()
                links = self._attach(obj, wanted)
            except objects.BpfError as exc:
                obj.close()
                if exc.errno in (errno.EPERM, errno.EACCES) or i == len(hooks) - 1:
                    if errors:
                        log.info("%s: %s", self.NAME, "; ".join(errors))
                    raise translate(exc, f"{self.NAME}: loading and attaching {self.OBJECT} "
                                         f"({hook} hooks)") from exc
                errors.append(f"{hook} hooks failed ({exc.errno}: {exc.what}), "
                              f"trying {hooks[i + 1]}")
                continue
            self._obj, self._links, self.hook_mode = obj, links, hook
            self.program_ids = [obj.program(p).id for p in wanted]
            self.map_ids = [m.id for m in obj.maps.values()]
            if errors:
                log.warning("%s: %s", self.NAME, "; ".join(errors))
            return

    def stop(self) -> None:
        """Detach, keep a final overhead figure, release every fd. Idempotent."""
        if self._obj is None:
            return
        for link in self._links:
            link.close()
        self._links.clear()
        self._t_end = time.monotonic()
        try:
            self._before_release()
            self._final_overhead = self._overhead()
        finally:
            self._release()

    def _release(self) -> None:
        from sniproxy.ebpf.objects import release_attached
        release_attached(self._links, self._stats_handle, self._obj)
        self._stats_handle = self._obj = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accounting --------------------------------------------------------------------------
    def _add_cpu(self, ns: int) -> None:
        with self._cpu_lock:
            self._user_cpu_ns += ns

    def elapsed_s(self) -> float:
        if not self._t0:
            return 0.0
        return (self._t_end or time.monotonic()) - self._t0

    def _require_obj(self, what: str) -> BpfObject:
        if self._obj is None:
            raise TracerError(f"{self.NAME}: {what}: not running: call start() first")
        return self._obj

    def _stat_counters(self, map_name: str, names: tuple[str, ...]) -> dict[str, int]:
        m = self._require_obj("stats").map(map_name)
        return {name: m.percpu_sum(i) for i, name in enumerate(names)}

    def get_overhead(self) -> TracerOverhead:
        """BPF run time of this tracer's programs (bpf_stats) plus its user-space CPU time."""
        if self._obj is None:
            if self._final_overhead is None:
                raise TracerError(f"{self.NAME}: get_overhead(): never started")
            return self._final_overhead
        return self._overhead()

    def _overhead(self) -> TracerOverhead:
        obj = self._require_obj("get_overhead()")
        run_ns = runs = 0
        mem = 0
        for prog in obj.programs.values():
            info = prog.info()
            run_ns += info["run_time_ns"]
            runs += info["run_cnt"]
            mem += info.get("memlock_bytes", 0)
        for m in obj.maps.values():
            mem += m.info().get("memlock_bytes", 0)
        wall_ns = max(int(self.elapsed_s() * 1e9), 1)
        cpus = online_cpu_count()
        with self._cpu_lock:
            user_ns, setup_ns = self._user_cpu_ns, self._setup_cpu_ns
        return TracerOverhead(
            name=self.NAME, cpu_percent=100.0 * (run_ns + user_ns) / (wall_ns * cpus),
            bpf_run_time_ns=run_ns, bpf_run_count=runs, user_cpu_ns=user_ns,
            setup_cpu_ns=setup_ns, wall_ns=wall_ns,
            cpus=cpus, map_memory_bytes=mem, stats_enabled=self._stats_handle is not None)


def overhead_report(profiler: Any = None, tracers: tuple[BaseTracer, ...] = ()) -> dict:
    """One overhead figure for the profiler and every running tracer: each part's BPF run time
    and user-space CPU, and the total CPU % (the seed's 1 % alarm applies to it)."""
    parts: list[dict] = []
    if profiler is not None and profiler.running:
        ov = profiler.get_overhead()
        parts.append({"name": "cpu profiler", "cpu_percent": ov.sampling_cpu_percent,
                      "bpf_run_time_ns": ov.bpf_run_time_ns, "user_cpu_ns": ov.user_cpu_ns,
                      "memory_bytes": ov.memory_bytes})
    for tracer in tracers:
        if tracer.running:
            ov = tracer.get_overhead()
            parts.append({"name": ov.name, "cpu_percent": ov.cpu_percent,
                          "bpf_run_time_ns": ov.bpf_run_time_ns, "user_cpu_ns": ov.user_cpu_ns,
                          "memory_bytes": ov.map_memory_bytes})
    return {"parts": parts, "cpu_percent": sum(p["cpu_percent"] for p in parts),
            "memory_bytes": sum(p["memory_bytes"] for p in parts)}


class RingReader:
    """A thread draining one ring buffer into a bounded deque (and an optional callback).

    The reader drains the ring every POLL_TIMEOUT_MS, or sooner when the BPF side wakes it
    (ring a quarter full): events are at most that late in a snapshot taken without flush()
    (snapshot() flushes).

    It waits in poll() on libbpf's epoll fd and a wake-up pipe without holding the lock that
    serializes consume() calls: with ring_buffer__poll() under that lock (100 ms at a time)
    flush() from another thread queued behind it, and as the reader took the lock again a
    few microseconds after releasing it, a waiting thread woken by the release usually found
    it taken already; on a loaded machine a snapshot waited seconds, and `trace` commands
    were that late to print and to stop after Ctrl-C.

    At the bound the oldest events are dropped and counted (`dropped`), so a snapshot never
    grows without limit; events the kernel could not even queue are the BPF side's
    ring-full counter.
    """

    def __init__(self, tracer: BaseTracer, map_name: str, decode: Callable[[bytes], Any],
                 max_events: int, on_event: Callable[[Any], None] | None = None) -> None:
        from sniproxy.ebpf.objects import RingBuffer
        obj = tracer._require_obj("ring buffer")
        self._tracer = tracer
        self._decode = decode
        self._on_event = on_event
        self.events: deque = deque(maxlen=max_events)
        self.dropped = 0
        self.received = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        # libbpf's ring_buffer is not thread-safe: the reader's and flush()'s consume() take
        # turns; held only while records are handled, never while waiting for them.
        self._rb_lock = threading.Lock()
        self._stop = threading.Event()
        self._rb: RingBuffer = RingBuffer(obj.map(map_name).fd, self._handle,
                                          what=f"{tracer.NAME} events ({map_name})")
        self._poller = select.poll()
        self._poller.register(self._rb.epoll_fd(), select.POLLIN)
        # close() writes a byte here so the reader ends now, not at its next timeout.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._wake_r, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name=f"sni-proxy-{tracer.NAME}",
                                        daemon=True)
        self._thread.start()

    def _handle(self, data: bytes) -> None:
        # Raw bytes are kept; decoding (~10 us in Python) happens in take(), for the events
        # someone reads, not on the reader thread for every event.
        with self._lock:
            self.received += 1
            if len(self.events) == self.events.maxlen:
                self.dropped += 1
            self.events.append(data)
            self._arrived.notify_all()
        if self._on_event is not None:
            self._on_event(self._decode(data))

    def _run(self) -> None:
        t = time.thread_time_ns()
        try:
            while not self._stop.is_set():
                # The BPF side wakes us only when the ring fills up (a quarter): after a quiet
                # wait, take what was queued without a wake-up all the same.
                self._poller.poll(POLL_TIMEOUT_MS)
                with self._rb_lock:
                    self._rb.consume()
                now = time.thread_time_ns()
                self._tracer._add_cpu(now - t)
                t = now
        except Exception as exc:  # noqa: BLE001 - logged: the tracer's snapshot says no more
            log.error("%s: ring buffer reader stopped: %s", self._tracer.NAME, exc)

    def flush(self) -> None:
        """Handle what the kernel has queued so far (from the caller's thread)."""
        t = time.thread_time_ns()
        with self._rb_lock:
            self._rb.consume()
        self._tracer._add_cpu(time.thread_time_ns() - t)

    def wait_new(self, seen: int, timeout_s: float) -> None:
        """Block until more than `seen` events have been received, or timeout_s."""
        with self._arrived:
            self._arrived.wait_for(lambda: self.received > seen, timeout=timeout_s)

    def take(self, clear: bool) -> tuple[list, int]:
        with self._lock:
            raw = list(self.events)
            if clear:
                self.events.clear()
            dropped = self.dropped
        return [self._decode(data) for data in raw], dropped

    def close(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass        # full (a wake-up is pending) or closed already (second close())
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._rb_lock:
            self._rb.consume()
            self._rb.close()
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
