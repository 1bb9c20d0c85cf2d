"""EbpfSyscallTracer: per-syscall counts, errors by errno and latency (bcc syscount).

    with EbpfSyscallTracer(pid=1234, latency=True) as tracer:
        time.sleep(5)
        snap = tracer.snapshot()
    for row in snap.top(10):
        print(row.name, row.count, row.errors, row.errnos)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sniproxy.ebpf.layout import EnumLayout, StructLayout

from .base import BaseTracer, TracerError
from .syscall_names import syscall_name

OBJECT = "sni_proxy_trace_syscalls"
MAP_COUNTS, MAP_ERRNOS, MAP_HIST, MAP_STATS = (
    "sni_proxy_sccnt", "sni_proxy_scerr", "sni_proxy_schst", "sni_proxy_scsta")
#: Per-CPU arrays indexed by syscall number (counts and histograms when not per process).
MAP_COUNT_ARRAY, MAP_HIST_ARRAY = "sni_proxy_scarr", "sni_proxy_schar"
MAX_NR = 1024
HIST_SLOTS = 32
# What Python reads of the object, checked against its BTF at open (ebpf/layout.py).
#: Slots of sni_proxy_scsta (enum sc_stat): Python's labels, paired with C's shorter names.
STATS_LAYOUT = EnumLayout(
    "sc_stat", "SC_STAT_",
    ("enter_lost", "counts_full", "errnos_full", "histograms_full", "exit_without_enter"),
    end="SC_STAT_MAX",
    c_names=("enter_lost", "count_full", "errno_full", "hist_full", "no_enter"))
STAT_NAMES = STATS_LAYOUT.names
KEY_LAYOUT = StructLayout("sc_key", (("tgid", "I"), ("nr", "i")))
VALUE_LAYOUT = StructLayout("sc_value", (("count", "Q"), ("errors", "Q"), ("total_ns", "Q")))
ERRKEY_LAYOUT = StructLayout("sc_errkey", (("tgid", "I"), ("nr", "i"), ("err", "I")))
HIST_LAYOUT = StructLayout("sc_hist", (("slots", f"{HIST_SLOTS}Q"),))
LAYOUTS = (STATS_LAYOUT, KEY_LAYOUT, VALUE_LAYOUT, ERRKEY_LAYOUT, HIST_LAYOUT)
_KEY, _VALUE, _ERRKEY, _HIST = (KEY_LAYOUT.struct, VALUE_LAYOUT.struct, ERRKEY_LAYOUT.struct,
                                HIST_LAYOUT.struct)

#: Distinct (process, syscall) keys by default: ~360 syscalls, per process with -P.
DEFAULT_MAX_KEYS = 10240
MAX_KEYS_LIMIT = 1 << 20
#: Distinct (process, syscall, errno) keys.
DEFAULT_MAX_ERRNO_KEYS = 4096


@dataclass(frozen=True)
class SyscallStat:
    nr: int
    name: str
    tgid: int               # 0 unless by_process
    count: int
    errors: int
    total_ns: int           # 0 unless latency
    errnos: dict[int, int] = field(default_factory=dict)   # errno -> count
    hist: tuple[int, ...] = ()   # log2 microsecond buckets (latency only)


@dataclass(frozen=True)
class SyscallSnapshot:
    rows: list[SyscallStat]
    stats: dict[str, int]
    elapsed_s: float
    latency: bool

    def by_name(self, name: str, tgid: int | None = None) -> SyscallStat | None:
        for row in self.rows:
            if row.name == name and (tgid is None or row.tgid == tgid):
                return row
        return None

    def count(self, name: str) -> int:
        return sum(r.count for r in self.rows if r.name == name)

    def errors(self, name: str, err: int | None = None) -> int:
        if err is None:
            return sum(r.errors for r in self.rows if r.name == name)
        return sum(r.errnos.get(err, 0) for r in self.rows if r.name == name)

    @property
    def total(self) -> int:
        return sum(r.count for r in self.rows)

    def top(self, n: int | None = None, by_time: bool = False) -> list[SyscallStat]:
        key = (lambda r: (-r.total_ns, -r.count, r.name)) if by_time else (
            lambda r: (-r.count, r.name))
        rows = sorted(self.rows, key=key)
        return rows if n is None else rows[:n]


class EbpfSyscallTracer(BaseTracer):
    """Counts syscalls of every process, one process (pid) or one cgroup v2 (cgroup_id)."""

    NAME = "syscall tracer"
    OBJECT = OBJECT
    LAYOUTS = LAYOUTS
    PROGRAMS = {"tp_btf": ("sni_proxy_scenb", "sni_proxy_scexb"),
                "raw_tp": ("sni_proxy_scenr", "sni_proxy_scexr")}

    def __init__(self, *, pid: int | None = None, cgroup_id: int | None = None,
                 failures_only: bool = False, errno_filter: int | None = None,
                 latency: bool = False, by_process: bool = False,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__()
        if pid is not None and (not isinstance(pid, int) or pid <= 0):
            raise TracerError(f"syscall tracer: pid {pid!r}: a pid is a positive integer")
        if errno_filter is not None and not 0 < errno_filter < 4096:
            raise TracerError(f"syscall tracer: errno {errno_filter!r}: expected 1..4095")
        if not 0 < max_keys <= MAX_KEYS_LIMIT:
            raise TracerError(f"syscall tracer: max_keys {max_keys}: expected 1..{MAX_KEYS_LIMIT}")
        self.pid = pid
        self.cgroup_id = cgroup_id
        self.failures_only = failures_only
        self.errno_filter = errno_filter
        self.latency = latency
        self.by_process = by_process
        self.max_keys = max_keys

    def _rodata(self) -> dict:
        return {"filter_tgid": self.pid or 0, "filter_cgroup_id": self.cgroup_id or 0,
                "failures_only": int(self.failures_only),
                "filter_errno": self.errno_filter or 0,
                "measure_latency": int(self.latency), "by_process": int(self.by_process)}

    def _map_sizes(self) -> dict:
        # Per process: (tgid, nr) keys in hashes. Otherwise the per-CPU arrays hold every
        # number below MAX_NR and the hashes only what is above (none on x86_64 today).
        hashed = self.max_keys if self.by_process else 64
        return {MAP_COUNTS: hashed, MAP_ERRNOS: DEFAULT_MAX_ERRNO_KEYS,
                MAP_HIST: min(hashed, 4096) if self.latency else 1,
                MAP_HIST_ARRAY: MAX_NR if self.latency and not self.by_process else 1}

    _final: SyscallSnapshot | None = None

    def stats(self) -> dict[str, int]:
        return self._stat_counters(MAP_STATS, STAT_NAMES)

    def _before_release(self) -> None:
        self._final = self.snapshot()

    def snapshot(self, clear: bool = False) -> SyscallSnapshot:
        """Counts so far; clear=True also resets them (interval output, bcc's -i).
        After stop(): the final counts."""
        if self._obj is None and self._final is not None:
            return self._final
        obj = self._require_obj("snapshot()")
        t = time.thread_time_ns()
        try:
            def read(name: str) -> list:
                m = obj.map(name)
                return m.lookup_and_delete_batch() if clear else m.lookup_batch()

            errnos: dict[tuple[int, int], dict[int, int]] = {}
            for k, v in read(MAP_ERRNOS):
                tgid, nr, err = _ERRKEY.unpack(k)
                errnos.setdefault((tgid, nr), {})[err] = int.from_bytes(v, "little")
            hists: dict[tuple[int, int], tuple[int, ...]] = {}
            if self.latency:
                for k, v in read(MAP_HIST):
                    hists[_KEY.unpack(k)] = _HIST.unpack(v)
            counts = [(_KEY.unpack(k), _VALUE.unpack(v)) for k, v in read(MAP_COUNTS)]
            if not self.by_process:
                counts += self._read_arrays(obj, clear, hists)
            rows = []
            for (tgid, nr), (count, errors, total_ns) in counts:
                rows.append(SyscallStat(nr=nr, name=syscall_name(nr), tgid=tgid, count=count,
                                        errors=errors, total_ns=total_ns,
                                        errnos=errnos.get((tgid, nr), {}),
                                        hist=hists.get((tgid, nr), ())))
            return SyscallSnapshot(rows=rows, stats=self.stats(), elapsed_s=self.elapsed_s(),
                                   latency=self.latency)
        finally:
            self._add_cpu(time.thread_time_ns() - t)

    def _read_arrays(self, obj, clear: bool, hists: dict) -> list:
        """Per-CPU array slots summed over CPUs; non-zero ones only. clear=True writes zeros
        back (an increment landing between the read and the write is lost, as in bcc)."""
        out = []
        counts = obj.map(MAP_COUNT_ARRAY)
        hist_map = obj.map(MAP_HIST_ARRAY) if self.latency else None
        zero_value, zero_hist = bytes(_VALUE.size), bytes(_HIST.size)
        for key, per_cpu in counts.lookup_batch():
            totals = [0, 0, 0]
            for raw in per_cpu:
                for i, v in enumerate(_VALUE.unpack(raw)):
                    totals[i] += v
            if not totals[0]:
                continue
            nr = int.from_bytes(key, "little")
            out.append(((0, nr), tuple(totals)))
            if hist_map is not None:
                slots = [0] * HIST_SLOTS
                for raw in hist_map.lookup(nr) or []:
                    for i, v in enumerate(_HIST.unpack(raw)):
                        slots[i] += v
                hists[(0, nr)] = tuple(slots)
                if clear:
                    hist_map.update(nr, zero_hist)
            if clear:
                counts.update(nr, zero_value)
        return out
