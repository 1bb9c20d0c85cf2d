"""Pure logic of the tracers: bcc-style formatting, event decoding, flags, config mapping."""
from __future__ import annotations

import errno
import socket

import pytest

from sniproxy.observe import trace_cli
from sniproxy.observe.config import ConfigValidationError, EbpfConfig
from sniproxy.observe.tracing import format as fmt
from sniproxy.observe.tracing.network import _EVENT, connect_failure_reason, decode_event
from sniproxy.observe.tracing.syscall_names import syscall_name, syscall_number


def test_log2_histogram_prints_as_bcc():
    # our slot s = [2^s, 2^(s+1)); bcc's index is s + 1 and its first row is "0 -> 1"
    lines = fmt.log2_hist_lines([3, 0, 5])
    assert lines == [
        "     usecs               : count     distribution",
        "         0 -> 1          : 3        |************************                |",
        "         2 -> 3          : 0        |                                        |",
        "         4 -> 7          : 5        |****************************************|",
    ]
    assert fmt.log2_hist_lines([0, 0, 0]) == []          # bcc prints nothing when empty
    stripped = fmt.log2_hist_lines([0, 0, 1], strip_leading_zero=True)
    assert len(stripped) == 2 and stripped[1].strip().startswith("4 -> 7")


def test_log2_histogram_switches_to_wide_rows_past_32_buckets():
    slots = [0] * 40
    slots[35] = 1
    lines = fmt.log2_hist_lines(slots, "nsecs")
    assert lines[0].startswith("               nsecs")
    assert lines[-1].endswith("|" + "*" * 20 + "|")


def test_stars_are_proportional_and_mark_overflow():
    assert fmt._stars(10, 10, 40) == "*" * 40
    assert fmt._stars(5, 10, 40) == "*" * 20
    assert fmt._stars(0, 10, 40) == ""
    assert fmt._stars(20, 10, 4).endswith("+")


def test_errno_names_and_numbers():
    assert fmt.parse_errno("ENOENT") == errno.ENOENT
    assert fmt.parse_errno("enoent") == errno.ENOENT
    assert fmt.parse_errno("2") == 2
    for bad in ("EFOO", "0", "5000", "ENOENT1", "PATH_MAX"):
        with pytest.raises(ValueError, match="not an errno"):
            fmt.parse_errno(bad)
    assert fmt.errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"


def test_syscall_names_both_ways():
    assert syscall_name(39, "x86_64") == "getpid"
    assert syscall_name(99999, "x86_64") == "syscall_99999"
    assert syscall_number("openat", "x86_64") == 257
    assert syscall_number("syscall_7", "x86_64") == 7


def test_syscount_columns():
    assert fmt.syscount_header(False, False, False) == "SYSCALL                   COUNT"
    assert fmt.syscount_header(True, False, False).endswith("TIME (us)")
    assert fmt.syscount_header(True, True, True).startswith("PID    COMM")
    assert fmt.syscount_row("read", 12, 3_500_000, True, False) == (
        "read                         12         3500.000")
    assert fmt.syscount_row("read", 12, 3_500_000, True, True).endswith("3.500000")


def test_tcplife_and_tcpretrans_rows():
    ev = {"pid": 42, "comm": "curl-with-a-long-name", "laddr": "10.0.0.1", "lport": 5000,
          "raddr": "10.0.0.2", "rport": 443, "tx_bytes": 4096, "rx_bytes": 1023,
          "duration_ms": 12.345, "srtt_us": 1500, "total_retrans": 2}
    header = fmt.tcplife_header().split()
    assert header[:9] == ["PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB", "RX_KB",
                          "MS"]
    row = fmt.tcplife_row(ev).split()
    assert row == ["42", "curl-with-a-", "10.0.0.1", "5000", "10.0.0.2", "443", "4", "0",
                   "12.35", "1.500", "2"]
    r = {"time": "12:00:00", "pid": 7, "ip": 6, "laddr": "::1", "lport": 1, "raddr": "::2",
         "rport": 2, "state": "ESTABLISHED"}
    assert "[::1]:1" in fmt.tcpretrans_row(r) and "R> [::2]:2" in fmt.tcpretrans_row(r)
    assert fmt.tcpretrans_count_row("1.2.3.4", 5, "6.7.8.9", 10, 3).split() == [
        "1.2.3.4:5", "6.7.8.9:10", "3"]


def test_tcpconnlat_columns_with_result():
    ev = {"pid": 1, "comm": "c", "ip": 4, "saddr": "1.1.1.1", "lport": 9, "daddr": "2.2.2.2",
          "dport": 80, "latency_ms": 20.04, "result": "refused", "ts_ns": 0}
    assert fmt.tcpconnlat_header().split() == ["PID", "COMM", "IP", "SADDR", "DADDR", "DPORT",
                                               "LAT(ms)", "RESULT"]
    assert fmt.tcpconnlat_row(ev).split()[-2:] == ["20.04", "refused"]
    assert "LPORT" in fmt.tcpconnlat_header(lport=True)
    assert fmt.tcpconnlat_row(ev, lport=True).split()[4] == "9"


def test_connect_failure_reasons():
    assert connect_failure_reason(errno.ECONNREFUSED) == "refused"
    assert connect_failure_reason(errno.ETIMEDOUT) == "timed_out"
    assert connect_failure_reason(errno.EHOSTUNREACH) == "unreachable"
    assert connect_failure_reason(errno.ENETUNREACH) == "unreachable"
    assert connect_failure_reason(errno.ECONNRESET) == "reset"
    assert connect_failure_reason(0) == "aborted"
    assert connect_failure_reason(errno.EPROTO) == "eproto"


def test_tcp_event_decoding():
    saddr = socket.inet_pton(socket.AF_INET, "10.1.2.3").ljust(16, b"\0")
    daddr = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    raw = _EVENT.pack(3, socket.AF_INET, 0, 0, 10, 11, errno.ECONNREFUSED, saddr, saddr, 1234,
                      443, 5, 6, 0, 0, 7, 0, 0, 0, 99, b"curl\0")
    ev = decode_event(raw)
    assert (ev.kind, ev.reason, ev.saddr, ev.dport, ev.comm) == (
        "connect_failed", "refused", "10.1.2.3", 443, "curl")
    raw6 = _EVENT.pack(1, socket.AF_INET6, 9, 0, 1, 1, 0, daddr, daddr, 1, 2, 0, 0, 100, 200,
                       0, 1, 0, 0, 0, b"x")
    ev6 = decode_event(raw6)
    assert (ev6.family, ev6.daddr, ev6.state, ev6.tx_bytes, ev6.rx_bytes) == (
        6, "2001:db8::1", "LAST_ACK", 100, 200)


@pytest.mark.parametrize("argv", [
    ["syscalls", "-i", "0"], ["syscalls", "-i", "99999"], ["syscalls", "-d", "0"],
    ["syscalls", "-d", "100000"], ["syscalls", "-p", "abc"], ["syscalls", "-e", "EFOO"],
    ["tcp", "-L", "70000"], ["tcp", "-4", "-6"], ["connect", "-1"], ["memory", "-s", "0"],
    ["nope"],
])
def test_bad_flags_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        trace_cli.cli_trace(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_memory_without_pid_or_kernel_is_usage_error(capsys):
    assert trace_cli.cli_trace(["memory"]) == 2
    assert "-p PID" in capsys.readouterr().err


def test_validate_covers_tracing_switches(tmp_path):
    EbpfConfig().with_pids(1, 2).validate(kernel_max_sample_rate=1000)   # profiler alone: ok
    with pytest.raises(ConfigValidationError, match="tracers follow one process"):
        EbpfConfig().with_pids(1, 2).validate(kernel_max_sample_rate=1000, tracers=True)
    EbpfConfig().with_pids(1, 2).with_network_tracing(False).with_syscall_tracing(
        False).validate(kernel_max_sample_rate=1000, tracers=True)
    with pytest.raises(ConfigValidationError, match="cgroup target cannot be memory-traced"):
        EbpfConfig().with_cgroup(tmp_path).with_memory_tracing(True).validate(
            kernel_max_sample_rate=1000, check_paths=False, tracers=True)


def test_tracers_from_config_follow_the_switches():
    from sniproxy.observe.tracing import (EbpfMemoryTracer, EbpfNetworkTracer,
                                          EbpfSyscallTracer, tracers_from_config)
    from sniproxy.observe.config import create_recommended_config

    assert tracers_from_config(create_recommended_config("production")) == []
    dev = tracers_from_config(create_recommended_config("development").with_pids(4242))
    assert [type(t) for t in dev] == [EbpfSyscallTracer, EbpfNetworkTracer, EbpfMemoryTracer]
    assert all(t.pid == 4242 for t in dev)
    staging = tracers_from_config(create_recommended_config("staging"))
    assert [type(t) for t in staging] == [EbpfSyscallTracer, EbpfNetworkTracer]
    assert staging[0].pid is None
    # max_samples bounds the syscall keys and the network events kept in user space
    bounded = tracers_from_config(create_recommended_config("staging").with_max_samples(2000))
    assert (bounded[0].max_keys, bounded[1].max_events) == (2000, 2000)


def test_missing_privileges_reads_capeff(monkeypatch):
    monkeypatch.setattr(trace_cli, "_effective_caps", lambda: 0)
    assert trace_cli.missing_privileges() == ["CAP_BPF", "CAP_PERFMON"]
    monkeypatch.setattr(trace_cli, "_effective_caps", lambda: 1 << trace_cli.CAP_SYS_ADMIN)
    assert trace_cli.missing_privileges() == []
    monkeypatch.setattr(trace_cli, "_effective_caps",
                        lambda: (1 << trace_cli.CAP_BPF) | (1 << trace_cli.CAP_PERFMON))
    assert trace_cli.missing_privileges() == []


def test_memleak_frames_and_tracer_frames_dropped():
    from sniproxy.observe.symbolize import Frame
    from sniproxy.observe.tracing.memory import _without_tracer_frames

    kernel = [Frame("bpf_prog_x_sni_proxy_mmkmb", "[bpf]", 1, 1, True),
              Frame("bpf_trace_run6", "[kernel.kallsyms]", 2, 2, True),
              Frame("alloc_fdtable", "[kernel.kallsyms]", 3, 3, True)]
    assert [f.name for f in _without_tracer_frames(kernel)] == ["alloc_fdtable"]
    assert trace_cli._frame_text(kernel[2]) == "alloc_fdtable [kernel.kallsyms]"
    assert trace_cli._frame_text(Frame("leak_big", "leak", 4, 4, False)) == "leak_big [leak]"
    lines = fmt.memleak_lines([{"bytes": 100, "count": 2, "stack": ["a [x]", "b [x]"]}], 10,
                              stamp="12:00:00")
    assert lines == ["[12:00:00] Top 10 stacks with outstanding allocations:",
                     "\t100 bytes in 2 allocations from stack", "\t\ta [x]", "\t\tb [x]"]


def test_proxy_network_tracing_is_off_by_default():
    from sniproxy.config import parse_config

    routes = [{"match": "a.example", "backend": "127.0.0.1:443"}]
    config = parse_config({"listen_addr": "127.0.0.1:8443", "routes": routes})
    assert config.ebpf.tracing.network is False
    on = parse_config({"listen_addr": "127.0.0.1:8443", "routes": routes,
                       "ebpf": {"tracing": {"network": True}}})
    assert on.ebpf.tracing.network is True and on.ebpf.enabled is False   # independent
