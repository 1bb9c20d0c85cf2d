"""EbpfCpuProfiler: sampled CPU profiles of the whole system, some processes or a cgroup.

One software cpu-clock perf event per online CPU fires `sample_rate_hz` times a second; the BPF
program `sni_proxy_prof` (bpf/sni_proxy_profile.bpf.c) counts each sample under its process,
thread, comm and kernel + user stack ids. snapshot() reads the maps and symbolizes in user space.

    with EbpfCpuProfiler(create_recommended_config("production")) as profiler:
        time.sleep(30)
        profile = profiler.snapshot()
    print(profile.top_functions(10), profiler.get_overhead())

start() raises a ProfilerError subclass saying what to do (PermissionDenied, KernelTooOld,
BtfMissing, PerfEventsUnavailable), so a caller can fall back as the seed's error section shows.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sniproxy.ebpf.layout import EnumLayout, StructLayout

from .config import AllProcesses, Cgroup, CurrentProcess, ProfilerConfig, Pids, cgroup_id_of
from .symbolize import Frame, Symbolizer

if TYPE_CHECKING:
    from sniproxy.ebpf.objects import BpfObject, Link, StatsHandle

log = logging.getLogger(__name__)

OBJECT_NAME = "sni_proxy_profile"
PROGRAM = "sni_proxy_prof"
MAP_STACKS, MAP_COUNTS, MAP_TGIDS, MAP_SEEN, MAP_STATS = (
    "sni_proxy_pstk", "sni_proxy_pcnt", "sni_proxy_ptgid", "sni_proxy_pseen", "sni_proxy_pstat")
FILTER_NONE, FILTER_TGIDS, FILTER_CGROUP = 0, 1, 2

#: struct sample_key in the BPF program (checked against its BTF at load, ebpf/layout.py).
KEY_LAYOUT = StructLayout("sample_key", (
    ("tgid", "I"), ("tid", "I"), ("kernel_stack_id", "i"), ("user_stack_id", "i"),
    ("comm", "16s")))
_KEY = KEY_LAYOUT.struct
PERF_MAX_STACK_DEPTH = 127
_STACK = struct.Struct(f"={PERF_MAX_STACK_DEPTH}Q")
#: Slots of sni_proxy_pstat: enum sni_proxy_pstat_slot in the BPF file, in value order.
STATS_LAYOUT = EnumLayout("sni_proxy_pstat_slot", "STAT_", (
    "samples", "dropped", "kernel_stack_collisions", "user_stack_collisions", "user_only",
    "kernel_only", "kernel_stack_errors", "user_stack_errors"), end="STAT_MAX")
STAT_NAMES = STATS_LAYOUT.names
LAYOUTS = (KEY_LAYOUT, STATS_LAYOUT)

#: Minimum kernel: CAP_BPF/CAP_PERFMON and BPF_ENABLE_STATS arrived in 5.8 (the seed's minimum).
MIN_KERNEL = (5, 8)
BTF_PATH = "/sys/kernel/btf/vmlinux"
#: The seed's alert thresholds.
CPU_WARN_PERCENT = 1.0
MEMORY_WARN_BYTES = 50 * 1024 * 1024
#: How often new processes' /proc/PID/maps are snapshotted (a process living less than this
#: after its first sample may show `[unknown]` user frames).
MAPS_POLL_INTERVAL_S = 0.5
_WARN_EVERY_S = 60.0

#: Stack map sizing. The map is direct-mapped (no chaining): two different stacks hashing to
#: one bucket is a collision (-EEXIST) and the second stack is lost, so buckets must outnumber
#: distinct stacks; but each entry is preallocated at 127 frames (~1 KiB). One bucket per
#: max_samples entry, bounded so the default profile stays well under the seed's 50 MB alarm.
MIN_STACK_ENTRIES = 1024
MAX_STACK_ENTRIES = 65536


def stack_map_entries(max_samples: int) -> int:
    """STACK_TRACE map size for a max_samples budget: next power of two, bounded."""
    n = 1 << max(0, (max_samples - 1).bit_length())
    return max(MIN_STACK_ENTRIES, min(MAX_STACK_ENTRIES, n))


# -- errors -------------------------------------------------------------------------------
class ProfilerError(RuntimeError):
    """The profiler could not start or run; str() says what happened, why and what to do."""


class PermissionDenied(ProfilerError):
    """Missing CAP_BPF / CAP_PERFMON (or root)."""


class KernelTooOld(ProfilerError):
    """The kernel predates what the profiler uses (5.8)."""


class BtfMissing(ProfilerError):
    """No kernel BTF: the CO-RE program cannot be relocated."""


class PerfEventsUnavailable(ProfilerError):
    """The kernel has no usable cpu-clock perf events (CONFIG_PERF_EVENTS, containers)."""


# -- results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileStats:
    """Kernel-side counters: every sample taken ends in exactly one recorded/dropped bucket."""

    samples: int = 0                  # samples of wanted tasks taken by the BPF program
    dropped: int = 0                  # not recorded: max_samples distinct entries reached
    kernel_stack_collisions: int = 0  # kernel stack lost to a stack-map hash collision
    user_stack_collisions: int = 0
    user_only: int = 0                # sampled in user mode: no kernel stack (normal)
    kernel_only: int = 0              # no user stack: kernel thread (normal)
    kernel_stack_errors: int = 0      # other stack errors (lost stacks)
    user_stack_errors: int = 0

    @property
    def collisions(self) -> int:
        return self.kernel_stack_collisions + self.user_stack_collisions

    @property
    def lost(self) -> int:
        """Stacks lost (the samples still count, under a `[lost ...]` frame)."""
        return self.collisions + self.kernel_stack_errors + self.user_stack_errors


@dataclass(frozen=True)
class Sample:
    """Samples of one (process, thread, comm, kernel stack, user stack)."""

    tgid: int
    tid: int
    comm: str
    count: int
    user_frames: tuple[Frame, ...]     # leaf first, as captured
    kernel_frames: tuple[Frame, ...]   # leaf first
    kernel_stack_error: int = 0        # errno from bpf_get_stackid, 0 when captured
    user_stack_error: int = 0

    def stack(self) -> tuple[Frame, ...]:
        """Root first: user frames, then kernel frames; a lost stack is a `[lost ...]` frame."""
        out: list[Frame] = []
        if self.user_stack_error not in (0, errno.EFAULT):
            out.append(_lost("user", self.user_stack_error))
        out.extend(reversed(self.user_frames))
        if self.kernel_stack_error not in (0, errno.EFAULT):
            out.append(_lost("kernel", self.kernel_stack_error))
        out.extend(reversed(self.kernel_frames))
        return tuple(out)


def _lost(kind: str, err: int) -> Frame:
    why = "stack map collision" if err == errno.EEXIST else os.strerror(err).lower()
    return Frame(f"[lost {kind} stack: {why}]", "", 0, 0, kind == "kernel")


@dataclass(frozen=True)
class FunctionStat:
    name: str
    module: str
    self_samples: int    # samples with this function as the leaf
    total_samples: int   # samples with this function anywhere on the stack (once per sample)


@dataclass
class Profile:
    """A symbolized CPU profile."""

    samples: list[Sample]
    stats: ProfileStats
    sample_rate_hz: int
    start_time_ns: int        # wall clock (epoch) when sampling started
    duration_ns: int
    cpus: int
    target: str
    tgids: frozenset[int] = field(default_factory=frozenset)

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.samples)

    def samples_of(self, tgid: int) -> int:
        return sum(s.count for s in self.samples if s.tgid == tgid)

    def top_functions(self, n: int = 10, tgid: int | None = None) -> list[FunctionStat]:
        """Hottest functions by self samples (ties: by total)."""
        self_count: dict[tuple[str, str], int] = {}
        total_count: dict[tuple[str, str], int] = {}
        for s in self.samples:
            if tgid is not None and s.tgid != tgid:
                continue
            stack = s.stack()
            if not stack:
                continue
            leaf = (stack[-1].label, stack[-1].module)
            self_count[leaf] = self_count.get(leaf, 0) + s.count
            for key in {(f.label, f.module) for f in stack}:
                total_count[key] = total_count.get(key, 0) + s.count
        ranked = sorted(total_count, key=lambda k: (-self_count.get(k, 0), -total_count[k], k))
        return [FunctionStat(k[0], k[1], self_count.get(k, 0), total_count[k]) for k in ranked[:n]]

    def function_share(self, name: str, tgid: int | None = None) -> float:
        """Fraction of samples (of `tgid`) whose stack contains `name`."""
        hits = total = 0
        for s in self.samples:
            if tgid is not None and s.tgid != tgid:
                continue
            total += s.count
            if any(f.name == name for f in s.stack()):
                hits += s.count
        return hits / total if total else 0.0


@dataclass(frozen=True)
class Overhead:
    """Measured cost of the profiler since start()."""

    cpu_percent: float        # (BPF run time + profiler's own CPU) / (wall x CPUs)
    memory_bytes: int         # BPF maps and program + symbol caches
    bpf_run_time_ns: int      # from BPF_ENABLE_STATS (run_time_ns of sni_proxy_prof)
    bpf_run_count: int
    user_cpu_ns: int          # thread CPU time of start, maps polling, stats and snapshots
    symbolize_cpu_ns: int     # the part of user_cpu_ns spent in snapshot() (symbolization)
    setup_cpu_ns: int         # the part of user_cpu_ns spent in start() (load, attach)
    wall_ns: int
    cpus: int
    map_memory_bytes: int
    symbol_cache_bytes: int

    @property
    def sampling_cpu_percent(self) -> float:
        """Steady-state cost: cpu_percent without the one-off work of start() and
        snapshot() (loading, symbolization); what a long profile converges to."""
        ns = self.bpf_run_time_ns + self.user_cpu_ns - self.symbolize_cpu_ns - self.setup_cpu_ns
        return 100.0 * ns / (self.wall_ns * self.cpus)

    @property
    def bpf_ns_per_sample(self) -> float:
        return self.bpf_run_time_ns / self.bpf_run_count if self.bpf_run_count else 0.0

    @property
    def over_threshold(self) -> bool:
        """The seed's alarm: above 1 % CPU (steady state) or 50 MB."""
        return (self.sampling_cpu_percent > CPU_WARN_PERCENT
                or self.memory_bytes > MEMORY_WARN_BYTES)


# -- checks -------------------------------------------------------------------------------
def check_profiler_support() -> None:
    """Raise the ProfilerError subclass for the first missing requirement.

    Reads the process's one support report (`ebpf.support.check_system_support()`, measured
    once and cached), the same facts `sni-proxy check` prints and start-up decides on.
    """
    from sniproxy.ebpf.support import check_system_support
    report = check_system_support()
    if report.kernel_version < MIN_KERNEL:
        raise KernelTooOld(
            f"kernel {report.kernel} is too old for the eBPF profiler: needs Linux >= "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]} (CAP_BPF, BPF statistics); 5.15+ recommended. "
            "Check with `uname -r` and upgrade the kernel")
    if not report.btf:
        raise BtfMissing(
            f"{BTF_PATH} is missing: the kernel was built without BTF (CONFIG_DEBUG_INFO_BTF=y), "
            "which the CO-RE profiler program needs; use a kernel with BTF (most distribution "
            "kernels since 5.8 have it)")
    if not os.path.exists("/proc/sys/kernel/perf_event_paranoid"):
        raise PerfEventsUnavailable(
            "perf events are not available (no /proc/sys/kernel/perf_event_paranoid): the "
            "kernel lacks CONFIG_PERF_EVENTS or this container hides it; run on the host")


def _translate(exc: Exception, what: str) -> ProfilerError:
    err = getattr(exc, "errno", None)
    if err in (errno.EPERM, errno.EACCES):
        return PermissionDenied(
            f"{what}: permission denied: the profiler needs CAP_BPF and CAP_PERFMON (or root). "
            "Grant them with `sudo setcap cap_bpf,cap_perfmon+ep <binary>` (check with getcap) "
            f"or run as root. Detail: {exc}")
    if err in (errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP, errno.ENOSYS) and "perf" in what:
        return PerfEventsUnavailable(
            f"{what}: the kernel refused a software cpu-clock perf event: perf events are "
            "unavailable here (kernel without CONFIG_PERF_EVENTS, or a container/VM that hides "
            f"them); run on the host. Detail: {exc}")
    if isinstance(exc, FileNotFoundError) or err == errno.ENOENT:
        return ProfilerError(f"{what}: {exc}")
    return ProfilerError(f"{what}: {exc}")


# -- the profiler -------------------------------------------------------------------------
class EbpfCpuProfiler:
    """Sampling CPU profiler; context manager (start on enter, stop on exit)."""

    def __init__(self, config: ProfilerConfig | None = None, *, include_idle: bool = False,
                 maps_poll_interval_s: float = MAPS_POLL_INTERVAL_S,
                 symbolizer: Symbolizer | None = None):
        self.config = config or ProfilerConfig()
        self.include_idle = include_idle
        self._poll_interval = maps_poll_interval_s
        self.symbolizer = symbolizer or Symbolizer()
        self._sym_lock = threading.Lock()
        self._obj: BpfObject | None = None
        self._links: list[Link] = []
        self._stats_handle: StatsHandle | None = None
        self._poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._cpus: list[int] = []
        self._t0 = 0.0
        self._t_end: float | None = None
        self._wall0_ns = 0
        self._user_cpu_ns = 0
        self._symbolize_cpu_ns = 0
        self._setup_cpu_ns = 0
        self._cpu_lock = threading.Lock()
        self._final: Profile | None = None
        self._drained_at_ns = 0
        self._drained_stats = ProfileStats()
        self._final_overhead: Overhead | None = None
        self._last_warn = 0.0
        self._target_desc = self.config.target.describe()

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._obj is not None

    def start(self) -> None:
        """Validate, load, attach to every online CPU. Raises ConfigValidationError or a
        ProfilerError subclass; on failure nothing stays open."""
        if self._obj is not None:
            raise ProfilerError("start(): the profiler is already running; stop() it first")
        config = self.config
        config.validate()
        if not config.enable_cpu_profiling:
            raise ProfilerError("start(): enable_cpu_profiling is False in the config: enable it "
                                "with config.with_cpu_profiling(True)")
        check_profiler_support()
        t_cpu = time.thread_time_ns()
        try:
            from sniproxy.ebpf import objects
        except ImportError as exc:   # pragma: no cover - packaging problem
            raise ProfilerError(f"cannot import the BPF loader: {exc}") from exc
        if not objects.object_path(OBJECT_NAME).is_file():
            raise ProfilerError(
                f"{objects.object_path(OBJECT_NAME)} is not built: run `make bpf` "
                "(needs clang, libbpf-dev and bpftool)")
        filter_mode, cgroup_id, tgids = FILTER_NONE, 0, ()
        target = config.target
        if isinstance(target, CurrentProcess):
            filter_mode, tgids = FILTER_TGIDS, (os.getpid(),)
            self._target_desc = f"current process (pid {os.getpid()})"
        elif isinstance(target, Pids):
            filter_mode, tgids = FILTER_TGIDS, tuple(sorted(set(target.pids)))
        elif isinstance(target, Cgroup):
            filter_mode, cgroup_id = FILTER_CGROUP, cgroup_id_of(target.path)
        else:
            assert isinstance(target, AllProcesses)

        obj = objects.BpfObject(
            OBJECT_NAME,
            rodata={"filter_mode": filter_mode, "filter_cgroup_id": cgroup_id,
                    "include_idle": int(self.include_idle)},
            map_sizes={MAP_COUNTS: config.max_samples,
                       MAP_STACKS: stack_map_entries(config.max_samples)},
            layouts=LAYOUTS,
        )
        try:
            try:
                obj.load()
            except objects.BpfError as exc:
                raise _translate(exc, "loading the profiler's BPF program") from exc
            self._obj = obj
            for tgid in tgids:
                obj.map(MAP_TGIDS).update(tgid, 1)
                with self._sym_lock:
                    self.symbolizer.snapshot_process(tgid)
            try:
                self._stats_handle = objects.enable_bpf_stats()
            except objects.BpfError as exc:
                log.warning("BPF run-time statistics unavailable (%s): get_overhead() will not "
                            "include the BPF program's time", exc)
            program = obj.program(PROGRAM)
            self._cpus = objects.online_cpus()
            for cpu in self._cpus:
                try:
                    fd = objects.perf_event_open_cpu_clock(cpu, config.sample_rate_hz)
                except objects.BpfError as exc:
                    raise _translate(exc, f"opening the cpu-clock perf event on CPU {cpu}") from exc
                try:
                    self._links.append(program.attach_perf_event(fd))
                except objects.BpfError as exc:
                    raise _translate(exc, f"attaching {PROGRAM} to CPU {cpu}") from exc
        except BaseException:
            self._release()
            raise
        self._t0 = time.monotonic()
        self._t_end = None
        self._wall0_ns = time.time_ns()
        self._final = self._final_overhead = None
        self._drained_at_ns, self._drained_stats = 0, ProfileStats()
        with self._cpu_lock:
            self._user_cpu_ns = self._symbolize_cpu_ns = 0
        self._stop_polling.clear()
        self._poller = threading.Thread(target=self._poll_new_processes,
                                        name="sni-proxy-profiler-maps", daemon=True)
        self._poller.start()
        setup_ns = time.thread_time_ns() - t_cpu
        self._add_cpu(setup_ns)
        with self._cpu_lock:
            self._setup_cpu_ns = setup_ns
        log.info("eBPF CPU profiling started: sample rate %d Hz on %d CPUs, target %s, "
                 "max_samples %d", config.sample_rate_hz, len(self._cpus), self._target_desc,
                 config.max_samples)

    def stop(self) -> Profile | None:
        """Detach, take the final snapshot, release every fd. Returns the final profile."""
        if self._obj is None:
            return self._final
        for link in self._links:       # stop sampling first: the snapshot is then final
            link.close()
        self._links.clear()
        self._t_end = time.monotonic()
        try:
            # After drain()s, the last profile is one more interval (its own stats and times).
            self._final = self._read(drain=self._drained_at_ns != 0)
            # The final snapshot's one-off symbolization is in here: no alarm for it.
            self._final_overhead = self._overhead(warn=False)
        finally:
            self._release()
        return self._final

    def _release(self) -> None:
        self._stop_polling.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(timeout=5)
        self._poller = None
        from sniproxy.ebpf.objects import release_attached
        release_attached(self._links, self._stats_handle, self._obj)
        self._stats_handle = self._obj = None

    def __enter__(self) -> EbpfCpuProfiler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- data -------------------------------------------------------------------------------
    def _add_cpu(self, ns: int, symbolize: bool = False) -> None:
        with self._cpu_lock:
            self._user_cpu_ns += ns
            if symbolize:
                self._symbolize_cpu_ns += ns

    def _poll_new_processes(self) -> None:
        """Snapshot /proc/PID/maps of newly sampled processes while they are alive."""
        while not self._stop_polling.wait(self._poll_interval):
            self._snapshot_seen_processes()

    def _snapshot_seen_processes(self) -> None:
        obj = self._obj
        if obj is None:
            return
        t = time.thread_time_ns()
        try:
            for raw in obj.map(MAP_SEEN).keys():
                tgid = int.from_bytes(raw, "little")
                with self._sym_lock:
                    if not self.symbolizer.has_process(tgid):
                        self.symbolizer.snapshot_process(tgid)
        except Exception as exc:  # noqa: BLE001 - the object may close under us at stop()
            if self._obj is not None:
                log.debug("maps polling: %s", exc)
        finally:
            self._add_cpu(time.thread_time_ns() - t)

    def update_pids(self, pids) -> None:
        """Make the pid filter exactly `pids` (a "pids" target whose processes change, such as
        restarted workers); at most MAX_TARGET_PIDS."""
        from .config import MAX_TARGET_PIDS
        if self._obj is None or not isinstance(self.config.target, Pids):
            raise ProfilerError("update_pids(): needs a running profiler with a pids target")
        wanted = set(sorted(set(pids))[:MAX_TARGET_PIDS])
        m = self._obj.map(MAP_TGIDS)
        current = {int.from_bytes(raw, "little") for raw in m.keys()}
        for tgid in current - wanted:
            m.delete(tgid)
        for tgid in wanted - current:
            m.update(tgid, 1)
            with self._sym_lock:
                self.symbolizer.snapshot_process(tgid)
        if wanted != current:
            self._target_desc = "pid " + ",".join(str(p) for p in sorted(wanted))

    def stats(self) -> ProfileStats:
        """Kernel counters only (cheap: one lookup per counter), for progress display."""
        if self._obj is None:
            return self._final.stats if self._final else ProfileStats()
        t = time.thread_time_ns()
        try:
            m = self._obj.map(MAP_STATS)
            return ProfileStats(**{name: m.percpu_sum(i) for i, name in enumerate(STAT_NAMES)})
        finally:
            self._add_cpu(time.thread_time_ns() - t)

    def elapsed_s(self) -> float:
        if not self._t0:
            return 0.0
        return (self._t_end or time.monotonic()) - self._t0

    def snapshot(self) -> Profile:
        """The profile so far (symbolized; since the last drain() if any). After stop(): the
        final profile."""
        if self._obj is None:
            if self._final is None:
                raise ProfilerError("snapshot(): the profiler was never started: call start()")
            return self._final
        return self._read(drain=False)

    def drain(self) -> Profile:
        """The samples since the previous drain (or start), removed from the kernel maps: the
        periodic clean-up a long-running profiler needs so max_samples and the stack map bound
        one interval, not the whole run. Its stats and times cover that interval only.

        A sample counted between reading an entry and deleting it is lost (a few per drain at
        most); a stack that recurs right after the drain is captured again.
        """
        if self._obj is None:
            raise ProfilerError("drain(): the profiler is not running: call start()")
        return self._read(drain=True)

    def _read(self, drain: bool) -> Profile:
        t = time.thread_time_ns()
        try:
            self._snapshot_seen_processes()
            stats = self.stats()
            counts_map = self._obj.map(MAP_COUNTS)
            counts = counts_map.lookup_and_delete_batch() if drain else counts_map.lookup_batch()
            stack_map = self._obj.map(MAP_STACKS)
            stacks: dict[int, list[int]] = {}

            def ips(stack_id: int) -> list[int]:
                if stack_id < 0:
                    return []
                if stack_id not in stacks:
                    raw = stack_map.lookup(stack_id)
                    values = _STACK.unpack(raw) if raw else ()
                    n = values.index(0) if 0 in values else len(values)
                    stacks[stack_id] = list(values[:n])
                return stacks[stack_id]

            samples = []
            kernel_cache: dict[int, tuple[Frame, ...]] = {}
            user_cache: dict[tuple[int, int], tuple[Frame, ...]] = {}
            with self._sym_lock:
                for raw_key, raw_value in counts:
                    tgid, tid, kid, uid, comm = _KEY.unpack(raw_key)
                    count = int.from_bytes(raw_value, "little")
                    if kid not in kernel_cache:
                        kernel_cache[kid] = tuple(self.symbolizer.kernel_frames(ips(kid)))
                    if (tgid, uid) not in user_cache:
                        user_cache[(tgid, uid)] = tuple(self.symbolizer.user_frames(tgid, ips(uid)))
                    samples.append(Sample(
                        tgid=tgid, tid=tid, comm=comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
                        count=count, user_frames=user_cache[(tgid, uid)],
                        kernel_frames=kernel_cache[kid],
                        kernel_stack_error=-kid if kid < 0 else 0,
                        user_stack_error=-uid if uid < 0 else 0,
                    ))
            samples.sort(key=lambda s: -s.count)
            start_ns, duration_ns = self._wall0_ns, int(self.elapsed_s() * 1e9)
            if drain:
                # Free the stacks just read, except those that samples taken since the counts
                # were drained point to (deleting those would leave them stackless).
                in_use = set()
                for raw_key in counts_map.keys():
                    _tgid, _tid, kid, uid, _comm = _KEY.unpack(raw_key)
                    in_use.update((kid, uid))
                for stack_id in stacks.keys() - in_use:
                    stack_map.delete(stack_id)
                now_ns = time.time_ns()
                start_ns = self._drained_at_ns or self._wall0_ns
                duration_ns = now_ns - start_ns
                previous, self._drained_stats = self._drained_stats, stats
                stats = ProfileStats(**{n: getattr(stats, n) - getattr(previous, n) for n in STAT_NAMES})
                self._drained_at_ns = now_ns
            return Profile(
                samples=samples, stats=stats, sample_rate_hz=self.config.sample_rate_hz,
                start_time_ns=start_ns, duration_ns=duration_ns,
                cpus=len(self._cpus), target=self._target_desc,
                tgids=frozenset(s.tgid for s in samples),
            )
        finally:
            self._add_cpu(time.thread_time_ns() - t, symbolize=True)

    # -- overhead ---------------------------------------------------------------------------
    def get_overhead(self) -> Overhead:
        """Measured overhead since start(); warns (rate-limited) above 1 % CPU or 50 MB."""
        return self._overhead(warn=True)

    def _overhead(self, warn: bool) -> Overhead:
        if self._obj is None:
            if self._final_overhead is None:
                raise ProfilerError("get_overhead(): the profiler was never started")
            return self._final_overhead
        run_time_ns = run_cnt = 0
        if self._stats_handle is not None:
            run_time_ns, run_cnt = self._obj.program(PROGRAM).run_stats()
        map_bytes = 0
        for name in (MAP_STACKS, MAP_COUNTS, MAP_TGIDS, MAP_SEEN, MAP_STATS):
            map_bytes += self._obj.map(name).info().get("memlock_bytes", 0)
        map_bytes += self._obj.program(PROGRAM).info().get("memlock_bytes", 0)
        with self._sym_lock:
            sym_bytes = self.symbolizer.memory_bytes()
        wall_ns = max(int(self.elapsed_s() * 1e9), 1)
        cpus = max(len(self._cpus), 1)
        with self._cpu_lock:
            user_ns, symbolize_ns = self._user_cpu_ns, self._symbolize_cpu_ns
            setup_ns = self._setup_cpu_ns
        overhead = Overhead(
            cpu_percent=100.0 * (run_time_ns + user_ns) / (wall_ns * cpus),
            memory_bytes=map_bytes + sym_bytes, bpf_run_time_ns=run_time_ns,
            bpf_run_count=run_cnt, user_cpu_ns=user_ns, symbolize_cpu_ns=symbolize_ns,
            setup_cpu_ns=setup_ns, wall_ns=wall_ns, cpus=cpus,
            map_memory_bytes=map_bytes, symbol_cache_bytes=sym_bytes,
        )
        now = time.monotonic()
        if warn and overhead.over_threshold and now - self._last_warn >= _WARN_EVERY_S:
            self._last_warn = now
            if overhead.sampling_cpu_percent > CPU_WARN_PERCENT:
                log.warning("eBPF profiler CPU overhead too high: %.2f%% (> %.0f%%): lower the "
                            "sample rate (19 Hz in production)", overhead.sampling_cpu_percent,
                            CPU_WARN_PERCENT)
            if overhead.memory_bytes > MEMORY_WARN_BYTES:
                log.warning("eBPF profiler memory overhead too high: %.1f MB (> 50 MB): lower "
                            "max_samples", overhead.memory_bytes / 1e6)
        return overhead
