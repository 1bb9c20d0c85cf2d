"""`sni-proxy trace` run for real, flag by flag (issue 12): syscalls (-p -c -i -d -T -x -e -L
-m -P), tcp (-p -L -D -4 -6), memory (-p --sample-rate --top --kernel); human tables with
bcc's columns and log2 histograms, and --json objects with exactly the documented fields.
connect and retrans run in test_tracers.py, next to their network-namespace topology.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.tracer_cli import TraceCli, json_objects

pytestmark = pytest.mark.ebpf

WORKLOADS = Path(__file__).resolve().parent / "tracer_workloads"


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture(scope="module")
def bins(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("trace-cli-bins")
    built = {}
    for name in ("syscalls_exact", "leak"):
        exe = out / name
        subprocess.run(["gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-o", str(exe),
                        str(WORKLOADS / f"{name}.c")], check=True, timeout=60)
        built[name] = str(exe)
    return built


class Workload:
    """A workload that says "w" and waits for one byte before it starts (the CLI attaches to
    its pid meanwhile)."""

    def __init__(self, argv: list[str], **kw) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)
        assert self.proc.stdout.readline() == b"w\n", argv

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self, byte: bytes = b"g") -> None:
        self.proc.stdin.write(byte)
        self.proc.stdin.flush()

    def line(self) -> bytes:
        return self.proc.stdout.readline()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# getppid, write and failing openat of tracer_workloads/syscalls_exact.c; openat once more
# for /dev/null. Nothing else runs between the tracer's attach and its exit_group (which
# never returns): the read() it waited in entered before the attach and is not counted.
N_GETPPID, N_WRITE, N_ENOENT = 3000, 200, 11
EXACT_ARGS = [str(N_GETPPID), str(N_WRITE), str(N_ENOENT)]


def _syscall_run(bins, *flags: str) -> tuple[str, str, Workload]:
    w = Workload([bins["syscalls_exact"], *EXACT_ARGS])
    try:
        cli = TraceCli("syscalls", "-p", str(w.pid), *flags)
        w.go()
        assert w.proc.wait(timeout=30) == 0
        rc, out, err = cli.stop()
    finally:
        w.close()
    assert rc == 0, err
    return out, err, w


def _table(out: str) -> dict[str, list[str]]:
    """First column -> the other columns, for the rows under a `SYSCALL` header."""
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1].isdigit():
            rows[fields[0]] = fields[1:]
    return rows


def _histograms(out: str) -> dict[str, list[tuple[int, int, int]]]:
    """`syscall = NAME` sections -> [(low, high, count)] rows of bcc's print_log2_hist."""
    hists: dict[str, list] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"syscall = (\w+)$", line)
        if m:
            current = hists.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s+(\d+) -> (\d+)\s+: (\d+)\s+\|[*+ ]*\|$", line)
        if m and current is not None:
            current.append(tuple(int(g) for g in m.groups()))
    return hists


def test_syscalls_latency_table_in_ms_with_bcc_histograms(bins):
    out, _, _ = _syscall_run(bins, "-L", "-m", "-T", "3")
    lines = out.splitlines()
    assert re.match(r"\[\d\d:\d\d:\d\d\]$", lines[0])
    assert lines[1].split() == ["SYSCALL", "COUNT", "TIME", "(ms)"]
    rows = _table(out)
    assert {k: int(v[0]) for k, v in rows.items()} == {
        "getppid": N_GETPPID, "write": N_WRITE, "openat": N_ENOENT + 1}
    for name, (_, total_ms) in rows.items():
        assert 0 < float(total_ms) < 1000, (name, total_ms)
    hists = _histograms(out)
    assert set(hists) == {"getppid", "write", "openat"}
    for name, hist in hists.items():
        assert sum(c for _, _, c in hist) == int(rows[name][0]), (name, hist)
        # bcc's buckets: 0 -> 1, 2 -> 3, 4 -> 7, ... contiguous from 0
        assert hist[0][:2] == (0, 1)
        for (lo, hi, _), (lo2, _, _) in zip(hist, hist[1:]):
            assert lo2 == hi + 1 and (lo == 0 or hi == 2 * lo - 1), hist
    assert "usecs               : count     distribution" in out


def test_syscalls_top_and_microseconds(bins):
    out, _, _ = _syscall_run(bins, "-L", "-T", "1")
    assert "TIME (us)" in out.splitlines()[1]
    rows = _table(out)
    assert len(rows) == 1            # -T 1: the one that took the most time
    (name, (count, total_us)), = rows.items()
    assert int(count) == {"getppid": N_GETPPID, "write": N_WRITE, "openat": N_ENOENT + 1}[name]
    assert float(total_us) > 0


def test_syscalls_failures_only_and_errno(bins):
    out, err, _ = _syscall_run(bins, "-x")
    assert "Tracing failed syscalls" in err
    assert {k: int(v[0]) for k, v in _table(out).items()} == {"openat": N_ENOENT}
    out, _, _ = _syscall_run(bins, "-e", "ENOENT", "--json")
    objs = json_objects(out)
    assert [(o["syscall"], o["count"], o["errors"], o["errnos"]) for o in objs] == [
        ("openat", N_ENOENT, N_ENOENT, {"ENOENT": N_ENOENT})]
    out, _, _ = _syscall_run(bins, "-e", "13", "--json")      # EACCES: none failed so
    assert json_objects(out) == []


def test_syscalls_json_with_latency_and_by_process(bins):
    out, _, _ = _syscall_run(bins, "-L", "--json")
    objs = {o["syscall"]: o for o in json_objects(out)}
    assert objs["getppid"]["count"] == N_GETPPID
    assert sum(objs["getppid"]["hist_log2_us"]) == N_GETPPID
    assert len(objs["getppid"]["hist_log2_us"]) == 32
    assert objs["openat"]["errnos"] == {"ENOENT": N_ENOENT} and objs["write"]["errors"] == 0
    out, _, w = _syscall_run(bins, "-P", "--json", "-L")
    (obj,) = json_objects(out)
    assert (obj["type"], obj["pid"]) == ("syscalls_process", w.pid)
    assert (obj["count"], obj["errors"]) == (N_GETPPID + N_WRITE + N_ENOENT + 1, N_ENOENT)
    assert obj["total_ns"] > 0
    out, _, w = _syscall_run(bins, "-P")
    header, row = out.splitlines()[1:3]
    assert header.split() == ["PID", "COMM", "COUNT"]
    assert row.split()[0] == str(w.pid) and row.split()[-1] == str(
        N_GETPPID + N_WRITE + N_ENOENT + 1)


def test_syscalls_interval_and_duration(bins):
    """-i prints and clears every interval: the intervals add up to the exact totals; -d
    ends the command by itself."""
    w = Workload([bins["syscalls_exact"], *EXACT_ARGS])
    try:
        t0 = time.monotonic()
        cli = TraceCli("syscalls", "-p", str(w.pid), "-i", "0.3", "-d", "1.5", "--json")
        w.go()
        assert w.proc.wait(timeout=30) == 0
        rc, out, err = cli.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        w.close()
    assert rc == 0, err
    assert took < 15, took                  # -d 1.5 ended it (bounded: loaded machine)
    objs = json_objects(out)
    stamps = sorted({o["time"] for o in objs})
    totals: dict[str, int] = {}
    for o in objs:
        totals[o["syscall"]] = totals.get(o["syscall"], 0) + o["count"]
    assert totals == {"getppid": N_GETPPID, "write": N_WRITE, "openat": N_ENOENT + 1}
    assert stamps, objs
    human = TraceCli("syscalls", "-p", "1", "-i", "0.2", "-d", "1")
    rc, out, _ = human.wait(timeout=30)
    assert rc == 0
    # one "[HH:MM:SS]" block per interval and one at the end
    assert len(re.findall(r"^\[\d\d:\d\d:\d\d\]$", out, re.M)) >= 4, out


def test_syscalls_cgroup_filter(bins, tmp_path):
    from sniproxy.observe.config import cgroup2_mounts

    mounts = cgroup2_mounts()
    if not mounts:
        pytest.fail("no cgroup2 hierarchy mounted: the -c test needs one")
    cg = Path(mounts[0]) / f"sni-proxy-trace-cli-{os.getpid()}"
    cg.mkdir()
    w = Workload([bins["syscalls_exact"], *EXACT_ARGS])
    try:
        (cg / "cgroup.procs").write_text(str(w.pid))
        cli = TraceCli("syscalls", "-c", str(cg), "--json")
        w.go()
        assert w.proc.wait(timeout=30) == 0
        rc, out, err = cli.stop()
    finally:
        w.close()
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.02)    # the exiting task leaves the cgroup asynchronously
    assert rc == 0, err
    totals = {o["syscall"]: o["count"] for o in json_objects(out)}
    assert totals == {"getppid": N_GETPPID, "write": N_WRITE, "openat": N_ENOENT + 1}


# -- tcp (tcplife) ------------------------------------------------------------------------------
_TCP_CLIENT = r"""
import socket, sys
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print("w", flush=True); sys.stdin.buffer.read(1)
for i in range(n):
    c = socket.create_connection((host, port)); c.sendall(b"q" * size); c.shutdown(1)
    got = 0
    while d := c.recv(65536): got += len(d)
    c.close()
print("done", flush=True)
"""


class _Server:
    """Reads each connection to EOF, answers `reply` bytes, closes (in this process)."""

    def __init__(self, host: str, reply: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"r" * self.reply)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _tcp_client(host: str, port: int, n: int, size: int) -> Workload:
    return Workload([sys.executable, "-c", _TCP_CLIENT, host, str(port), str(n), str(size)])


def test_tcp_pid_ports_and_families(tmp_path):
    """Two servers (IPv4, IPv6), clients with known sizes; each filter keeps exactly its rows,
    and each row has the right pid, ports and byte counts."""
    req, reply = 5 * 1024 + 100, 3 * 1024 + 7
    v4, v6 = _Server("127.0.0.1", reply), _Server("::1", reply)
    runs = {
        "p": TraceCli("tcp", "--json", "-p", str(os.getpid())),
        "L": TraceCli("tcp", "--json", "-L", str(v4.port)),
        "D": TraceCli("tcp", "--json", "-D", f"{v6.port},{v4.port}"),
        "4": TraceCli("tcp", "--json", "-4", "-D", f"{v4.port},{v6.port}"),
        "6": TraceCli("tcp", "-6", "-w", "-L", str(v6.port)),
    }
    expected_lines = {"p": 5, "L": 3, "D": 5, "4": 3, "6": 3}   # "6": header + 2 rows
    clients = [_tcp_client("127.0.0.1", v4.port, 3, req), _tcp_client("::1", v6.port, 2, req)]
    outs = {}
    try:
        for c in clients:
            c.go()
        for c in clients:
            assert c.line() == b"done\n"
            assert c.proc.wait(timeout=30) == 0
        for name, cli in runs.items():
            # "p" also sees this process's other sockets: its own count is checked below
            if name != "p":
                cli.wait_output(lambda out, n=expected_lines[name]: out.count("\n") >= n)
            else:
                cli.wait_output(lambda out: sum(
                    f'"lport":{port}' in line for line in out.splitlines()
                    for port in (v4.port, v6.port)) >= 5)
            rc, out, err = cli.stop()
            assert rc == 0, err
            outs[name] = out
    finally:
        for c in clients:
            c.close()
        for cli in runs.values():
            if cli.proc.poll() is None:
                cli.proc.kill()
        v4.close()
        v6.close()
    me = os.getpid()
    c4, c6 = clients[0].pid, clients[1].pid

    def rows(name):
        return json_objects(outs[name])

    # -L v4 port: the 3 server-side sockets of the IPv4 server (closed by this process)
    got = rows("L")
    assert sorted((r["pid"], r["lport"], r["ip"]) for r in got) == [(me, v4.port, 4)] * 3
    for r in got:
        assert (r["rx_bytes"], r["tx_bytes"], r["laddr"], r["raddr"]) == (
            req, reply, "127.0.0.1", "127.0.0.1"), r
    # -D both ports: the client sockets of both clients (2 + 3), with their pid and comm
    got = rows("D")
    assert sorted((r["pid"], r["rport"], r["ip"]) for r in got) == sorted(
        [(c4, v4.port, 4)] * 3 + [(c6, v6.port, 6)] * 2)
    for r in got:
        assert (r["tx_bytes"], r["rx_bytes"]) == (req, reply), r
        assert r["comm"] == Path(sys.executable).name[:15] and r["duration_ms"] > 0
    # -4 with both ports: only the IPv4 client's
    assert sorted((r["pid"], r["ip"]) for r in rows("4")) == [(c4, 4)] * 3
    # -p this process: the 5 server-side sockets it closed, none of the clients'
    mine = [r for r in rows("p") if r["lport"] in (v4.port, v6.port)]
    assert sorted((r["ip"], r["lport"]) for r in mine) == sorted(
        [(4, v4.port)] * 3 + [(6, v6.port)] * 2)
    assert all(r["pid"] == me for r in rows("p"))
    # -6 -w, human: bcc tcplife's columns, KB rounded down as bcc does
    lines = outs["6"].splitlines()
    assert lines[0].split() == ["PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT", "TX_KB",
                                "RX_KB", "MS", "SRTT_MS", "RETR"]
    body = [ln.split() for ln in lines[1:]]
    assert len(body) == 2, outs["6"]
    for f in body:
        assert (f[0], f[2], f[3], f[4]) == (str(me), "::1", str(v6.port), "::1")
        assert (f[6], f[7]) == (str(reply // 1024), str(req // 1024)) and f[10] == "0"


# -- memory (memleak) ---------------------------------------------------------------------------
def test_memory_top_stacks_exact_and_json(bins):
    w = Workload([bins["leak"], "50", "30"])
    try:
        cli = TraceCli("memory", "-p", str(w.pid), "-o", "0", "-T", "2", "--json",
                       ready="Attaching")
        w.go()
        assert w.line() == b"ready\n"
        rc, out, err = cli.stop()
        human = TraceCli("memory", "-p", str(w.pid), "-o", "0", "--top", "1",
                         ready="Attaching")
        # attached after the leaks: nothing it saw allocated is outstanding
        rc2, out2, _ = human.stop()
    finally:
        w.close()
    assert rc == 0 and rc2 == 0, err
    stacks = json_objects(out)
    # the final print (Ctrl-C) has exactly the two leaking stacks, largest first
    last = stacks[-2:]
    assert [(s["bytes"], s["count"]) for s in last] == [(20 * 5000, 20), (50 * 96, 50)]
    assert [s["stack"][:2] for s in last] == [["leak_big [leak]", "main [leak]"],
                                              ["leak_small [leak]", "main [leak]"]]
    assert all(s["pid"] == w.pid and s["sample_every"] == 1 for s in stacks)
    assert re.search(r"\] Top 1 stacks with outstanding allocations:", out2)
    assert "bytes in" not in out2


def test_memory_sample_rate(bins):
    """-s 4 records one allocation in 4 at random: of 4000 blocks leaked from leak_small,
    about 1000 are seen (binomial: sd 27; the bound is 5 sd)."""
    n = 4000
    w = Workload([bins["leak"], str(n), "3"])
    try:
        cli = TraceCli("memory", "-p", str(w.pid), "-o", "0", "--sample-rate", "4", "--json",
                       ready="Attaching")
        w.go()
        assert w.line() == b"ready\n"
        rc, out, err = cli.stop()
    finally:
        w.close()
    assert rc == 0, err
    final = [s for s in json_objects(out) if s["stack"][:1] == ["leak_small [leak]"]][-1]
    assert final["sample_every"] == 4
    assert abs(final["count"] - n / 4) <= 5 * (n * 0.25 * 0.75) ** 0.5, final
    assert final["bytes"] == 96 * final["count"]


def test_memory_kernel_mode():
    """--kernel -p: kmalloc/kfree of this process only, with kernel stacks: 50 pipes kept
    open are outstanding (their pipe_buffer arrays are kcalloc'ed in alloc_pipe_info)."""
    cli = TraceCli("memory", "--kernel", "-p", str(os.getpid()), "-o", "0", "--json",
                   ready="Attaching")
    pipes = [os.pipe() for _ in range(50)]
    try:
        rc, out, err = cli.stop()
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert rc == 0, err
    stacks = json_objects(out)
    assert stacks and all(s["pid"] == os.getpid() for s in stacks)
    pipe_stacks = [s for s in stacks if "alloc_pipe_info [kernel.kallsyms]" in s["stack"]]
    assert sum(s["count"] for s in pipe_stacks) >= 50, stacks
    assert all(f.endswith("[kernel.kallsyms]") for s in pipe_stacks for f in s["stack"])
