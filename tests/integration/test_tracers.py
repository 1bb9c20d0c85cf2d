"""Tracers without kprobes (issue 12) against independent references, on the real kernel.

Syscalls: exact counts from C workloads and `strace -c -f`; TCP: byte counts the peers know,
netem-like delay and loss between two network namespaces of our own (this kernel has no
sch_netem: a user-space link, tracer_workloads/netem_tun.py), RetransSegs of that namespace;
memory: a C program leaking known blocks from known stacks and a Python process with
PYTHONMALLOC=malloc. Every tracer gives back its programs, maps and fds.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf

pytestmark = pytest.mark.ebpf

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "tracer_workloads"
REPO = HERE.parents[1]
SNI_PROXY = str(REPO / ".venv" / "bin" / "sni-proxy")


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture(scope="module")
def bins(tmp_path_factory) -> dict[str, str]:
    """The C workloads, compiled once with frame pointers (user stacks for memleak)."""
    out = tmp_path_factory.mktemp("tracer-bins")
    built = {}
    for src in WORKLOADS.glob("*.c"):
        exe = out / src.stem
        subprocess.run(["gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-o", str(exe), str(src)],
                       check=True, timeout=60)
        built[src.stem] = str(exe)
    return built


def _start_waiting(cmd: list[str], **kw) -> subprocess.Popen:
    """A workload that said "w" (loaded, libc mapped) and now waits for its first stdin byte,
    so a tracer can attach to its pid first."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)
    assert proc.stdout.readline() == b"w\n", cmd
    return proc


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write(b"g")
    proc.stdin.flush()


def _bpf_fds() -> int:
    """fds of this process that are BPF programs, maps or links."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:bpf"):
            n += 1
    return n


def _bpftool_ids(kind: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return {entry["id"] for entry in json.loads(out or "[]")}


# -- syscalls ---------------------------------------------------------------------------------
def test_syscall_counts_and_errnos_are_exact(bins):
    from sniproxy.observe.tracing import EbpfSyscallTracer

    proc = _start_waiting([bins["syscalls_exact"], "100000", "20000", "5000"])
    try:
        with EbpfSyscallTracer(pid=proc.pid, latency=True) as tracer:
            _go(proc)
            assert proc.wait(timeout=60) == 0
            snap = tracer.snapshot()
            overhead = tracer.get_overhead()
    finally:
        proc.kill()
    assert snap.count("getppid") == 100_000
    assert snap.count("write") == 20_000
    assert snap.errors("write") == 0
    openat = snap.by_name("openat")
    assert openat.count == 5_001                      # + the one that opened /dev/null
    assert openat.errors == 5_000
    assert openat.errnos == {errno.ENOENT: 5_000}
    # the latency histogram counts every call once
    assert sum(snap.by_name("getppid").hist) == 100_000
    assert snap.stats["counts_full"] == 0 and snap.stats["enter_lost"] == 0
    # only this process's calls: nothing else but its own few (read, exit_group never returns)
    assert snap.total <= 125_001 + 5
    assert overhead.bpf_run_count >= 2 * 125_000
    assert overhead.stats_enabled and overhead.bpf_run_time_ns > 0


def test_failures_only_and_errno_filter_in_bpf(bins):
    from sniproxy.observe.tracing import EbpfSyscallTracer

    for kwargs, expect_openat in (({"failures_only": True}, 3_000),
                                  ({"errno_filter": errno.ENOENT}, 3_000),
                                  ({"errno_filter": errno.EACCES}, 0)):
        proc = _start_waiting([bins["syscalls_exact"], "1000", "1000", "3000"])
        try:
            with EbpfSyscallTracer(pid=proc.pid, **kwargs) as tracer:
                _go(proc)
                assert proc.wait(timeout=30) == 0
                snap = tracer.snapshot()
        finally:
            proc.kill()
        assert snap.count("getppid") == 0 and snap.count("write") == 0, kwargs
        assert snap.count("openat") == expect_openat, kwargs


def _parse_strace_c(text: str) -> dict[str, tuple[int, int]]:
    """`strace -c` table -> {syscall: (calls, errors)}."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0][0].isdigit() or fields[-1] == "total":
            continue
        name = fields[-1]
        nums = fields[:-1]
        calls = int(nums[3])
        errors = int(nums[4]) if len(nums) > 4 else 0
        out[name] = (calls, errors)
    return out


CGROUP2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


@pytest.fixture
def cgroup_dir():
    """A cgroup v2 directory of our own (removed at the end; its processes have exited)."""
    from sniproxy.observe.config import cgroup2_mounts
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.fail("no cgroup2 hierarchy mounted: the -c test needs one")
    path = Path(mounts[0]) / f"sni-proxy-tracer-test-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.02)   # the last exiting task leaves the cgroup asynchronously


def test_mixed_workload_matches_strace_and_cgroup_filter(bins, tmp_path, cgroup_dir):
    """Parent and forked child in a cgroup of their own: the cgroup filter (-c) sees both,
    as `strace -c -f` does; every syscall strace counted 100+ times agrees within 1 %."""
    from sniproxy.observe.config import cgroup_id_of
    from sniproxy.observe.tracing import EbpfSyscallTracer

    if shutil.which("strace") is None:
        pytest.fail("strace is needed as the reference: apt-get install strace")
    proc = _start_waiting([bins["syscalls_mixed"], "3000"])
    (cgroup_dir / "cgroup.procs").write_text(str(proc.pid))
    summary = tmp_path / "strace.txt"
    strace = None
    try:
        with EbpfSyscallTracer(cgroup_id=cgroup_id_of(str(cgroup_dir))) as tracer:
            strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(summary), "-p",
                                       str(proc.pid)], stderr=subprocess.PIPE, text=True)
            line = strace.stderr.readline()     # strace says when it is attached
            assert "attached" in line, line
            _go(proc)
            assert proc.wait(timeout=60) == 0
            assert strace.wait(timeout=60) == 0
            snap = tracer.snapshot()
    finally:
        proc.kill()
        if strace is not None and strace.poll() is None:
            strace.kill()
    reference = _parse_strace_c(summary.read_text())
    compared = 0
    for name, (ref_calls, ref_errors) in reference.items():
        if ref_calls < 100:
            continue
        ours = snap.by_name(name)
        assert ours is not None, (name, reference)
        assert abs(ours.count - ref_calls) <= 0.01 * ref_calls, (name, ours.count, ref_calls)
        assert abs(ours.errors - ref_errors) <= 0.01 * ref_errors, (name, ours.errors, ref_errors)
        compared += 1
    assert compared >= 8, reference     # openat read fstat lseek close newfstatat getppid ...
    assert snap.errors("newfstatat", errno.ENOENT) == 6000


def test_pid_filter_ignores_a_busy_neighbour(bins):
    from sniproxy.observe.tracing import EbpfSyscallTracer

    busy = subprocess.Popen([bins["busy"]])
    proc = _start_waiting([bins["syscalls_exact"], "20000", "0", "0"])
    try:
        with EbpfSyscallTracer(pid=proc.pid) as mine, \
                EbpfSyscallTracer(by_process=True) as everyone:
            # the neighbour is busy under both tracers before the workload starts (bounded
            # wait: it is a separate process the scheduler runs when it likes)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = everyone.snapshot().by_name("getppid", tgid=busy.pid)
                if seen is not None and seen.count >= 1000:
                    break
                time.sleep(0.01)
            _go(proc)
            assert proc.wait(timeout=30) == 0
            snap = mine.snapshot()
            all_snap = everyone.snapshot()
    finally:
        busy.kill()
        busy.wait()
        proc.kill()
    assert snap.count("getppid") == 20_000
    neighbour = all_snap.by_name("getppid", tgid=busy.pid)
    assert neighbour is not None and neighbour.count >= 1000    # it was busy meanwhile
    assert all_snap.by_name("getppid", tgid=proc.pid).count == 20_000


# -- TCP ----------------------------------------------------------------------------------------
def test_tcp_rows_have_exact_bytes_for_200_connections():
    """Client and server (this process, loopback) each count what they sent: every row of
    both ends carries those numbers, in both directions."""
    from sniproxy.observe.tracing import EbpfNetworkTracer

    n = 200
    sizes = {i: (1000 + 37 * i, 500 + 11 * i) for i in range(n)}   # (request, reply)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(n)
    port = srv.getsockname()[1]
    served: dict[int, tuple[int, int]] = {}      # client port -> (received, sent)

    def serve() -> None:
        for _ in range(n):
            conn, peer = srv.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                i = int(data[:8])
                reply = b"r" * sizes[i][1]
                conn.sendall(reply)
                served[peer[1]] = (len(data), len(reply))

    sent: dict[int, tuple[int, int]] = {}        # client port -> (sent, received)
    with EbpfNetworkTracer(events=("close", "connect"), pid=os.getpid()) as tracer:
        server = threading.Thread(target=serve)
        server.start()
        for i in range(n):
            with socket.create_connection(("127.0.0.1", port)) as c:
                request = b"%08d" % i + b"q" * (sizes[i][0] - 8)
                c.sendall(request)
                c.shutdown(socket.SHUT_WR)
                got = 0
                while chunk := c.recv(65536):
                    got += len(chunk)
                sent[c.getsockname()[1]] = (len(request), got)
        server.join(timeout=30)
        srv.close()

        def ours(snap):
            return [e for e in snap.of_kind("close") if port in (e.sport, e.dport)]
        snap = tracer.wait_for(lambda s: len(ours(s)) >= 2 * n, timeout_s=20)
    rows = ours(snap)
    assert len(rows) == 2 * n, (len(rows), snap.stats)
    assert snap.dropped == 0 and snap.stats["ring_full"] == 0
    client_rows = {e.sport: e for e in rows if e.dport == port}
    server_rows = {e.dport: e for e in rows if e.sport == port}
    assert set(client_rows) == set(sent) == set(server_rows) == set(served)
    for cport, (tx, rx) in sent.items():
        c, s = client_rows[cport], server_rows[cport]
        assert (c.tx_bytes, c.rx_bytes) == (tx, rx), (c, tx, rx)
        assert (s.tx_bytes, s.rx_bytes) == (served[cport][1], served[cport][0]) == (rx, tx)
        assert c.pid == s.pid == os.getpid()
        assert c.comm == s.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        assert c.saddr == c.daddr == "127.0.0.1" and c.duration_ns > 0 and c.srtt_us > 0
        assert (s.saddr, s.daddr, s.sport, s.dport) == ("127.0.0.1", "127.0.0.1", port, cport)
        assert c.family == s.family == 4 and c.total_retrans == s.total_retrans == 0
        assert c.state == "FIN_WAIT2" and s.state == "LAST_ACK"    # who closed first
        assert c.err == s.err == 0 and s.duration_ns > 0 and s.srtt_us > 0
    connects = [e for e in snap.of_kind("connect") if e.dport == port]
    assert len(connects) == n


# A topology of our own: client namespace A, server namespace B, linked by two TUN devices
# and tracer_workloads/netem_tun.py in between (this kernel has no sch_netem: the script
# delays and drops A -> B packets as `tc netem delay/loss` on A's egress would). B also routes
# (ip_forward) two extra addresses: a blackhole (SYNs vanish) and an unreachable one (B
# answers ICMP host unreachable).
NET = "10.213.%d" % (os.getpid() % 200 + 20)
CLIENT_IP, SERVER_IP = f"{NET}.1", f"{NET}.2"
BLACKHOLE_IP, UNREACHABLE_IP = f"{NET}.98", f"{NET}.99"
SERVER_PORT = 18443


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def netns_pair():
    tag = f"{os.getpid() % 100000}"
    a, b = f"sptrA{tag}", f"sptrB{tag}"
    ta, tb = f"sptra{tag}", f"sptrb{tag}"
    link = server = None
    try:
        _ip("ip", "netns", "add", a)
        _ip("ip", "netns", "add", b)
        link = subprocess.Popen(["ip", "netns", "exec", a, sys.executable,
                                 str(WORKLOADS / "netem_tun.py"), ta, tb, b],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert link.stdout.readline().strip() == "ready"
        _ip("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", ta, ns=a)
        _ip("ip", "addr", "add", f"{SERVER_IP}/24", "dev", tb, ns=b)
        for ns, dev in ((a, ta), (b, tb)):
            _ip("ip", "link", "set", dev, "up", ns=ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
        _ip("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=b)
        _ip("ip", "route", "add", "blackhole", f"{BLACKHOLE_IP}/32", ns=b)
        _ip("ip", "route", "add", "unreachable", f"{UNREACHABLE_IP}/32", ns=b)
        server = subprocess.Popen(
            ["ip", "netns", "exec", b, sys.executable, "-c", _SINK_SERVER, SERVER_IP,
             str(SERVER_PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "listening"
        yield {"client_ns": a, "server_ns": b, "link": link, "client_dev": ta}
    finally:
        for proc in (server, link):
            if proc is not None:
                proc.kill()
                proc.wait()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# Server in B: reads each connection to EOF, answers with the byte count, closes.
_SINK_SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(512)
print("listening", flush=True)
def handle(c):
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d: break
        n += len(d)
    c.sendall(str(n).encode()); c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""

# Client in A: argv = cases; prints one JSON line of what it saw.
_CLIENT = r"""
import ctypes, json, socket, sys, time
out = {}
def connect(ip, port, user_timeout_ms=None, abort_after=None):
    s = socket.socket()
    if user_timeout_ms:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    if abort_after is not None:
        s.setblocking(False)
        try: s.connect((ip, port))
        except BlockingIOError: pass
        time.sleep(abort_after); s.close(); return "aborted"
    s.settimeout(10)
    try:
        s.connect((ip, port)); return s
    except OSError as e:
        s.close(); return e.errno
for case in sys.argv[1:]:
    kind, _, arg = case.partition(":")
    if kind == "ok":
        lat = []
        for _ in range(int(arg)):
            t = time.monotonic(); s = connect(SERVER, PORT); lat.append(time.monotonic() - t)
            s.close()
        out["ok"] = lat
    elif kind == "send":
        s = connect(SERVER, PORT); s.sendall(b"x" * int(arg)); s.shutdown(socket.SHUT_WR)
        out["send"] = [s.getsockname()[1], int(s.recv(100))]; s.close()
    elif kind == "ss":
        # the kernel's view of a fresh connection, as `ss -ti` prints it (rtt:SRTT/RTTVAR ms)
        import re, subprocess
        s = connect(SERVER, PORT); sport = s.getsockname()[1]
        text = subprocess.run(["ss", "-tinH", "dst", SERVER, "sport", "=", f":{sport}"],
                              capture_output=True, text=True, timeout=10).stdout
        out["ss"] = [sport, float(re.search(r"\brtt:([\d.]+)/", text).group(1))]
        s.close()
    elif kind == "refused":
        out["refused"] = connect(SERVER, 1)
    elif kind == "timeout":
        out["timeout"] = connect(BLACKHOLE, PORT, user_timeout_ms=500)
    elif kind == "unreachable":
        out["unreachable"] = connect(UNREACHABLE, PORT)
    elif kind == "aborted":
        out["aborted"] = connect(BLACKHOLE, PORT, abort_after=0.2)
    elif kind == "reset":
        # connect(AF_UNSPEC) while the SYN is unanswered: the kernel disconnects the socket
        # (tcp_disconnect) and the application reads ECONNRESET from SO_ERROR
        s = socket.socket(); s.setblocking(False)
        try: s.connect((BLACKHOLE, PORT))
        except BlockingIOError: pass
        time.sleep(0.1)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.connect(s.fileno(), (ctypes.c_ubyte * 16)(), 16) == 0
        out["reset"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR); s.close()
    elif kind == "spin":
        # arg: CPU/DST/PORT/SRC,SRC,...: on that CPU, connect from each source address,
        # reading SO_ERROR in a busy loop (sock_error() clears sk_err as it reads it); "early":
        # the error was taken while the socket was still SYN_SENT, before the kernel's close ran
        # "soft": the ICMP came while this process held the socket lock (preempted inside
        # connect() on a loaded machine): the kernel then keeps the error in sk_err_soft and
        # does not close the socket; SO_ERROR hands that out too (and clears it), and the
        # close that follows is this process's own, with no error left in the socket. Seen
        # as TcpExt LockDroppedIcmps moving in this namespace.
        import os
        def lock_dropped_icmps():
            with open("/proc/net/netstat") as f:
                lines = [ln.split() for ln in f if ln.startswith("TcpExt:")]
            return int(lines[1][lines[0].index("LockDroppedIcmps")])
        cpu, dst, port, sources = arg.split("/")
        os.sched_setaffinity(0, {int(cpu)})
        errors, early, soft = [], 0, []
        for src in sources.split(","):
            dropped = lock_dropped_icmps()
            s = socket.socket(); s.bind((src, 0)); s.setblocking(False)
            try: s.connect((dst, int(port)))
            except BlockingIOError: pass
            end = time.monotonic() + 5
            e = 0
            while not e and time.monotonic() < end:
                e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            state = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            soft.append(lock_dropped_icmps() != dropped)
            early += e != 0 and state == 2 and not soft[-1]   # TCP_SYN_SENT
            errors.append(e); s.close()
            if early >= 3:
                break
        out["spin"] = [errors, early, soft]
print(json.dumps(out), flush=True)
"""


def _client(netns: dict, *cases: str, timeout: float = 60) -> dict:
    code = (f"SERVER, PORT, BLACKHOLE, UNREACHABLE = {SERVER_IP!r}, {SERVER_PORT}, "
            f"{BLACKHOLE_IP!r}, {UNREACHABLE_IP!r}\n" + _CLIENT)
    done = subprocess.run(["ip", "netns", "exec", netns["client_ns"], sys.executable, "-c",
                           code, *cases], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _netem(netns: dict, delay_ms: float = 0, loss_percent: float = 0) -> None:
    """Set the A -> B delay and loss of the user-space netem link (answered "ok" each)."""
    link = netns["link"]
    link.stdin.write(f"delay {delay_ms}\nloss {loss_percent}\n")
    link.stdin.flush()
    assert link.stdout.readline().strip() == "ok"
    assert link.stdout.readline().strip() == "ok"


def test_connect_latency_under_netem_delay(netns_pair):
    from sniproxy.observe.tracing import EbpfNetworkTracer

    _netem(netns_pair, delay_ms=20)
    # sch_netem sends a delayed packet from a kernel timer, on time whatever else runs; the
    # user-space link is a process the scheduler may leave waiting behind busy ones (two busy
    # loops on 2 CPUs made its median connect 22.9 ms). A real-time priority, for this test
    # only, keeps it on time as the wire it stands for: the tracer is what is measured here.
    link_pid = netns_pair["link"].pid
    os.sched_setscheduler(link_pid, os.SCHED_FIFO, os.sched_param(10))
    try:
        with EbpfNetworkTracer(events=("connect",), remote_ports=[SERVER_PORT]) as tracer:
            seen = _client(netns_pair, "ok:10", "ss")
            snap = tracer.wait_for(lambda s: len(s.of_kind("connect")) >= 11, timeout_s=10)
    finally:
        os.sched_setscheduler(link_pid, os.SCHED_OTHER, os.sched_param(0))
    mine = [e for e in snap.of_kind("connect") if e.saddr == CLIENT_IP]
    assert len(mine) == 11
    # the last one against `ss -ti`'s rtt of the same socket, both within 2 ms of 20 ms
    ss_port, ss_rtt_ms = seen["ss"]
    (checked,) = [e for e in mine if e.sport == ss_port]
    assert abs(checked.duration_ns / 1e6 - ss_rtt_ms) <= 2.0, (checked, ss_rtt_ms)
    assert abs(ss_rtt_ms - 20.0) <= 2.0, ss_rtt_ms
    mine.remove(checked)
    latencies = sorted(e.duration_ns / 1e6 for e in mine)
    # The SYN waits 20 ms on the link: the typical connect is within 2 ms of that (the link
    # is a user-space process, so one connect can be late when the machine is busy) ...
    assert 20.0 <= latencies[len(latencies) // 2] <= 22.0, latencies
    for e, user_s in zip(mine, seen["ok"]):
        assert e.duration_ns / 1e6 >= 20.0, e
        # ... each one agrees with the kernel's own RTT sample of that handshake (what
        # `ss -ti` shows as rtt) within 2 ms, and is below what the client measured around
        # connect() (its syscall and wake-up add to it)
        assert abs(e.duration_ns / 1e3 - e.srtt_us) <= 2000, e
        assert e.duration_ns / 1e9 <= user_s + 0.001


def test_connect_failures_carry_their_reason(netns_pair):
    from sniproxy.observe.tracing import EbpfNetworkTracer

    _netem(netns_pair, delay_ms=1)
    with EbpfNetworkTracer(events=("connect",)) as tracer:
        seen = _client(netns_pair, "refused", "unreachable", "timeout", "aborted", "reset")

        def failed(s):
            return [e for e in s.of_kind("connect_failed") if e.saddr in (CLIENT_IP, "0.0.0.0")
                    and e.daddr in (SERVER_IP, BLACKHOLE_IP, UNREACHABLE_IP)]
        snap = tracer.wait_for(lambda s: len(failed(s)) >= 5, timeout_s=10)
    # what each application saw (connect()'s errno, SO_ERROR) ...
    assert seen == {"refused": errno.ECONNREFUSED, "unreachable": errno.EHOSTUNREACH,
                    "timeout": errno.ETIMEDOUT, "aborted": "aborted",
                    "reset": errno.ECONNRESET}
    # ... is what the tracer reports, in the order the client made them
    got = [(e.daddr, e.dport, e.reason, e.err) for e in failed(snap)]
    assert got == [(SERVER_IP, 1, "refused", errno.ECONNREFUSED),
                   (UNREACHABLE_IP, SERVER_PORT, "unreachable", errno.EHOSTUNREACH),
                   (BLACKHOLE_IP, SERVER_PORT, "timed_out", errno.ETIMEDOUT),
                   (BLACKHOLE_IP, SERVER_PORT, "aborted", 0),
                   (BLACKHOLE_IP, SERVER_PORT, "reset", errno.ECONNRESET)], got


def test_connect_reason_when_the_application_took_the_error_first(netns_pair):
    """sk_err is read-and-cleared by SO_ERROR without the socket lock: an application reading
    it on another CPU can take an ICMP error between the kernel storing it and the state
    change the tracer sees, where it reads 0. The reason must still be unreachable (it came
    out as reset: tcp_disconnect's ECONNRESET is also stored after the change). A RST and
    the SYN timer close through the same race, but their window is a few instructions (the
    ICMP's includes freeing the SYN) and each timer try costs a 1 s SYN RTO: not tested so."""
    from sniproxy.observe.tracing import EbpfNetworkTracer

    _netem(netns_pair, delay_ms=1)
    # One source address per connect: B rate-limits the ICMP errors it sends per destination
    # (ip_error and icmp_send share one token bucket: about two at once, then one per 2 s).
    sources = [f"{NET}.{i}" for i in range(100, 200)]
    subprocess.run(["ip", "-n", netns_pair["client_ns"], "-force", "-batch", "-"], text=True,
                   input="".join(f"addr replace {src}/32 dev {netns_pair['client_dev']}\n"
                                 for src in sources), capture_output=True, timeout=30, check=True)
    # The race needs the application to run while the link process (in whose context the
    # ICMP error is received) closes the socket: one CPU each, else the scheduler may well
    # put them on one and the application never reads at the wrong moment.
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "this race needs two CPUs"
    link_pid = netns_pair["link"].pid
    link_cpus = os.sched_getaffinity(link_pid)
    os.sched_setaffinity(link_pid, {cpus[0]})
    try:
        with EbpfNetworkTracer(events=("connect",), remote_ports=[SERVER_PORT]) as tracer:
            errors, early, soft = _client(netns_pair, f"spin:{cpus[1]}/{UNREACHABLE_IP}/{SERVER_PORT}/"
                                                      + ",".join(sources))["spin"]

            def failed(s):
                return [e for e in s.of_kind("connect_failed") if e.daddr == UNREACHABLE_IP]
            snap = tracer.wait_for(lambda s: len(failed(s)) >= len(errors), timeout_s=10)
    finally:
        os.sched_setaffinity(link_pid, link_cpus)
    assert errors == [errno.EHOSTUNREACH] * len(errors)
    # the race happened (about one connect in ten on an idle 2-CPU machine; the client stops
    # after three), else this test proved nothing
    assert early >= 1, f"no error taken before the close in {len(errors)} connects"
    got = [(e.saddr, e.reason, e.err) for e in failed(snap)]
    # A soft error taken by the application (see the client) leaves nothing in the socket for
    # the tracer: the application's close of a connecting socket is "aborted" (seen once in
    # a suite run with busy loops, I/O and memory churn), unless the SYN's retry brought the
    # error again before the application read it.
    assert len(got) == len(errors), (got, errors)
    for row, src, was_soft in zip(got, sources, soft):
        allowed = [(src, "unreachable", errno.EHOSTUNREACH)] + ([(src, "aborted", 0)] if was_soft else [])
        assert row in allowed, (got, soft)


def _retrans_segs(netns: dict) -> int:
    text = _ip("cat", "/proc/net/snmp", ns=netns["client_ns"]).stdout
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("Tcp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RetransSegs")])


def test_retransmits_equal_retranssegs_under_netem_loss(netns_pair):
    from sniproxy.observe.tracing import EbpfNetworkTracer

    _netem(netns_pair, loss_percent=5)
    try:
        before = _retrans_segs(netns_pair)
        with EbpfNetworkTracer(events=("retrans", "close")) as tracer:
            seen = _client(netns_pair, "send:2000000", timeout=120)
            port = seen["send"][0]

            def closed(snap):
                return [e for e in snap.of_kind("close")
                        if (e.saddr, e.sport) == (CLIENT_IP, port)]
            # A lost FIN is retransmitted after the client exited; once the socket's close
            # row is out (TIME_WAIT or CLOSE), it cannot retransmit any more.
            snap = tracer.wait_for(lambda s: bool(closed(s)), timeout_s=60)
            after = _retrans_segs(netns_pair)
            snap = tracer.snapshot()
    finally:
        _netem(netns_pair, delay_ms=1)
    assert seen["send"][1] == 2_000_000
    mine = [e for e in snap.of_kind("retrans") if e.saddr == CLIENT_IP]
    delta = after - before
    assert delta > 0, "5 % loss on 2 MB should retransmit something"
    assert sum(max(e.segs, 1) for e in mine) == delta, (len(mine), delta)
    flows = snap.retrans_by_flow()
    assert sum(n for (s, _, _, _), n in flows.items() if s == CLIENT_IP) == delta
    # the session's row at close carries the same figure (tcp_sock.total_retrans) and its
    # exact byte count
    (row,) = closed(snap)
    assert row.total_retrans == delta and row.tx_bytes == 2_000_000, row


# -- memory -------------------------------------------------------------------------------------
def test_memory_outstanding_bytes_and_stacks_are_exact(bins):
    from sniproxy.observe.tracing import EbpfMemoryTracer

    small_n, big_n = 50, 30
    proc = _start_waiting([bins["leak"], str(small_n), str(big_n)])
    try:
        with EbpfMemoryTracer(pid=proc.pid) as tracer:
            t_go = time.monotonic()
            _go(proc)
            assert proc.stdout.readline() == b"ready\n"
            t_ready = time.monotonic()
            snap = tracer.snapshot(top=10)
            overhead = tracer.get_overhead()
            # the age filter (memleak -o): every block was allocated between t_go and
            # t_ready, so an age a little below now - t_ready keeps them all and one above
            # now - t_go keeps none
            old_enough = tracer.snapshot(min_age_s=time.monotonic() - t_ready - 0.001)
            too_young = tracer.snapshot(min_age_s=time.monotonic() - t_go + 0.5)
        proc.stdin.write(b"x")
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    leaks = {s.frames[0].name: s for s in snap.stacks if s.frames}
    small, big = leaks["leak_small"], leaks["leak_big"]
    assert (small.count, small.bytes) == (small_n, small_n * 96)
    assert (big.count, big.bytes) == (2 * big_n // 3, 2 * big_n // 3 * 5000)
    for stack in (small, big):
        assert [f.name for f in stack.frames[1:2]] == ["main"]
        assert stack.frames[0].module == "leak"
    # realloc chains and posix_memalign were freed: nothing else is outstanding
    assert snap.total_bytes == small.bytes + big.bytes, snap.stacks
    assert snap.stats["allocs_full"] == 0 and snap.stats["stacks_lost"] == 0
    assert overhead.bpf_run_count > 0
    assert old_enough.total_bytes == snap.total_bytes and too_young.total_bytes == 0
    assert too_young.stacks == []


_PY_LEAK = r"""
import sys
kept = []
print("w", flush=True)
sys.stdin.buffer.read(1)
for _ in range(200):
    kept.append(bytes(10000))        # PYTHONMALLOC=malloc: each is one malloc(10033)
print("leaked", flush=True)
sys.stdin.buffer.read(1)
"""


def test_python_leak_is_visible_with_pythonmalloc_malloc():
    from sniproxy.observe.tracing import EbpfMemoryTracer

    env = dict(os.environ, PYTHONMALLOC="malloc")
    proc = _start_waiting([sys.executable, "-c", _PY_LEAK], env=env)
    try:
        with EbpfMemoryTracer(pid=proc.pid, min_size=10000) as tracer:
            baseline = tracer.snapshot().total_bytes
            _go(proc)
            assert proc.stdout.readline() == b"leaked\n"
            snap = tracer.snapshot(top=5)
    finally:
        proc.kill()
        proc.wait()
    size = sys.getsizeof(bytes(10000))
    assert baseline == 0
    assert snap.total_count == 200 and snap.total_bytes == 200 * size, snap.stacks
    assert snap.stacks[0].bytes == 200 * size
    # symbolized at the allocation site: CPython's bytes constructor in libpython (Debian's
    # libpython has no frame pointers, so the user stack walk ends a frame or two above it)
    leaf = snap.stacks[0].frames[0]
    assert "bytes" in leaf.name.lower() and "python" in leaf.module, snap.stacks[0].frames


def test_kernel_mode_sees_kmalloc():
    from sniproxy.observe.tracing import EbpfMemoryTracer

    with EbpfMemoryTracer(kernel=True, pid=os.getpid()) as tracer:
        socks = [socket.socket() for _ in range(50)]     # each socket kmallocs
        snap = tracer.snapshot(top=3)
        for s in socks:
            s.close()
    assert tracer.hook_mode in ("tp_btf", "raw_tp")
    assert snap.stats["allocs"] > 0
    assert snap.stacks and snap.stacks[0].frames and snap.stacks[0].frames[0].kernel


# -- release and CLI ---------------------------------------------------------------------------
def test_every_tracer_releases_programs_maps_and_fds(bins):
    from sniproxy.observe.tracing import (EbpfMemoryTracer, EbpfNetworkTracer,
                                          EbpfSyscallTracer)

    proc = _start_waiting([bins["leak"], "1", "3"])
    try:
        fds0 = _bpf_fds()
        for make in (lambda: EbpfSyscallTracer(pid=proc.pid, latency=True),
                     lambda: EbpfNetworkTracer(),
                     lambda: EbpfMemoryTracer(pid=proc.pid)):
            tracer = make()
            tracer.start()
            progs, maps = set(tracer.program_ids), set(tracer.map_ids)
            assert progs <= _bpftool_ids("prog") and maps <= _bpftool_ids("map")
            assert _bpf_fds() > fds0
            tracer.stop()
            assert _bpf_fds() == fds0, tracer.NAME
            # the kernel frees programs and maps after an RCU grace period (deferred work):
            # no event to wait on, so poll bpftool with a deadline
            deadline = time.monotonic() + 10
            while (progs & _bpftool_ids("prog") or maps & _bpftool_ids("map")) and \
                    time.monotonic() < deadline:
                time.sleep(0.05)
            assert not progs & _bpftool_ids("prog"), tracer.NAME
            assert not maps & _bpftool_ids("map"), tracer.NAME
            tracer.stop()       # idempotent
            assert tracer.snapshot() is not None   # the final snapshot stays readable
    finally:
        proc.kill()


def test_btf_layout_of_shared_structs_matches_python():
    from sniproxy.ebpf.objects import object_path
    from sniproxy.observe.tracing import memory, network, syscalls

    # (struct tcp_event lives only behind ring-buffer pointers, so the compiler keeps no BTF
    # for it; its layout is proven by the TCP tests decoding every field right.)
    assert network._EVENT.size == 128
    expected = {("sni_proxy_trace_syscalls", "sc_value"): syscalls._VALUE.size,
                ("sni_proxy_trace_syscalls", "sc_key"): syscalls._KEY.size,
                ("sni_proxy_trace_syscalls", "sc_errkey"): syscalls._ERRKEY.size,
                ("sni_proxy_trace_syscalls", "sc_hist"): syscalls._HIST.size,
                ("sni_proxy_trace_memory", "mem_alloc"): memory._ALLOC.size}
    for (obj, struct_name), size in expected.items():
        dump = subprocess.run(["bpftool", "btf", "dump", "file", str(object_path(obj))],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        found = re.search(rf"STRUCT '{struct_name}' size=(\d+)", dump)
        assert found and int(found.group(1)) == size, (obj, struct_name, size)


def test_cli_syscalls_json_and_missing_privileges(bins):
    proc = _start_waiting([bins["syscalls_exact"], "3000", "0", "7"])
    cli = subprocess.Popen([SNI_PROXY, "trace", "syscalls", "-p", str(proc.pid), "--json",
                            "-d", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert "Tracing syscalls" in cli.stderr.readline()     # attached
        _go(proc)
        assert proc.wait(timeout=30) == 0
        cli.send_signal(2)                                      # Ctrl-C: print and exit
        out, err = cli.communicate(timeout=30)
    finally:
        proc.kill()
        cli.kill()
    assert cli.returncode == 0, err
    rows = {r["syscall"]: r for r in map(json.loads, out.splitlines())}
    assert rows["getppid"]["count"] == 3000
    assert rows["openat"]["errnos"] == {"ENOENT": 7}

    denied = subprocess.run(
        ["setpriv", "--inh-caps=-bpf,-perfmon,-sys_admin",
         "--bounding-set=-bpf,-perfmon,-sys_admin", SNI_PROXY, "trace", "tcp", "-d", "1"],
        capture_output=True, text=True, timeout=30)
    assert denied.returncode == 1
    assert "CAP_BPF" in denied.stderr and "setcap" in denied.stderr


def test_raw_tp_fallback_programs_count_the_same(bins):
    """The raw_tp twins (loaded where tp_btf is refused) give the same exact figures."""
    from sniproxy.observe.tracing import EbpfNetworkTracer, EbpfSyscallTracer

    proc = _start_waiting([bins["syscalls_exact"], "5000", "100", "10"])
    try:
        tracer = EbpfSyscallTracer(pid=proc.pid)
        tracer.hook_order = ("raw_tp",)
        with tracer:
            assert tracer.hook_mode == "raw_tp"
            _go(proc)
            assert proc.wait(timeout=30) == 0
            snap = tracer.snapshot()
    finally:
        proc.kill()
    assert (snap.count("getppid"), snap.count("write"), snap.errors("openat", errno.ENOENT)) \
        == (5000, 100, 10)
    net = EbpfNetworkTracer(events=("close",), pid=os.getpid())
    net.hook_order = ("raw_tp",)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    with net:
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = srv.accept()
        c.sendall(b"x" * 1234)
        assert len(a.recv(4096)) == 1234
        a.close()
        c.close()
        snap = net.wait_for(lambda s: len([e for e in s.of_kind("close")
                                           if port in (e.sport, e.dport)]) == 2, timeout_s=10)
    srv.close()
    rows = {e.sport: e for e in snap.of_kind("close") if port in (e.sport, e.dport)}
    assert net.hook_mode == "raw_tp"
    assert rows[port].rx_bytes == 1234 and rows[port].tx_bytes == 0


def test_overhead_report_sums_profiler_and_tracers():
    from sniproxy.observe.config import EbpfConfig
    from sniproxy.observe.profiler import EbpfCpuProfiler
    from sniproxy.observe.tracing import EbpfSyscallTracer, overhead_report

    with EbpfCpuProfiler(EbpfConfig().with_current_process().with_sample_rate(49)) as prof, \
            EbpfSyscallTracer(pid=os.getpid()) as tracer:
        for _ in range(2000):
            os.getppid()
        report = overhead_report(prof, (tracer,))
    names = [p["name"] for p in report["parts"]]
    assert names == ["cpu profiler", "syscall tracer"]
    assert report["cpu_percent"] == pytest.approx(sum(p["cpu_percent"] for p in report["parts"]))
    assert report["parts"][1]["bpf_run_time_ns"] > 0


# -- the connect and retrans commands, run for real over the same topology ---------------------
def test_cli_connect_reports_each_reason(netns_pair):
    from tests.integration.tracer_cli import TraceCli, json_objects

    _netem(netns_pair, delay_ms=1)
    cli = TraceCli("connect", "--json")
    human = TraceCli("connect", "-x", "-L")
    slow = TraceCli("connect", "50", "--json")      # MIN_MS: only what took 50 ms or more
    try:
        _client(netns_pair, "ok:2", "refused", "unreachable", "timeout", "aborted", "reset")
        wanted = (SERVER_IP, BLACKHOLE_IP, UNREACHABLE_IP)
        for c, n in ((cli, 7), (human, 5), (slow, 3)):
            c.wait_output(lambda out, n=n: sum(ip in line for line in out.splitlines()
                                               for ip in wanted) >= n)
    finally:
        rc, out, err = cli.stop()
        rc2, out2, err2 = human.stop()
        rc3, out3, err3 = slow.stop()
    assert rc == 0 and rc2 == 0 and rc3 == 0, err + err2 + err3
    # 1 ms link: the ok/refused/unreachable ones are fast; the blackholed one waited 500 ms
    # (TCP_USER_TIMEOUT), the aborted one 200 ms, the reset one 100 ms
    assert [o["result"] for o in json_objects(out3) if o["daddr"] in wanted] == [
        "timed_out", "aborted", "reset"]
    rows = [o for o in json_objects(out) if o["daddr"] in wanted]
    assert [(o["daddr"], o["dport"], o["result"], o["errno"]) for o in rows] == [
        (SERVER_IP, SERVER_PORT, "ok", 0), (SERVER_IP, SERVER_PORT, "ok", 0),
        (SERVER_IP, 1, "refused", errno.ECONNREFUSED),
        (UNREACHABLE_IP, SERVER_PORT, "unreachable", errno.EHOSTUNREACH),
        (BLACKHOLE_IP, SERVER_PORT, "timed_out", errno.ETIMEDOUT),
        (BLACKHOLE_IP, SERVER_PORT, "aborted", 0),
        (BLACKHOLE_IP, SERVER_PORT, "reset", errno.ECONNRESET)]
    for o in rows:
        assert o["saddr"] == CLIENT_IP and o["ip"] == 4 and o["comm"].startswith("python")
        assert o["lport"] > 0 and o["latency_ms"] > 0
    # human, -x -L: tcpconnlat's columns plus LPORT and RESULT, failures only
    lines = out2.splitlines()
    assert lines[0].split() == ["PID", "COMM", "IP", "SADDR", "LPORT", "DADDR", "DPORT",
                                "LAT(ms)", "RESULT"]
    body = [ln.split() for ln in lines[1:] if any(ip in ln for ip in wanted)]
    assert [(f[5], f[8]) for f in body] == [
        (SERVER_IP, "refused"), (UNREACHABLE_IP, "unreachable"), (BLACKHOLE_IP, "timed_out"),
        (BLACKHOLE_IP, "aborted"), (BLACKHOLE_IP, "reset")]


def _quiet_flows(netns: dict) -> bool:
    """No socket of the client namespace towards the server is left that could retransmit
    (TIME_WAIT ones cannot)."""
    out = _ip("ss", "-tanH", ns=netns["client_ns"]).stdout
    return not [ln for ln in out.splitlines()
                if f"{SERVER_IP}:{SERVER_PORT}" in ln and not ln.startswith("TIME-WAIT")]


def test_cli_retrans_count_equals_retranssegs(netns_pair):
    """`retrans -c` under 5 % loss: the per-flow counts add up to the namespace's RetransSegs
    delta; the streaming form prints one row per retransmit with tcpretrans's columns."""
    from tests.integration.tracer_cli import TraceCli, json_objects

    _netem(netns_pair, loss_percent=5)
    try:
        before = _retrans_segs(netns_pair)
        counting = TraceCli("retrans", "-c", "--json")
        streaming = TraceCli("retrans")
        try:
            seen = _client(netns_pair, "send:1000000", timeout=120)
            # a lost FIN is retransmitted after the client exited: wait until nothing of
            # the client's is left but TIME_WAIT (bounded)
            deadline = time.monotonic() + 30
            while not _quiet_flows(netns_pair) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _quiet_flows(netns_pair)
            after = _retrans_segs(netns_pair)
            streaming.wait_output(lambda out: out.count(f"{CLIENT_IP}:") >= 1)
        finally:
            rc, out, err = counting.stop()
            rc2, out2, err2 = streaming.stop()
    finally:
        _netem(netns_pair, delay_ms=1)
    assert rc == 0 and rc2 == 0, err + err2
    assert seen["send"][1] == 1_000_000
    delta = after - before
    assert delta > 0, "5 % loss on 1 MB should retransmit something"
    flows = [o for o in json_objects(out) if o["laddr"] == CLIENT_IP]
    assert flows and all(o["type"] == "retrans_count" for o in flows)
    assert sum(o["retransmits"] for o in flows) == delta, (flows, delta)
    client_port = seen["send"][0]
    assert any(o["lport"] == client_port and o["raddr"] == SERVER_IP and
               o["rport"] == SERVER_PORT for o in flows), flows
    lines = out2.splitlines()
    assert lines[0].split() == ["TIME", "PID", "IP", "LADDR:LPORT", "T>", "RADDR:RPORT",
                                "STATE"]
    rows = [ln.split() for ln in lines[1:] if ln.split()[3].startswith(f"{CLIENT_IP}:")]
    assert rows and all(f[4] == "R>" and f[5] == f"{SERVER_IP}:{SERVER_PORT}" for f in rows)
    assert re.match(r"\d\d:\d\d:\d\d$", rows[0][0])


# -- bounds: what happens at each limit is counted, never silent ---------------------------------
def test_syscall_key_bound_counts_what_it_could_not_keep(bins):
    """max_keys=1 with -P: the first (process, syscall) key is kept, every call of the others
    lands in counts_full; kept + counts_full is the exact number of calls."""
    from sniproxy.observe.tracing import EbpfSyscallTracer

    proc = _start_waiting([bins["syscalls_exact"], "1000", "100", "10"])
    try:
        with EbpfSyscallTracer(pid=proc.pid, by_process=True, max_keys=1) as tracer:
            _go(proc)
            assert proc.wait(timeout=30) == 0
            snap = tracer.snapshot()
    finally:
        proc.kill()
    assert len(snap.rows) == 1
    assert snap.rows[0].count + snap.stats["counts_full"] == 1000 + 100 + 10 + 1


def _loopback_connections(n: int, hold: bool = False) -> None:
    """n connections to a listener of this process, each both ends closed (all at once at
    the end with hold=True)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(n)
    held = []
    for _ in range(n):
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        held.append((c, a))
        if not hold:
            c.close()
            a.close()
    for c, a in held:
        c.close()
        a.close()
    srv.close()


def test_network_bounds_user_space_ring_and_sockets():
    from sniproxy.observe.tracing import EbpfNetworkTracer

    # user space: max_events=10 keeps the 10 newest and counts the rest as dropped
    with EbpfNetworkTracer(events=("close",), pid=os.getpid(), max_events=10) as tracer:
        _loopback_connections(20)
        snap = tracer.wait_for(lambda s: s.stats["events"] >= 40 and
                               len(s.events) + s.dropped >= 40, timeout_s=10)
    assert snap.stats["events"] == 40 and snap.stats["ring_full"] == 0
    assert (len(snap.events), snap.dropped) == (10, 30)

    # kernel ring: 4 KiB holds ~30 events; with the reader held off, 150 events overflow it
    # and every one lost is counted: submitted + ring_full = what the sockets produced
    tracer = EbpfNetworkTracer(events=("close", "connect"), pid=os.getpid(), ring_bytes=4096)
    with tracer:
        with tracer._reader._rb_lock:          # the reader thread cannot drain meanwhile
            _loopback_connections(50)          # 50 x (connect + 2 closes)
            stats = tracer.stats()
        snap = tracer.snapshot()
    assert stats["ring_full"] > 0
    assert stats["events"] + stats["ring_full"] == 150, stats
    assert len(snap.events) == stats["events"] and snap.dropped == 0

    # sockets followed: max_sockets=1, 5 connections (10 sockets) open at once. The one
    # slot goes to the first socket born anywhere on the machine (the pid is known only at
    # close for a passive socket), so at most one of ours has a row; every birth that found
    # the map full is counted, at least our 9 others.
    with EbpfNetworkTracer(events=("close",), pid=os.getpid(), max_sockets=1) as tracer:
        _loopback_connections(5, hold=True)
        snap = tracer.snapshot()
    assert len(snap.events) <= 1
    assert snap.stats["sockets_full"] >= 9


def test_ring_reader_waits_for_events_without_holding_its_lock():
    """snapshot() drains the ring under the lock the reader thread drains it under. The
    reader once waited for events (ring_buffer__poll, 100 ms at a time) holding that lock and
    took it back microseconds after each release, so a snapshot queued behind it, on a loaded
    machine for seconds: `trace` commands printed and stopped after Ctrl-C that late. Idle,
    the lock is free but for the reader's drains (microseconds every 100 ms)."""
    from sniproxy.observe.tracing import EbpfNetworkTracer

    with EbpfNetworkTracer(events=("connect",), pid=os.getpid()) as tracer:
        lock = tracer._reader._rb_lock
        free = 0
        for _ in range(20):        # samples 10 ms apart: two poll periods
            if lock.acquire(blocking=False):
                lock.release()
                free += 1
            time.sleep(0.01)
    assert free >= 15, f"the reader held its lock at {20 - free} of 20 samples"


def test_memory_allocation_bound_is_counted(bins):
    from sniproxy.observe.tracing import EbpfMemoryTracer

    proc = _start_waiting([bins["leak"], "50", "30"])
    try:
        with EbpfMemoryTracer(pid=proc.pid, max_allocs=10) as tracer:
            _go(proc)
            assert proc.stdout.readline() == b"ready\n"
            snap = tracer.snapshot()
    finally:
        proc.kill()
    assert snap.total_count <= 10
    # 50 + 20 blocks stay allocated: at least 60 of them found the map full
    assert snap.stats["allocs_full"] >= 60, snap.stats


def test_port_filter_rows_exact_and_no_socket_left_behind():
    """A local-port filter (-L): client sockets are followed from SYN_SENT while their port is
    unknown, then dropped once it is known and not wanted; a socket left in the map would
    hand its SYN time to the next socket born at the same address (its row one byte short).
    After 50 connections the map holds none of ours; the server rows are exact."""
    from sniproxy.observe.tracing import EbpfNetworkTracer
    from sniproxy.observe.tracing.network import MAP_SOCKS

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    def exchange(pairs, first: int) -> None:
        for i, (c, a) in enumerate(pairs, first):
            c.sendall(b"x" * (100 + i))
            c.shutdown(socket.SHUT_WR)
            assert len(a.recv(4096)) == 100 + i
            a.sendall(b"y" * 7)
            a.close()
            assert c.recv(100) == b"y" * 7
            c.close()

    def connect():
        c = socket.create_connection(("127.0.0.1", port))
        return c, srv.accept()[0]

    with EbpfNetworkTracer(events=("close",), local_ports=[port]) as tracer:
        exchange([connect() for _ in range(50)], 0)     # 50 client sockets alive at once
        left = len(list(tracer._obj.map(MAP_SOCKS).keys()))
        for i in range(50, 100):                         # then one at a time
            exchange([connect()], i)
        snap = tracer.wait_for(lambda s: len(s.of_kind("close")) >= 100, timeout_s=10)
    srv.close()
    rows = snap.of_kind("close")
    assert sorted((e.sport, e.rx_bytes, e.tx_bytes) for e in rows) == [
        (port, 100 + i, 7) for i in range(100)]
    # other processes' connects in flight at this moment may be followed; 50 of ours would be
    assert left < 10, left
