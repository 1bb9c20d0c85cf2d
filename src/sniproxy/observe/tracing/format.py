"""Pure formatting for `sni-proxy trace`: bcc-style tables and log2 histograms, JSON lines.

No BPF here: every function takes plain values and returns strings or dicts, so the unit
tests exercise them without a kernel.
"""
from __future__ import annotations

import errno as errno_mod
import json
import time
from collections.abc import Iterable

STARS_MAX = 40


def errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, f"E{err}")


def parse_errno(text: str) -> int:
    """"ENOENT", "enoent" or "2" -> 2; ValueError with the known names otherwise."""
    t = text.strip()
    if t.isdigit() and 0 < int(t) < 4096:
        return int(t)
    value = getattr(errno_mod, t.upper(), None)
    if isinstance(value, int) and t.upper().startswith("E"):
        return value
    raise ValueError(f"{text!r}: not an errno; give a number (1-4095) or a name such as "
                     "ENOENT, EAGAIN, ECONNREFUSED")


def _stars(val: int, val_max: int, width: int) -> str:
    """bcc table.py _stars: proportional bar, '+' when the value overflows the scale."""
    if val_max <= 0:
        return ""
    n = 0
    text = ""
    while not (n > (width * val / val_max) - 1 or n > width - 1):
        text += "*"
        n += 1
    if val > val_max:
        text = text[:-1] + "+"
    return text


def log2_hist_lines(slots: Iterable[int], val_type: str = "usecs",
                    strip_leading_zero: bool = False) -> list[str]:
    """Lines of bcc's print_log2_hist for our buckets.

    Our slot s holds values in [2^s, 2^(s+1)) (slot 0: 0 and 1); bcc's index i holds
    [2^(i-1), 2^i - 1] and prints from i = 1, so bcc index = slot + 1.
    """
    vals = [0] + list(slots)
    idx_max = -1
    val_max = 0
    for i, v in enumerate(vals):
        if v > 0:
            idx_max = i
        val_max = max(val_max, v)
    if idx_max <= 32:
        header = "     %-19s : count     distribution"
        body = "%10d -> %-10d : %-8d |%-*s|"
        stars = STARS_MAX
    else:
        header = "               %-29s : count     distribution"
        body = "%20d -> %-20d : %-8d |%-*s|"
        stars = STARS_MAX // 2
    lines = []
    if idx_max > 0:
        lines.append(header % val_type)
    for i in range(1, idx_max + 1):
        low = (1 << i) >> 1
        high = (1 << i) - 1
        if low == high:
            low -= 1
        val = vals[i]
        if strip_leading_zero and not val:
            continue
        strip_leading_zero = False
        lines.append(body % (low, high, val, stars, _stars(val, val_max, stars)))
    return lines


def clock() -> str:
    return time.strftime("%H:%M:%S")


def json_line(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False)


# -- syscalls (syscount) ----------------------------------------------------------------------
def syscount_header(latency: bool, milliseconds: bool, by_process: bool) -> str:
    col = "PID    COMM" if by_process else "SYSCALL"
    if latency:
        return "%-22s %8s %16s" % (col, "COUNT", "TIME (ms)" if milliseconds else "TIME (us)")
    return "%-22s %8s" % (col, "COUNT")


def syscount_row(label: str, count: int, total_ns: int, latency: bool,
                 milliseconds: bool) -> str:
    if latency:
        if milliseconds:
            return ("%-22s %8d %16.6f" % (label, count, total_ns / 1e6))
        return ("%-22s %8d %16.3f" % (label, count, total_ns / 1e3))
    return "%-22s %8d" % (label, count)


def process_label(pid: int, comm: str) -> str:
    return "%-6d %-15s" % (pid, comm)


# -- TCP (tcplife, tcpconnlat, tcpretrans) ---------------------------------------------------
def tcplife_header(wide: bool = False, timestamp: bool = False) -> str:
    w = 39 if wide else 15
    head = "%-8s " % "TIME" if timestamp else ""
    return head + ("%-7s %-12s %-*s %-5s %-*s %-5s %5s %5s %8s %8s %5s" % (
        "PID", "COMM", w, "LADDR", "LPORT", w, "RADDR", "RPORT", "TX_KB", "RX_KB", "MS",
        "SRTT_MS", "RETR"))


def tcplife_row(ev: dict, wide: bool = False, timestamp: bool = False) -> str:
    w = 39 if wide else 15
    head = "%-8s " % clock() if timestamp else ""
    return head + ("%-7d %-12.12s %-*s %-5d %-*s %-5d %5d %5d %8.2f %8.3f %5d" % (
        ev["pid"], ev["comm"], w, ev["laddr"], ev["lport"], w, ev["raddr"], ev["rport"],
        ev["tx_bytes"] // 1024, ev["rx_bytes"] // 1024, ev["duration_ms"],
        ev["srtt_us"] / 1000, ev["total_retrans"]))


def tcpconnlat_header(lport: bool = False, timestamp: bool = False) -> str:
    head = "%-9s " % "TIME(s)" if timestamp else ""
    if lport:
        return head + "%-6s %-12s %-2s %-16s %-6s %-16s %-5s %7s %s" % (
            "PID", "COMM", "IP", "SADDR", "LPORT", "DADDR", "DPORT", "LAT(ms)", "RESULT")
    return head + "%-6s %-12s %-2s %-16s %-16s %-5s %7s %s" % (
        "PID", "COMM", "IP", "SADDR", "DADDR", "DPORT", "LAT(ms)", "RESULT")


def tcpconnlat_row(ev: dict, lport: bool = False, timestamp: bool = False,
                   t0_ns: int = 0) -> str:
    head = "%-9.3f " % ((ev["ts_ns"] - t0_ns) / 1e9) if timestamp else ""
    result = ev["result"]
    if lport:
        return head + "%-6d %-12.12s %-2d %-16s %-6d %-16s %-5d %7.2f %s" % (
            ev["pid"], ev["comm"], ev["ip"], ev["saddr"], ev["lport"], ev["daddr"],
            ev["dport"], ev["latency_ms"], result)
    return head + "%-6d %-12.12s %-2d %-16s %-16s %-5d %7.2f %s" % (
        ev["pid"], ev["comm"], ev["ip"], ev["saddr"], ev["daddr"], ev["dport"],
        ev["latency_ms"], result)


def _endpoint(addr: str, port: int, ip: int) -> str:
    return f"[{addr}]:{port}" if ip == 6 else f"{addr}:{port}"


def tcpretrans_header() -> str:
    return "%-8s %-6s %-2s %-20s %1s> %-20s %s" % (
        "TIME", "PID", "IP", "LADDR:LPORT", "T", "RADDR:RPORT", "STATE")


def tcpretrans_row(ev: dict) -> str:
    return "%-8s %-6d %-2d %-20s %1s> %-20s %s" % (
        ev["time"], ev["pid"], ev["ip"], _endpoint(ev["laddr"], ev["lport"], ev["ip"]), "R",
        _endpoint(ev["raddr"], ev["rport"], ev["ip"]), ev["state"])


def tcpretrans_count_header() -> str:
    return "%-25s %-25s %-10s" % ("LADDR:LPORT", "RADDR:RPORT", "RETRANSMITS")


def tcpretrans_count_row(laddr: str, lport: int, raddr: str, rport: int, count: int,
                         ip: int = 4) -> str:
    return "%-25s %-25s %-10d" % (_endpoint(laddr, lport, ip), _endpoint(raddr, rport, ip),
                                  count)


# -- memory (memleak) ---------------------------------------------------------------------------
def memleak_lines(stacks: list[dict], top: int, stamp: str | None = None) -> list[str]:
    lines = ["[%s] Top %d stacks with outstanding allocations:" % (stamp or clock(), top)]
    for s in stacks:
        lines.append("\t%d bytes in %d allocations from stack" % (s["bytes"], s["count"]))
        for frame in s["stack"]:
            lines.append("\t\t" + frame)
    return lines
