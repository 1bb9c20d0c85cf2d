"""`sni-proxy trace`: bcc-style tracers that need no kprobes (tp_btf / raw_tp / uprobes).

    sni-proxy trace syscalls [-p PID] [-c CGROUP] [-T TOP] [-x] [-e ERRNO] [-L] [-m] [-P]
    sni-proxy trace tcp      [-p PID] [-L PORTS] [-D PORTS] [-4|-6] [-w] [-T]   (tcplife)
    sni-proxy trace connect  [-p PID] [-L] [-4|-6] [-x] [MIN_MS]               (tcpconnlat)
    sni-proxy trace retrans  [-p PID] [-c] [-4|-6]                             (tcpretrans)
    sni-proxy trace memory   -p PID | --kernel [-o OLDER_MS] [-T TOP] [-s RATE] (memleak)

Every command takes -i INTERVAL and -d DURATION (seconds) and --json (one object per line,
fields in docs/tracing.md). Exit status: 0 ok, 1 the tracer failed (the message says why and
what to do), 2 bad usage.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Callable

from .signal_event import SignalSafeEvent
from .tracing import format as fmt
from .tracing.base import TracerError

#: Bounds of -i and -d: a tenth of a second (below, the table is mostly the tracer reading
#: itself) to a day (a trace longer than that belongs in the proxy's /metrics).
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 3600.0
MAX_DURATION_S = 86400.0
#: Events buffered between two prints of a streaming command (tcp/connect/retrans).
CLI_MAX_EVENTS = 65536
#: How often streaming commands print what arrived.
STREAM_PERIOD_S = 0.2

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
PRIVILEGE_FIX = ("run as root, or grant the capabilities to the interpreter: "
                 "`sudo setcap cap_bpf,cap_perfmon+ep $(readlink -f $(which python3))` "
                 "(uprobes on other users' processes also need cap_sys_ptrace)")


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def missing_privileges() -> list[str]:
    """Capabilities the tracers need that this process lacks (empty: all there)."""
    caps = _effective_caps()
    if caps & (1 << CAP_SYS_ADMIN):
        return []
    return [name for bit, name in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON"))
            if not caps & (1 << bit)]


# -- argument types -------------------------------------------------------------------------
def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, e.g. 1 or 0.5") from None
    if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{text!r}: between {MIN_INTERVAL_S} and {MAX_INTERVAL_S:.0f} seconds")
    return value


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, e.g. 10") from None
    if not 0 < value <= MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"{text!r}: more than 0 and at most "
                                         f"{MAX_DURATION_S:.0f} seconds (a day)")
    return value


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a pid is a positive integer (see `ps`)")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ports, e.g. 443 or 80,443") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 1..65535")
    return ports


def _errno(text: str) -> int:
    try:
        return fmt.parse_errno(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return value


def _common(p: argparse.ArgumentParser, default_interval: float | None = None) -> None:
    p.add_argument("-i", "--interval", type=_interval, default=default_interval, metavar="S",
                   help=f"print every S seconds ({MIN_INTERVAL_S}-{MAX_INTERVAL_S:.0f})")
    p.add_argument("-d", "--duration", type=_duration, metavar="S",
                   help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line (fields: docs/tracing.md)")


# `sni-proxy trace [COMMAND] --help` epilogs: examples first (bcc's style), then where the
# flags differ from the bcc tool of the same job (docs/tracing.md has the details).
_EPILOGS = {
    "trace": """examples:
  sni-proxy trace syscalls -p 1234 -d 10        syscalls of one process for 10 s (syscount)
  sni-proxy trace tcp -L 443                     TCP sessions on local port 443 (tcplife)
  sni-proxy trace connect 5                      connects slower than 5 ms (tcpconnlat)
  sni-proxy trace retrans -c                     retransmits counted per flow (tcpretrans)
  sni-proxy trace memory -p 1234 -i 10           outstanding allocations (memleak)

Run `sni-proxy trace COMMAND --help` for a command's flags; fields: docs/tracing.md.""",
    "syscalls": """examples:
  sni-proxy trace syscalls                       top 10 syscalls of the machine, at Ctrl-C
  sni-proxy trace syscalls -P -d 5 -T 5          top 5 processes by syscalls for 5 s
  sni-proxy trace syscalls -p 1234 -L -m -i 1    latency per syscall in ms, every second
  sni-proxy trace syscalls -e ENOENT             calls failing with ENOENT
  sni-proxy trace syscalls -c /sys/fs/cgroup/system.slice/sni-proxy.service --json

as bcc syscount: -p -i -d -T -x -e -L -m -P; -c takes a cgroup v2 directory (as
libbpf-tools); not here: -l (list syscalls), -t TID, --syscall; --json is ours.""",
    "tcp": """examples:
  sni-proxy trace tcp                            every TCP session as it closes
  sni-proxy trace tcp -p 1234 -T -w              one process, time column, wide addresses
  sni-proxy trace tcp -L 443 -D 80,8080 -4       IPv4 sessions from :443 to :80 or :8080

as bcc tcplife: -p -L -D -4 -6 -w -T; RTT and retransmit columns added; not here: -t
(use -T), -s CSV (use --json).""",
    "connect": """examples:
  sni-proxy trace connect                        every outgoing TCP connect and its latency
  sni-proxy trace connect 10 -t                  connects slower than 10 ms, with timestamps
  sni-proxy trace connect -x -p 1234             failed connects of one process, and why

as bcc tcpconnlat: min_ms -p -L -t -4 -6; -x (failures only) and the failure reason are
ours; not here: -v.""",
    "retrans": """examples:
  sni-proxy trace retrans                        every retransmitted segment
  sni-proxy trace retrans -c -d 30               counts per flow after 30 s
  sni-proxy trace retrans -p 1234 -6             IPv6 flows of one process

as bcc tcpretrans: -c -4 -6; -p is ours; not here: -l (tail-loss probes are retransmits
to the kernel too), -s.""",
    "memory": """examples:
  sni-proxy trace memory -p 1234                 libc allocations older than 500 ms, every 5 s
  sni-proxy trace memory -p 1234 -o 0 -z 4096 -T 5   every allocation of 4 KiB or more
  sni-proxy trace memory --kernel -i 10          kmalloc/kfree outstanding by stack

as bcc memleak: -p -o -T -s -z; the interval is -i S (bcc: a positional interval) and
--kernel replaces "no -p"; not here: -c COMMAND, -a, -t, -Z, -O.""",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sni-proxy trace",
                                description="Trace syscalls, TCP and memory with eBPF "
                                            "(tp_btf/raw_tp/uprobes: no kprobes, no tracefs).",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_EPILOGS["trace"])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=_EPILOGS[name])

    s = command("syscalls", "count syscalls (like bcc syscount)")
    s.add_argument("-p", "--pid", type=_pid, help="trace only this process")
    s.add_argument("-c", "--cgroup", metavar="PATH", help="trace only this cgroup v2 directory")
    s.add_argument("-T", "--top", type=_positive_int, default=10, help="rows to print (10)")
    s.add_argument("-x", "--failures", action="store_true", help="count failed calls only")
    s.add_argument("-e", "--errno", type=_errno, help="count calls failing with this errno")
    s.add_argument("-L", "--latency", action="store_true",
                   help="time spent in syscalls, with log2 histograms")
    s.add_argument("-m", "--milliseconds", action="store_true", help="times in ms (with -L)")
    s.add_argument("-P", "--process", action="store_true", help="count by process")
    _common(s)

    t = command("tcp", "TCP sessions at close (like bcc tcplife), with RTT and retransmits")
    t.add_argument("-p", "--pid", type=_pid, help="trace only this process")
    t.add_argument("-L", "--localport", type=_ports, help="local ports (comma list, up to 8)")
    t.add_argument("-D", "--remoteport", type=_ports, help="remote ports (comma list, up to 8)")
    fam = t.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="IPv6 only")
    t.add_argument("-w", "--wide", action="store_true", help="wide address columns")
    t.add_argument("-T", "--time", action="store_true", help="include a time column")
    _common(t)

    c = command("connect", "connect latency and failures (like bcc tcpconnlat)")
    c.add_argument("min_ms", nargs="?", type=_non_negative_float, default=0.0,
                   help="show only connects slower than this many ms")
    c.add_argument("-p", "--pid", type=_pid, help="trace only this process")
    c.add_argument("-L", "--lport", action="store_true", help="include the local port")
    c.add_argument("-t", "--timestamp", action="store_true", help="seconds since start")
    c.add_argument("-x", "--failures", action="store_true", help="failed connects only")
    fam = c.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="IPv6 only")
    _common(c)

    r = command("retrans", "TCP retransmits (like bcc tcpretrans)")
    r.add_argument("-p", "--pid", type=_pid, help="trace only this process's flows")
    r.add_argument("-c", "--count", action="store_true", help="count per flow, print at the end")
    fam = r.add_mutually_exclusive_group()
    fam.add_argument("-4", "--ipv4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", "--ipv6", action="store_true", help="IPv6 only")
    _common(r)

    m = command("memory", "outstanding allocations by stack (like bcc memleak)")
    m.add_argument("-p", "--pid", type=_pid, help="process whose libc allocations to trace")
    m.add_argument("--kernel", action="store_true", help="trace kmalloc/kfree instead")
    m.add_argument("-o", "--older", type=_non_negative_float, default=500.0, metavar="MS",
                   help="only allocations older than MS milliseconds (500)")
    m.add_argument("-T", "--top", type=_positive_int, default=10, help="stacks to print (10)")
    m.add_argument("-s", "--sample-rate", type=_positive_int, default=1, metavar="N",
                   help="record one allocation in N (1: all)")
    m.add_argument("-z", "--min-size", type=int, default=0, metavar="BYTES",
                   help="ignore smaller allocations")
    _common(m, default_interval=5.0)
    return p


# -- running --------------------------------------------------------------------------------
class _Stopper:
    """Ctrl-C / SIGTERM / duration end -> one event the main loop waits on (a SignalSafeEvent:
    a threading.Event set from the handler could deadlock the main thread)."""

    def __init__(self, duration: float | None) -> None:
        self.event = SignalSafeEvent()
        self.deadline = time.monotonic() + duration if duration else None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())

    def wait(self, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: until the end); True when it is time to stop."""
        timeout = seconds
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.0)
            timeout = left if timeout is None else min(timeout, left)
        self.event.wait(timeout)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.event.set()
        return self.event.is_set()


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _info(line: str) -> None:
    sys.stderr.write(line + "\n")


def _comm(pid: int, cache: dict[int, str]) -> str:
    if pid not in cache:
        try:
            with open(f"/proc/{pid}/comm") as f:
                cache[pid] = f.read().strip()
        except OSError:
            cache[pid] = "[exited]"
    return cache[pid]


def _run(tracer, loop: Callable[[object, _Stopper], None], args) -> int:
    missing = missing_privileges()
    if missing:
        _info(f"sni-proxy trace {args.command}: missing {' and '.join(missing)}: the tracers "
              f"load BPF programs (CAP_BPF) and attach to tracepoints/uprobes (CAP_PERFMON). "
              f"Fix: {PRIVILEGE_FIX}")
        return 1
    stopper = _Stopper(args.duration)
    try:
        tracer.start()
    except TracerError as exc:
        _info(f"sni-proxy trace {args.command}: {exc}")
        return 1
    try:
        loop(tracer, stopper)
    finally:
        tracer.stop()
    ov = tracer.get_overhead()
    _info(f"[{tracer.NAME}: {tracer.hook_mode} hooks, BPF {ov.bpf_run_time_ns / 1e6:.1f} ms in "
          f"{ov.bpf_run_count} runs ({ov.bpf_ns_per_run:.0f} ns/run), user space "
          f"{ov.user_cpu_ns / 1e6:.1f} ms, {ov.cpu_percent:.2f}% of {ov.cpus} CPUs]")
    return 0


def _cmd_syscalls(args) -> int:
    from .config import ConfigValidationError, cgroup_id_of
    from .tracing.syscalls import EbpfSyscallTracer
    cgroup_id = None
    if args.cgroup:
        try:
            cgroup_id = cgroup_id_of(args.cgroup)
        except ConfigValidationError as exc:
            _info(f"sni-proxy trace syscalls: -c {args.cgroup}: {exc}")
            return 2
    if args.milliseconds and not args.latency:
        _info("sni-proxy trace syscalls: -m prints times in ms and needs -L")
        return 2
    tracer = EbpfSyscallTracer(pid=args.pid, cgroup_id=cgroup_id, failures_only=args.failures,
                               errno_filter=args.errno, latency=args.latency,
                               by_process=args.process)
    comms: dict[int, str] = {}

    def show(snap) -> None:
        if args.process:
            agg: dict[int, list[int]] = {}
            for row in snap.rows:
                a = agg.setdefault(row.tgid, [0, 0, 0])
                a[0] += row.count
                a[1] += row.total_ns
                a[2] += row.errors
            ranked = sorted(agg.items(), key=lambda kv: (-(kv[1][1] if args.latency else
                                                           kv[1][0]), kv[0]))[:args.top]
            if args.json:
                for pid, (count, total_ns, errors) in ranked:
                    obj = {"type": "syscalls_process", "time": time.time(), "pid": pid,
                           "comm": _comm(pid, comms), "count": count, "errors": errors}
                    if args.latency:
                        obj["total_ns"] = total_ns
                    _out(fmt.json_line(obj))
                return
            _out(fmt.syscount_header(args.latency, args.milliseconds, True))
            for pid, (count, total_ns, _errors) in ranked:
                _out(fmt.syscount_row(fmt.process_label(pid, _comm(pid, comms)), count,
                                      total_ns, args.latency, args.milliseconds))
            return
        rows = snap.top(args.top, by_time=args.latency)
        if args.json:
            for row in rows:
                obj = {"type": "syscall", "time": time.time(), "syscall": row.name,
                       "nr": row.nr, "count": row.count, "errors": row.errors,
                       "errnos": {fmt.errno_name(e): n for e, n in sorted(row.errnos.items())}}
                if args.latency:
                    obj["total_ns"] = row.total_ns
                    obj["hist_log2_us"] = list(row.hist)
                _out(fmt.json_line(obj))
            return
        _out(fmt.syscount_header(args.latency, args.milliseconds, False))
        for row in rows:
            _out(fmt.syscount_row(row.name, row.count, row.total_ns, args.latency,
                                  args.milliseconds))
        if args.latency:
            for row in rows:
                if row.hist:
                    _out("\nsyscall = %s" % row.name)
                    for line in fmt.log2_hist_lines(row.hist, "usecs"):
                        _out(line)

    def loop(tr, stopper: _Stopper) -> None:
        _info(f"Tracing {'failed ' if args.failures or args.errno else ''}syscalls, printing "
              f"top {args.top}... Ctrl+C to quit.")
        if args.interval:
            while not stopper.wait(args.interval):
                if not args.json:
                    _out("[%s]" % fmt.clock())
                show(tr.snapshot(clear=True))
        else:
            stopper.wait(None)
        if not args.json:
            _out("[%s]" % fmt.clock())
        show(tr.snapshot(clear=True))
        _report_stats(tr.stats())

    return _run(tracer, loop, args)


def _report_stats(stats: dict[str, int]) -> None:
    lost = {k: v for k, v in stats.items() if v and k not in ("events", "allocs", "frees")}
    if lost:
        _info("lost or not counted (bounded maps / ring buffer): " +
              ", ".join(f"{k}={v}" for k, v in lost.items()))


def _epoch(ts_ns: int) -> float:
    """An event's bpf_ktime_get_ns() (CLOCK_MONOTONIC) as epoch seconds, for JSON `time`."""
    return time.time() - (time.monotonic_ns() - ts_ns) / 1e9


def _family(args) -> int | None:
    return 4 if getattr(args, "ipv4", False) else 6 if getattr(args, "ipv6", False) else None


def _stream(tracer, stopper: _Stopper, handle: Callable[[list], None],
            interval: float | None) -> None:
    """Print what arrived every STREAM_PERIOD_S (or every -i) until the end."""
    period = interval or STREAM_PERIOD_S
    while not stopper.wait(period):
        handle(tracer.snapshot(clear=True).events)
    snap = tracer.snapshot(clear=True)
    handle(snap.events)
    if snap.dropped:
        _info(f"{snap.dropped} events dropped in user space (more than {CLI_MAX_EVENTS} "
              "between two prints)")
    _report_stats(snap.stats)


def _cmd_tcp(args) -> int:
    from .tracing.network import EbpfNetworkTracer
    tracer = EbpfNetworkTracer(events=("close",), pid=args.pid, family=_family(args),
                               local_ports=args.localport, remote_ports=args.remoteport,
                               max_events=CLI_MAX_EVENTS)

    def handle(events) -> None:
        for e in events:
            if e.kind != "close":
                continue
            obj = {"type": "tcp_close", "time": _epoch(e.ts_ns), "pid": e.pid, "comm": e.comm, "ip": e.family,
                   "laddr": e.saddr, "lport": e.sport, "raddr": e.daddr, "rport": e.dport,
                   "tx_bytes": e.tx_bytes, "rx_bytes": e.rx_bytes,
                   "duration_ms": e.duration_ns / 1e6, "srtt_us": e.srtt_us,
                   "total_retrans": e.total_retrans, "state": e.state}
            _out(fmt.json_line(obj) if args.json else
                 fmt.tcplife_row(obj, wide=args.wide, timestamp=args.time))

    def loop(tr, stopper) -> None:
        _info("Tracing TCP sessions (printed at close)... Ctrl+C to quit.")
        if not args.json:
            _out(fmt.tcplife_header(wide=args.wide, timestamp=args.time))
        _stream(tr, stopper, handle, args.interval)

    return _run(tracer, loop, args)


def _cmd_connect(args) -> int:
    from .tracing.network import EbpfNetworkTracer
    tracer = EbpfNetworkTracer(events=("connect",), pid=args.pid, family=_family(args),
                               max_events=CLI_MAX_EVENTS)
    t0 = time.monotonic_ns()

    def handle(events) -> None:
        for e in events:
            if e.kind not in ("connect", "connect_failed"):
                continue
            if args.failures and e.kind == "connect":
                continue
            latency_ms = e.duration_ns / 1e6
            if latency_ms < args.min_ms:
                continue
            obj = {"type": "connect", "time": _epoch(e.ts_ns), "pid": e.pid, "comm": e.comm, "ip": e.family,
                   "saddr": e.saddr, "lport": e.sport, "daddr": e.daddr, "dport": e.dport,
                   "latency_ms": latency_ms,
                   "result": "ok" if e.kind == "connect" else e.reason,
                   "errno": e.err if e.kind == "connect_failed" else 0, "ts_ns": e.ts_ns}
            _out(fmt.json_line(obj) if args.json else
                 fmt.tcpconnlat_row(obj, lport=args.lport, timestamp=args.timestamp, t0_ns=t0))

    def loop(tr, stopper) -> None:
        _info(f"Tracing {'failed ' if args.failures else ''}TCP connects... Ctrl+C to quit.")
        if not args.json:
            _out(fmt.tcpconnlat_header(lport=args.lport, timestamp=args.timestamp))
        _stream(tr, stopper, handle, args.interval)

    return _run(tracer, loop, args)


def _cmd_retrans(args) -> int:
    from .tracing.network import EbpfNetworkTracer
    tracer = EbpfNetworkTracer(events=("retrans",), pid=args.pid, family=_family(args),
                               max_events=CLI_MAX_EVENTS)
    counts: dict[tuple, int] = {}

    def handle(events) -> None:
        for e in events:
            if e.kind != "retrans":
                continue
            if args.count:
                key = (e.saddr, e.sport, e.daddr, e.dport, e.family)
                counts[key] = counts.get(key, 0) + max(e.segs, 1)
                continue
            obj = {"type": "retrans", "time": _epoch(e.ts_ns), "pid": e.pid, "ip": e.family,
                   "laddr": e.saddr, "lport": e.sport, "raddr": e.daddr, "rport": e.dport,
                   "state": e.state, "segs": e.segs, "err": e.err}
            _out(fmt.json_line(obj) if args.json else
                 fmt.tcpretrans_row(dict(obj, time=time.strftime(
                     "%H:%M:%S", time.localtime(obj["time"])))))

    def print_counts() -> None:
        if not args.json:
            _out(fmt.tcpretrans_count_header())
        for (la, lp, ra, rp, ip), n in sorted(counts.items(), key=lambda kv: -kv[1]):
            if args.json:
                _out(fmt.json_line({"type": "retrans_count", "ip": ip, "laddr": la,
                                    "lport": lp, "raddr": ra, "rport": rp,
                                    "retransmits": n}))
            else:
                _out(fmt.tcpretrans_count_row(la, lp, ra, rp, n, ip))

    def loop(tr, stopper) -> None:
        _info("Tracing retransmits ... Hit Ctrl-C to end")
        if not args.json and not args.count:
            _out(fmt.tcpretrans_header())
        _stream(tr, stopper, handle, None if args.count else args.interval)
        if args.count:
            print_counts()

    return _run(tracer, loop, args)


def _cmd_memory(args) -> int:
    from .tracing.memory import EbpfMemoryTracer
    if not args.kernel and not args.pid:
        _info("sni-proxy trace memory: give -p PID (the process whose libc allocations to "
              "trace) or --kernel (kmalloc/kfree of the whole kernel)")
        return 2
    try:
        tracer = EbpfMemoryTracer(pid=args.pid, kernel=args.kernel,
                                  sample_every=args.sample_rate, min_size=args.min_size)
    except TracerError as exc:
        _info(f"sni-proxy trace memory: {exc}")
        return 2

    def show(snap) -> None:
        stacks = [{"bytes": s.bytes, "count": s.count, "pid": s.pid,
                   "stack": [_frame_text(f) for f in s.frames]} for s in snap.stacks]
        if args.json:
            for s in stacks:
                _out(fmt.json_line({"type": "memory_stack", "time": time.time(), **s,
                                    "sample_every": snap.sample_every}))
            return
        for line in fmt.memleak_lines(stacks, args.top):
            _out(line)

    def loop(tr, stopper) -> None:
        what = "kernel allocations" if args.kernel else f"allocations of pid {args.pid}"
        _info(f"Attaching to {what}, Ctrl+C to quit.")
        while not stopper.wait(args.interval):
            show(tr.snapshot(min_age_s=args.older / 1000, top=args.top))
        show(tr.snapshot(min_age_s=args.older / 1000, top=args.top))
        _report_stats(tr.stats())

    return _run(tracer, loop, args)


def _frame_text(frame) -> str:
    """`function [module]` as memleak prints it; kernel modules come bracketed already."""
    if not frame.module:
        return frame.label
    module = frame.module if frame.module.startswith("[") else f"[{frame.module}]"
    return f"{frame.label} {module}"


COMMANDS = {"syscalls": _cmd_syscalls, "tcp": _cmd_tcp, "connect": _cmd_connect,
            "retrans": _cmd_retrans, "memory": _cmd_memory}


def cli_trace(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TracerError as exc:
        _info(f"sni-proxy trace {args.command}: {exc}")
        return 1
    except BrokenPipeError:
        return 0
