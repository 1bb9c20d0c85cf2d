"""What this kernel and these privileges allow, measured: `check_system_support()` and `sni-proxy check`.

Every map and program type the project uses is probed by really creating the map or loading a
two-instruction program (like cilium/ebpf's `features` package), never guessed from the kernel
version. Each missing item says what is missing, what it disables and how to fix it. Probing
takes well under half a second and never raises: a probe that crashes is reported as failed.
"""
from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import bpffs
from . import libbpf as lb
from .modes import DATA_PATH_FEATURES

# Capability bits (linux/capability.h)
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
CAPABILITIES = {"CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON, "CAP_NET_ADMIN": CAP_NET_ADMIN,
                "CAP_SYS_ADMIN": CAP_SYS_ADMIN}

CAP_BPF_MIN_KERNEL = (5, 8)


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def setcap_hint() -> str:
    return (f"`sudo setcap cap_bpf,cap_net_admin,cap_perfmon+ep {_interpreter()}` "
            "(or under systemd: `AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON`)")


# Features the rest of the project asks about -> the checks that must all pass.
FEATURES: dict[str, tuple[str, ...]] = {
    "sockmap": ("map:sockhash", "prog:sk_skb", "attach:sk_skb_sockhash"),
    "dns_cache": ("map:lru_hash",),
    "stats": ("map:percpu_array",),
    "profiler": ("prog:perf_event", "map:stack_trace", "perf:cpu_clock"),
    "xdp": ("prog:xdp",),
    "tracing": ("prog:raw_tracepoint", "attach:tp_btf"),
    # CAP_PERFMON: the verifier allows the programs' variable-offset stack reads (the TCP
    # option scan) only to a loader that bypasses Spectre v1 checks (perfmon_capable)
    "tcp_splice": ("prog:sched_cls", "map:ringbuf", "sock:tcp_repair", "cap:CAP_NET_ADMIN",
                   "cap:CAP_PERFMON"),
}
# Capabilities each proxy feature needs (proxy/privileges.py says why, for the unit lines):
# a reason names the missing one first, so an operator sees which to grant.
FEATURE_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "tcp_splice": ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"),
    "sockmap": ("CAP_BPF", "CAP_NET_ADMIN"),
    "dns_cache": ("CAP_BPF",),
    "stats": ("CAP_BPF",),
}
# What `sni-proxy check` without --config requires: the proxy's kernel data path.
DATA_PATH_CHECKS = ("map:sockhash", "prog:sk_skb", "attach:sk_skb_sockhash", "map:lru_hash",
                    "map:percpu_array", "cap:CAP_BPF", "cap:CAP_NET_ADMIN")

CATEGORIES = (
    ("system", "Kernel and system"),
    ("privilege", "Privileges"),
    ("map", "Map types (created for real)"),
    ("program", "Program types (loaded for real)"),
    ("attach", "Attach points (attached for real)"),
)


@dataclass
class Check:
    """One measured item: ok or not, what was seen, what it disables and how to fix it."""

    key: str  # e.g. "map:sockhash", "cap:CAP_BPF", "btf"
    label: str
    category: str
    ok: bool
    detail: str = ""
    disables: str = ""
    fix: str = ""
    errno: int | None = None
    essential: bool = True  # False: informational, a ✗ degrades nothing important

    @property
    def status(self) -> str:
        """"ok", "not_supported" (this kernel lacks it), "not_permitted" (these privileges
        do not allow it) or "failed" (anything else): callers branch on this, not on errno."""
        if self.ok:
            return "ok"
        if self.errno in (errno.EPERM, errno.EACCES) or self.category == "privilege":
            return "not_permitted"
        if self.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOENT, errno.EINVAL,
                          lb.ENOTSUPP):
            return "not_supported"
        return "failed"

    def reason(self) -> str:
        if self.ok:
            return ""
        parts = [f"{self.label}: {self.detail or 'not available'}"]
        if self.disables:
            parts.append(f"disables {self.disables}")
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "; ".join(parts)


@dataclass
class SupportReport:
    kernel: str
    kernel_version: tuple[int, ...]
    libbpf_version: str
    uid: int
    capabilities: dict[str, bool]
    unprivileged_bpf_disabled: int | None
    btf: bool
    bpffs_mounted: bool
    jit_enabled: int | None
    checks: list[Check] = field(default_factory=list)
    elapsed_s: float = 0.0

    # lookups ------------------------------------------------------------------------------
    def check(self, key: str) -> Check | None:
        for c in self.checks:
            if c.key == key:
                return c
        return None

    def _keys(self, feature: str) -> tuple[str, ...]:
        if feature in FEATURES:
            return FEATURES[feature]
        return (feature,)

    def ok(self, feature: str) -> bool:
        """A feature of FEATURES ("sockmap", "dns_cache", ...) or a check key ("map:lru_hash")."""
        checks = [self.check(k) for k in self._keys(feature)]
        return all(c is not None and c.ok for c in checks)

    def reason(self, feature: str) -> str:
        """Why a feature is unavailable (what, what it disables, the fix); '' when available."""
        unknown: list[str] = []
        # checks failing the same way (same detail, effect and fix) are named together once
        groups: dict[tuple[str, str, str], list[str]] = {}
        for key in self._keys(feature):
            c = self.check(key)
            if c is None:
                unknown.append(f"{key}: unknown check")
            elif not c.ok:
                groups.setdefault((c.detail or "not available", c.disables, c.fix), []).append(c.label)
        reasons = list(unknown)
        lacking = [cap for cap in FEATURE_CAPABILITIES.get(feature, ())
                   if (c := self.check(f"cap:{cap}")) is not None and not c.ok]
        if lacking and (groups or unknown):
            reasons.append(f"missing capability {', '.join(lacking)}: grant it "
                           "(systemd: AmbientCapabilities=; Kubernetes: securityContext."
                           "capabilities.add; `sni-proxy check --config FILE` prints the lines)")
        for (detail, disables, fix), labels in groups.items():
            parts = [f"{', '.join(labels)}: {detail}"]
            if disables:
                parts.append(f"disables {disables}")
            if fix:
                parts.append(f"fix: {fix}")
            reasons.append("; ".join(parts))
        return " | ".join(reasons)

    def missing(self, keys: Iterable[str] | None = None) -> list[Check]:
        wanted = None if keys is None else set(keys)
        return [c for c in self.checks if not c.ok and (wanted is None or c.key in wanted)]

    @property
    def root(self) -> bool:
        return self.uid == 0

    def capability_line(self) -> str:
        """The seed's one-line summary: `Kernel: 6.x, Sockmap: ✓, XDP: ✓, ...`."""
        def mark(key: str) -> str:
            return "✓" if self.ok(key) else "✗"

        items = [
            ("Sockmap", "sockmap"), ("XDP", "xdp"), ("Per-CPU Map", "map:percpu_array"),
            ("LRU Map", "map:lru_hash"), ("Stack Trace", "map:stack_trace"),
            ("Perf Event", "prog:perf_event"), ("BTF", "btf"), ("kprobes", "attach:kprobe"),
            ("uprobes", "attach:uprobe"),
        ]
        return f"Kernel: {self.kernel}, " + ", ".join(f"{n}: {mark(k)}" for n, k in items)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item, check in zip(data["checks"], self.checks):
            item["status"] = check.status
        data["kernel_version"] = list(self.kernel_version)
        data["root"] = self.root
        data["features"] = {
            name: {"ok": self.ok(name), "reason": self.reason(name)} for name in FEATURES
        }
        data["capability_line"] = self.capability_line()
        return data


# ------------------------------------------------------------------------------------------
# System facts
# ------------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def kernel_release() -> tuple[str, tuple[int, ...]]:
    release = platform.release()
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return release, (0,)
    version = tuple(int(x) for x in m.groups() if x is not None)
    return ".".join(str(v) for v in version), version


def effective_capabilities() -> int:
    text = _read("/proc/self/status") or ""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", text, re.M)
    return int(m.group(1), 16) if m else 0


def bpffs_mounted(path: str = bpffs.DEFAULT) -> bool:
    return bpffs.is_bpffs(path)


# ------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------
def _probe(check: Check, fn: Callable[[], str | None]) -> Check:
    """Run a probe: returns detail on success; BpfError / OSError -> not ok with errno."""
    try:
        detail = fn()
        check.ok = True
        check.detail = detail or "ok"
    except lb.BpfError as e:
        check.ok = False
        check.errno = e.errno
        check.detail = f"{os.strerror(e.errno)} (errno {e.errno})" if e.errno else str(e)
    except Exception as e:  # noqa: BLE001 - a probe must never crash the report
        check.ok = False
        check.errno = getattr(e, "errno", None)
        check.detail = f"{type(e).__name__}: {e}"
    return check


def _privilege_fix(err: int | None) -> str | None:
    if err in (errno.EPERM, errno.EACCES):
        return setcap_hint()
    return None


# (key, label, map type, key size, value size, max entries, what it disables)
_MAP_PROBES = (
    ("sockhash", "SOCKHASH map", lb.BPF_MAP_TYPE_SOCKHASH, 8, 8, 1,
     "sockmap kernel forwarding -> user-space relay"),
    ("sockmap", "SOCKMAP map", lb.BPF_MAP_TYPE_SOCKMAP, 4, 4, 1,
     "SOCKMAP-indexed forwarding (SOCKHASH is used by default)"),
    ("lru_hash", "LRU hash map", lb.BPF_MAP_TYPE_LRU_HASH, 4, 4, 1,
     "the shared BPF DNS cache -> per-worker in-memory cache"),
    ("percpu_array", "Per-CPU array map", lb.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1,
     "per-CPU kernel stats counters"),
    ("percpu_hash", "Per-CPU hash map", lb.BPF_MAP_TYPE_PERCPU_HASH, 4, 8, 1,
     "per-CPU keyed counters"),
    ("stack_trace", "Stack trace map", lb.BPF_MAP_TYPE_STACK_TRACE, 4, 8 * 127, 1,
     "stack collection of the CPU profiler"),
    ("ringbuf", "Ring buffer map", lb.BPF_MAP_TYPE_RINGBUF, 0, 0, 4096,
     "ring-buffer event streaming (perf buffers are used instead)"),
    ("perf_event_array", "Perf event array map", lb.BPF_MAP_TYPE_PERF_EVENT_ARRAY, 4, 4, 1,
     "perf-buffer event streaming"),
)

# (key, label, prog type, expected attach type, what it disables, needs CAP_NET_ADMIN)
_PROG_PROBES = (
    ("sk_skb", "sk_skb programs", lb.BPF_PROG_TYPE_SK_SKB, 0,
     "sockmap kernel forwarding -> user-space relay", True),
    ("sk_msg", "sk_msg programs", lb.BPF_PROG_TYPE_SK_MSG, 0,
     "sk_msg redirection (sk_skb is used by default)", True),
    ("perf_event", "perf_event programs", lb.BPF_PROG_TYPE_PERF_EVENT, 0,
     "the eBPF CPU profiler", False),
    ("tracepoint", "tracepoint programs", lb.BPF_PROG_TYPE_TRACEPOINT, 0,
     "classic tracepoint programs", False),
    ("raw_tracepoint", "raw_tracepoint programs", lb.BPF_PROG_TYPE_RAW_TRACEPOINT, 0,
     "raw tracepoint tracing", False),
    ("xdp", "XDP programs", lb.BPF_PROG_TYPE_XDP, 0, "XDP packet counters", True),
    ("sched_cls", "tc (sched_cls) programs", lb.BPF_PROG_TYPE_SCHED_CLS, 0,
     "the kernel TCP splice in tc -> sockmap / user-space relay", True),
)


def _probe_map(map_type: int, key_size: int, value_size: int, entries: int, name: str) -> str:
    fd = lb.map_create(map_type, name, key_size, value_size, entries)
    os.close(fd)
    return "created"


def _probe_prog(prog_type: int, attach_type: int) -> str:
    fd = lb.prog_load_raw(prog_type, lb.RETURN_ZERO_INSNS, "sni_proxy_prb",
                          expected_attach_type=attach_type)
    os.close(fd)
    return "loaded"


_TCP_REPAIR = 19                # linux/tcp.h (Python's socket module does not name it)
_TCP_REPAIR_OFF_NO_WP = -1      # leave repair mode without sending a window probe


def _probe_tcp_repair() -> str:
    """TCP_REPAIR on a fresh (CLOSE) socket: allowed exactly when CAP_NET_ADMIN is there."""
    import socket as _socket
    with _socket.socket() as s:
        s.setsockopt(_socket.IPPROTO_TCP, _TCP_REPAIR, 1)
        s.setsockopt(_socket.IPPROTO_TCP, _TCP_REPAIR, _TCP_REPAIR_OFF_NO_WP)
    return "allowed"


def _probe_sockhash_attach() -> str:
    map_fd = lb.map_create(lb.BPF_MAP_TYPE_SOCKHASH, "sni_proxy_prb", 8, 8, 1)
    try:
        prog_fd = lb.prog_load_raw(lb.BPF_PROG_TYPE_SK_SKB, lb.RETURN_ZERO_INSNS, "sni_proxy_prb")
        try:
            lb.prog_attach(prog_fd, map_fd, lb.BPF_SK_SKB_STREAM_VERDICT,
                           what="attaching sk_skb to a sockhash")
            lb.prog_detach(prog_fd, map_fd, lb.BPF_SK_SKB_STREAM_VERDICT)
        finally:
            os.close(prog_fd)
    finally:
        os.close(map_fd)
    return "sk_skb stream verdict attached to a SOCKHASH and detached"


def _probe_btf_program(attach_type: int, candidates: tuple[tuple[str, int], ...]) -> str:
    """Load and attach a BTF-typed tracing program (tp_btf or fentry) at the first target found."""
    last: lb.BpfError | None = None
    for name, kind in candidates:
        try:
            btf_id = lb.vmlinux_btf_type_id(name, kind)
        except lb.BpfError as e:
            last = e
            continue
        fd = lb.prog_load_raw(lb.BPF_PROG_TYPE_TRACING, lb.RETURN_ZERO_INSNS, "sni_proxy_prb",
                              expected_attach_type=attach_type, attach_btf_id=btf_id)
        try:
            link = lb.raw_tracepoint_open(None, fd)
            os.close(link)
        finally:
            os.close(fd)
        return f"loaded and attached at {name}"
    raise last or lb.BpfError("finding an attach target", errno.ENOENT)


def _elf_entry_file_offset(path: str) -> int:
    """File offset of an ELF's entry point: a valid instruction for a probe uprobe."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        entry = elf.header["e_entry"]
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= entry < seg["p_vaddr"] + seg["p_filesz"]:
                return entry - seg["p_vaddr"] + seg["p_offset"]
    raise ValueError(f"{path}: entry point outside every PT_LOAD segment")


def _pmu_type(name: str) -> int | None:
    return _read_int(f"/sys/bus/event_source/devices/{name}/type")


def _probe_uprobe() -> str:
    pmu = _pmu_type("uprobe")
    if pmu is None:
        raise lb.BpfError("uprobe PMU", errno.ENOENT, hint="kernel built without CONFIG_UPROBE_EVENTS")
    # /bin/true's entry point: a file nobody keeps running, so the short-lived probe is inert.
    target = shutil.which("true") or _interpreter()
    fd = lb.perf_event_open_probe(pmu, os.path.realpath(target), _elf_entry_file_offset(target),
                                  "opening a uprobe perf event")
    os.close(fd)
    return f"uprobe PMU type {pmu}: uprobe created on {target}"


def _probe_kprobe() -> str:
    pmu = _pmu_type("kprobe")
    if pmu is None:
        raise lb.BpfError(
            "kprobe PMU", errno.ENOENT,
            hint="no /sys/bus/event_source/devices/kprobe: kernel built without CONFIG_KPROBES")
    last: lb.BpfError | None = None
    for symbol in ("do_sys_openat2", "vfs_read", "schedule"):
        try:
            fd = lb.perf_event_open_probe(pmu, symbol, 0, f"opening a kprobe on {symbol}")
        except lb.BpfError as e:
            last = e
            continue
        os.close(fd)
        return f"kprobe PMU type {pmu}: kprobe created on {symbol}"
    raise last or lb.BpfError("kprobe", errno.ENOENT)


def _probe_cpu_clock() -> str:
    fd = lb.perf_event_open_cpu_clock(lb.online_cpus()[0], 99, pid=-1)
    os.close(fd)
    return "system-wide cpu-clock perf event opened"


def _system_checks(report: SupportReport) -> list[Check]:
    checks = []
    version_ok = report.kernel_version >= CAP_BPF_MIN_KERNEL
    checks.append(Check(
        "kernel", "Kernel version", "system", version_ok, report.kernel,
        disables="" if version_ok else "CAP_BPF (root or CAP_SYS_ADMIN needed instead)",
        fix="" if version_ok else "kernel >= 5.8 needed for CAP_BPF; >= 5.11 for memcg-charged BPF memory",
        essential=False))
    checks.append(Check(
        "libbpf", "libbpf", "system", lb.libbpf_available(),
        report.libbpf_version or "libbpf.so.1 not found",
        disables="every eBPF feature", fix="`apt-get install libbpf1`"))
    checks.append(Check(
        "btf", "BTF (/sys/kernel/btf/vmlinux)", "system", report.btf,
        "present" if report.btf else "missing",
        disables="CO-RE programs: tp_btf tracing, the profiler's kernel structures",
        fix="a kernel built with CONFIG_DEBUG_INFO_BTF=y"))
    checks.append(Check(
        "bpffs", "bpffs at /sys/fs/bpf", "system", report.bpffs_mounted,
        "mounted" if report.bpffs_mounted else "not mounted",
        disables="pinning the DNS cache map (workers share it by fd instead; it does not "
                 "survive a restart)",
        fix="as root: `mount -t bpf bpf /sys/fs/bpf` (or the systemd sys-fs-bpf.mount unit)",
        essential=False))
    jit_ok = bool(report.jit_enabled)
    checks.append(Check(
        "jit", "BPF JIT", "system", jit_ok,
        f"net.core.bpf_jit_enable={report.jit_enabled}",
        disables="nothing, but programs run in the interpreter (slower)",
        fix="`sysctl net.core.bpf_jit_enable=1`", essential=False))
    tracefs = lb.tracefs_mount()
    checks.append(Check(
        "tracefs", "tracefs", "system", tracefs is not None,
        f"mounted at {tracefs}" if tracefs else "not mounted",
        disables="attaching classic tracepoint programs (tp_btf and raw_tp need no tracefs)",
        fix="as root: `mount -t tracefs tracefs /sys/kernel/tracing`", essential=False))
    return checks


def _privilege_checks(report: SupportReport) -> list[Check]:
    caps = report.capabilities
    old_kernel = report.kernel_version < CAP_BPF_MIN_KERNEL
    checks = []
    bpf_ok = caps["CAP_BPF"] or caps["CAP_SYS_ADMIN"]
    checks.append(Check(
        "cap:CAP_BPF", "CAP_BPF", "privilege", bpf_ok,
        "effective" if caps["CAP_BPF"] else ("via CAP_SYS_ADMIN" if caps["CAP_SYS_ADMIN"] else "missing"),
        disables="loading BPF programs and creating maps: every eBPF feature",
        fix=("kernel >= 5.8 needed for CAP_BPF; until then grant CAP_SYS_ADMIN"
             if old_kernel else setcap_hint())))
    checks.append(Check(
        "cap:CAP_NET_ADMIN", "CAP_NET_ADMIN", "privilege",
        caps["CAP_NET_ADMIN"] or caps["CAP_SYS_ADMIN"],
        "effective" if caps["CAP_NET_ADMIN"] else "missing",
        disables="sk_skb/sk_msg/XDP programs: sockmap kernel forwarding -> user-space relay",
        fix=setcap_hint()))
    perfmon_ok = caps["CAP_PERFMON"] or caps["CAP_SYS_ADMIN"]
    checks.append(Check(
        "cap:CAP_PERFMON", "CAP_PERFMON", "privilege", perfmon_ok,
        "effective" if caps["CAP_PERFMON"] else ("via CAP_SYS_ADMIN" if caps["CAP_SYS_ADMIN"] else "missing"),
        disables="tracing and the CPU profiler (perf events, stack traces)",
        fix=setcap_hint(), essential=False))
    checks.append(Check(
        "cap:CAP_SYS_ADMIN", "CAP_SYS_ADMIN", "privilege", caps["CAP_SYS_ADMIN"],
        "effective" if caps["CAP_SYS_ADMIN"] else "missing (not needed with CAP_BPF)",
        disables="BPF run-time statistics (profiler overhead), mounting bpffs/tracefs",
        fix="run as root for these; the proxy itself does not need it", essential=False))
    unpriv = report.unprivileged_bpf_disabled
    checks.append(Check(
        "unprivileged_bpf", "kernel.unprivileged_bpf_disabled", "privilege", True,
        {0: "0 (unprivileged BPF allowed)", 1: "1 (capabilities required, locked)",
         2: "2 (capabilities required)"}.get(unpriv, str(unpriv)),
        essential=False))
    return checks


def _probe_checks() -> list[Check]:
    checks = []
    for key, label, mtype, ks, vs, entries, disables in _MAP_PROBES:
        c = Check(f"map:{key}", label, "map", False, disables=disables)
        _probe(c, lambda mtype=mtype, ks=ks, vs=vs, entries=entries:
               _probe_map(mtype, ks, vs, entries, "sni_proxy_prb"))
        checks.append(c)
    for key, label, ptype, attach, disables, _netadmin in _PROG_PROBES:
        c = Check(f"prog:{key}", label, "program", False, disables=disables)
        _probe(c, lambda ptype=ptype, attach=attach: _probe_prog(ptype, attach))
        checks.append(c)

    c = _probe(Check("attach:sk_skb_sockhash", "sk_skb verdict on a SOCKHASH", "attach", False,
                     disables="sockmap kernel forwarding -> user-space relay"),
               _probe_sockhash_attach)
    checks.append(c)
    c = _probe(Check("attach:tp_btf", "tp_btf (BTF tracepoints)", "attach", False,
                     disables="BTF tracepoint tracing (raw_tp is used instead)",
                     essential=False),
               lambda: _probe_btf_program(lb.BPF_TRACE_RAW_TP,
                                          (("btf_trace_sched_switch", lb.BTF_KIND_TYPEDEF),)))
    checks.append(c)
    c = _probe(Check("attach:fentry", "fentry/fexit", "attach", False,
                     disables="fentry/fexit tracing (tp_btf, raw_tp and uprobes are used instead)",
                     essential=False),
               lambda: _probe_btf_program(lb.BPF_TRACE_FENTRY,
                                          (("do_nanosleep", lb.BTF_KIND_FUNC),
                                           ("vfs_read", lb.BTF_KIND_FUNC))))
    if not c.ok and c.errno == errno.EPERM:
        c.detail = "blocked (EPERM, kernel lockdown?)"
        c.fix = "kernel lockdown (integrity/confidentiality) forbids it: boot with lockdown=none"
    checks.append(c)
    c = _probe(Check("attach:kprobe", "kprobes", "attach", False,
                     disables="kernel function probes (tracepoints are used instead)",
                     essential=False), _probe_kprobe)
    if not c.ok and c.errno == errno.ENOENT:
        c.detail = "not available: no kprobe PMU (kernel built without CONFIG_KPROBES)"
        c.fix = "a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y"
    checks.append(c)
    checks.append(_probe(Check("attach:uprobe", "uprobes", "attach", False,
                               disables="user-space function probes", essential=False),
                         _probe_uprobe))
    c = _probe(Check("sock:tcp_repair", "TCP_REPAIR socket option", "attach", False,
                     disables="the kernel TCP splice in tc -> sockmap / user-space relay"),
               _probe_tcp_repair)
    if not c.ok and c.errno == errno.EPERM:
        c.detail = "not permitted (needs CAP_NET_ADMIN)"
    checks.append(c)
    checks.append(_probe(Check("perf:cpu_clock", "cpu-clock perf events (system-wide)", "attach",
                               False, disables="the eBPF CPU profiler"), _probe_cpu_clock))
    for c in checks:
        if not c.ok and not c.fix:
            c.fix = _privilege_fix(c.errno) or ""
    return checks


_cached_report: SupportReport | None = None


def check_system_support(refresh: bool = False) -> SupportReport:
    """Measure kernel, BTF, privileges and every map/program/attach type the project uses.

    One report per process (about 50 ms of probes): start-up, `check`, `demo` and the
    profiler share it; `refresh=True` measures again (after a capability change, say).
    """
    global _cached_report
    if _cached_report is not None and not refresh:
        return _cached_report
    _cached_report = _measure_support()
    return _cached_report


def adopt_report(report: SupportReport) -> SupportReport:
    """Make a report measured elsewhere (the start-up's short-lived child) this process's one:
    later callers (the profiler, /status) read it instead of probing again."""
    global _cached_report
    _cached_report = report
    return report


def _measure_support() -> SupportReport:
    start = time.perf_counter()
    kernel, version = kernel_release()
    capeff = effective_capabilities()
    try:
        libbpf_version = lb.libbpf_version()
    except lb.BpfError:
        libbpf_version = ""
    report = SupportReport(
        kernel=kernel, kernel_version=version, libbpf_version=libbpf_version, uid=os.geteuid(),
        capabilities={name: bool(capeff >> bit & 1) for name, bit in CAPABILITIES.items()},
        unprivileged_bpf_disabled=_read_int("/proc/sys/kernel/unprivileged_bpf_disabled"),
        btf=os.path.exists("/sys/kernel/btf/vmlinux"), bpffs_mounted=bpffs_mounted(),
        jit_enabled=_read_int("/proc/sys/net/core/bpf_jit_enable"),
    )
    report.checks.extend(_system_checks(report))
    report.checks.extend(_privilege_checks(report))
    if lb.libbpf_available():
        report.checks.extend(_probe_checks())
    report.elapsed_s = round(time.perf_counter() - start, 3)
    return report


class EbpfLoader:
    """The seed's entry point name: `EbpfLoader.check_system_support()`."""

    @staticmethod
    def check_system_support() -> SupportReport:
        return check_system_support()


# ------------------------------------------------------------------------------------------
# sni-proxy check
# ------------------------------------------------------------------------------------------
def requested_checks(ebpf_config: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(check keys the config needs, feature names asked for). None: the full data path."""
    if ebpf_config is None:
        return list(DATA_PATH_CHECKS), list(DATA_PATH_FEATURES)
    if not ebpf_config.get("enabled", False):
        return [], []
    features = [name for name in DATA_PATH_FEATURES
                if (ebpf_config.get(name) or {}).get("enabled", True)]
    keys: list[str] = ["cap:CAP_BPF"]
    for name in features:
        keys.extend(f"cap:{cap}" for cap in FEATURE_CAPABILITIES[name])
    for name in features:
        keys.extend(FEATURES[name])
    return list(dict.fromkeys(keys)), features


def _load_ebpf_section(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a JSON object")
    section = data.get("ebpf", {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: ebpf: expected an object")
    return section


def format_report(report: SupportReport, required: Iterable[str] = ()) -> str:
    required = set(required)
    lines = [
        "sni-proxy eBPF support check",
        f"kernel {report.kernel}, libbpf {report.libbpf_version or 'missing'}, "
        f"uid {report.uid}{' (root)' if report.root else ''}, probed in {report.elapsed_s:.2f} s",
        report.capability_line(),
    ]
    for category, title in CATEGORIES:
        group = [c for c in report.checks if c.category == category]
        if not group:
            continue
        lines.append("")
        lines.append(title)
        width = max(len(c.label) for c in group)
        for c in group:
            mark = "✓" if c.ok else ("✗" if c.essential or c.key in required else "-")
            tag = "  [required]" if c.key in required else ""
            lines.append(f"  {mark} {c.label.ljust(width)}  {c.detail}{tag}")
            if not c.ok:
                if c.disables:
                    lines.append(f"      disables: {c.disables}")
                if c.fix and c.fix == setcap_hint() and c.category != "privilege":
                    lines.append("      fix: missing privilege: see the fix under Privileges")
                elif c.fix:
                    lines.append(f"      fix: {c.fix}")
    return "\n".join(lines)
