"""Continuous CPU profiling: the eBPF profiler kept running, drained every interval.

Each interval the samples so far are taken out of the kernel maps (EbpfCpuProfiler.drain(), the
seed's periodic clean-up), so the maps and max_samples bound one interval, never the whole run,
and the profile is handed to every sink (OTLP export, pprof files; sinks live in telemetry/ and
are given by the caller, so this module knows nothing of where profiles go). A failing sink is
counted and logged once per failure streak; it never stops the profiler or the other sinks.

The profiler's own cost is measured (BPF run time from the kernel, plus the CPU of this thread:
draining, symbolizing, exporting) and warned about above the seed's thresholds (1 % CPU, 50 MB).

    cp = ContinuousProfiler(create_recommended_config("production").with_pids(os.getpid()),
                            interval_s=60, sinks={"pprof": write_to_dir})
    cp.start(); ...; cp.stop()
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .config import EbpfConfig, Pids
from .profiler import CPU_WARN_PERCENT, MEMORY_WARN_BYTES, EbpfCpuProfiler, Profile, ProfilerError

log = logging.getLogger("sniproxy")

Sink = Callable[[Profile], None]
#: The overhead warning is repeated at most this often.
WARN_EVERY_S = 600.0


@dataclass
class SinkState:
    ok: int = 0
    failed: int = 0
    streak: int = 0
    last_error: str | None = None


class ContinuousProfiler:
    """Runs an EbpfCpuProfiler in a thread of this process and drains it every `interval_s`."""

    def __init__(self, config: EbpfConfig, *, interval_s: float, sinks: Mapping[str, Sink],
                 pids_provider: Callable[[], Iterable[int]] | None = None):
        self.config = config
        self.interval_s = interval_s
        self.sinks = dict(sinks)
        self.sink_states = {name: SinkState() for name in self.sinks}
        self.pids_provider = pids_provider
        self.profiler = EbpfCpuProfiler(config)
        self.drains = 0
        self.samples = 0
        self.dropped = 0
        self.last_drain: float | None = None
        self.last_profile_samples = 0
        self._export_cpu_ns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_warn = 0.0
        self._previous_busy: tuple[int, int] | None = None
        self._interval_cpu: float | None = None
        self._cpu_over = 0
        self.error: str | None = None

    def start(self) -> None:
        """Start sampling (raises ProfilerError / ConfigValidationError: the caller decides)."""
        self.profiler.start()
        self._thread = threading.Thread(target=self._run, name="sni-proxy-profiler", daemon=True)
        self._thread.start()
        log.info("continuous profiling: %d Hz, %s, a profile every %gs to %s",
                 self.config.sample_rate_hz, self.profiler.config.target.describe(), self.interval_s,
                 ", ".join(self.sinks) or "nowhere")

    def stop(self) -> None:
        """Stop the thread, drain the last partial interval to the sinks, release the profiler,
        then close the sinks that have a close() (a queueing sink sends what it holds, bounded)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(max(30.0, self.interval_s))
        try:
            if self.profiler.running:
                try:
                    self.drain_once()
                finally:
                    self.profiler.stop()
        finally:
            for name, sink in self.sinks.items():
                close = getattr(sink, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception as exc:  # noqa: BLE001 - at stop: note it, never raise
                        log.debug("continuous profiling: closing the %s sink: %s", name, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drain_once()
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything
                self.error = f"drain failed: {exc}"
                log.error("continuous profiling: %s", self.error, exc_info=True)

    def drain_once(self) -> Profile:
        """Follow the target's processes, drain, hand the profile to every sink."""
        if self.pids_provider is not None and isinstance(self.profiler.config.target, Pids):
            try:
                self.profiler.update_pids(list(self.pids_provider()))
            except ProfilerError as exc:
                log.debug("continuous profiling: pids not updated: %s", exc)
        profile = self.profiler.drain()
        with self._lock:
            self.samples += profile.stats.samples
            self.dropped += profile.stats.dropped
            self.last_profile_samples = profile.total_samples
            self.last_drain = time.time()
        t_sinks = time.thread_time_ns()
        for name, sink in self.sinks.items():
            state = self.sink_states[name]
            try:
                sink(profile)
            except Exception as exc:  # noqa: BLE001 - one sink must not stop the others
                with self._lock:
                    state.failed += 1
                    state.streak += 1
                    state.last_error = str(exc)
                if state.streak == 1:
                    log.warning("continuous profiling: the %s sink failed: %s (logged once until it "
                                "works again; counted in /status \"profiling\")", name, exc)
            else:
                with self._lock:
                    if state.streak:
                        log.info("continuous profiling: the %s sink works again", name)
                    state.ok += 1
                    state.streak = 0
        with self._lock:
            self._export_cpu_ns += time.thread_time_ns() - t_sinks
            self.drains += 1            # counted once every sink had the profile
        if profile.stats.dropped:
            log.warning("continuous profiling: %d samples dropped in %.0f s: max_samples distinct "
                        "stacks reached; raise profiling.max_samples", profile.stats.dropped,
                        profile.duration_ns / 1e9)
        self._check_overhead()
        return profile

    # -- overhead --------------------------------------------------------------------------
    def _busy(self) -> tuple[int, int, int, int]:
        """(busy ns, wall ns, CPUs, memory bytes) since start: the BPF program plus this
        process's profiling work (draining, symbolizing, exporting), the one-off load excluded."""
        # warn=False: the warning here is ours, on the interval figure (not twice)
        o = self.profiler._overhead(warn=False) if self.profiler.running else self.profiler._final_overhead
        if o is None:
            return 0, 1, 1, 0
        with self._lock:
            export_ns = self._export_cpu_ns
        # Sinks that work in a thread of their own (the OTLP sender) report its CPU time.
        export_ns += sum(getattr(sink, "cpu_ns", 0) for sink in self.sinks.values())
        busy = o.bpf_run_time_ns + o.user_cpu_ns - o.setup_cpu_ns + export_ns
        return busy, o.wall_ns, o.cpus, o.memory_bytes

    def overhead(self) -> tuple[float, float, int]:
        """(CPU % of all CPUs over the last interval, CPU % since start, memory bytes).

        The first interval pays for warming the symbol caches (kallsyms, the ELF files of every
        sampled binary): the per-interval figure shows the steady cost once a second drain ran.
        """
        busy, wall, cpus, memory = self._busy()
        since_start = 100.0 * busy / (wall * cpus)
        with self._lock:
            last = self._interval_cpu
        return (since_start if last is None else last), since_start, memory

    def _check_overhead(self) -> None:
        busy, wall, cpus, memory = self._busy()
        with self._lock:
            previous, self._previous_busy = self._previous_busy, (busy, wall)
            if previous is not None and wall > previous[1]:
                self._interval_cpu = 100.0 * (busy - previous[0]) / ((wall - previous[1]) * cpus)
            cpu = self._interval_cpu
        now = time.monotonic()
        # Loading a binary's symbol table the first time it is sampled costs a one-off burst (the
        # first interval loads kallsyms and most of them): judge CPU only when it stays above
        # the threshold for two intervals in a row.
        if cpu is not None and cpu > CPU_WARN_PERCENT:
            self._cpu_over += 1
        else:
            self._cpu_over = 0
        over_cpu = self._cpu_over >= 2
        if (over_cpu or memory > MEMORY_WARN_BYTES) and now - self._last_warn >= WARN_EVERY_S:
            self._last_warn = now
            log.warning("continuous profiling costs %.2f %% CPU and %.1f MiB (thresholds: %.0f %%, "
                        "%.0f MiB): use environment \"production\" (19 Hz), a longer "
                        "export_interval_s or a lower max_samples", cpu or 0.0, memory / 2**20,
                        CPU_WARN_PERCENT, MEMORY_WARN_BYTES / 2**20)

    def status(self) -> dict:
        cpu, since_start, memory = self.overhead()
        with self._lock:
            return {
                "enabled": True,
                "running": self.profiler.running,
                "sample_rate_hz": self.config.sample_rate_hz,
                "target": self.profiler._target_desc,
                "export_interval_s": self.interval_s,
                "drains": self.drains,
                "samples": self.samples,
                "dropped": self.dropped,
                "last_profile_samples": self.last_profile_samples,
                "overhead_cpu_percent": round(cpu, 4),
                "overhead_cpu_percent_since_start": round(since_start, 4),
                "overhead_memory_bytes": memory,
                "sinks": {name: {"ok": s.ok, "failed": s.failed, "last_error": s.last_error}
                          for name, s in self.sink_states.items()},
                "error": self.error,
            }
