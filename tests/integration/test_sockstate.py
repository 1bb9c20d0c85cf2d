"""The BPF socket-state reader (ebpf/sockstate.py) against the kernel's own answers: TCP_INFO,
getsockname/getpeername, SIOCINQ/TIOCOUTQ and a TCP_REPAIR snapshot of the same socket, on
real loopback connections (IPv4, IPv6, IPv4-mapped on a dual-stack listener)."""
from __future__ import annotations

import errno
import json
import socket
import time
import subprocess
import sys

import pytest

from tests.ebpf_required import require_ebpf

pytestmark = pytest.mark.ebpf


@pytest.fixture(scope="module")
def reader():
    require_ebpf()
    from sniproxy.ebpf.sockstate import SocketStateReader
    r = SocketStateReader.open()
    yield r
    r.close()


def _pair(family: int, listen_host: str, connect_host: str):
    ls = socket.socket(family)
    ls.bind((listen_host, 0))
    ls.listen(1)
    c = socket.create_connection((connect_host, ls.getsockname()[1]), timeout=5)
    s, _ = ls.accept()
    ls.close()
    return c, s


def _unnorm(addr: tuple) -> tuple[str, int]:
    """getsockname of an AF_INET6 socket carrying IPv4: ('::ffff:a.b.c.d', port, 0, 0)."""
    host = addr[0].removeprefix("::ffff:") if "." in addr[0] else addr[0]
    return host, addr[1]


@pytest.mark.parametrize("family,listen_host,connect_host", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    (socket.AF_INET6, "::1", "::1"),
    (socket.AF_INET6, "::", "127.0.0.1"),       # IPv4-mapped: read as IPv4
])
def test_reads_what_the_kernel_says_by_its_own_calls(reader, family, listen_host, connect_host):
    from sniproxy.ebpf import tcpsplice as ts
    from sniproxy.ebpf.sockmap import tcp_inq
    c, s = _pair(family, listen_host, connect_host)
    with c, s:
        c.sendall(b"x" * 3000)
        s.sendall(b"y" * 700)
        got = b""
        while len(got) < 700:
            got += c.recv(700 - len(got))
        assert s.recv(1000, socket.MSG_WAITALL) == b"x" * 1000   # 2000 stay queued
        for sock in (s, c):
            st = reader.read(sock)
            assert st is not None
            assert st.family == (4 if "." in connect_host else 6)
            assert st.local == _unnorm(sock.getsockname())
            assert st.peer == _unnorm(sock.getpeername())
            facts = ts.tcp_facts(sock)
            assert ts.facts_of(st) == facts
            before_ms = time.monotonic_ns() // 1_000_000
            snap = ts.repair_snapshot(sock)
            took_ms = time.monotonic_ns() // 1_000_000 - before_ms
            mine = ts.snapshot_of(st)
            assert (mine.copied_seq, mine.queued, mine.write_seq) == \
                (snap.copied_seq, snap.queued, snap.write_seq)
            # repair_snapshot reads CLOCK_MONOTONIC after TCP_TIMESTAMP, so its ts_base is lower
            # by however long the process waited between the two reads (preemption on a busy
            # CI machine), never more than the call took, plus 1 ms of rounding
            assert (mine.ts_base - snap.ts_base) & 0xFFFFFFFF <= took_ms + 1
            assert st.queued == tcp_inq(sock)
        assert reader.read(s).queued == 2000
        assert reader.read(c).unacked == 0


def test_every_other_getsockopt_is_untouched(reader):
    from sniproxy.ebpf.sockstate import SOCKSTATE_OPT
    c, s = _pair(socket.AF_INET, "127.0.0.1", "127.0.0.1")
    with c, s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) in (0, 1)
        for level, opt, size in ((socket.IPPROTO_TCP, SOCKSTATE_OPT + 1, 72),   # another number
                                 (socket.IPPROTO_TCP, SOCKSTATE_OPT, 16),       # buffer too short
                                 (socket.SOL_SOCKET, SOCKSTATE_OPT, 72)):       # another level
            with pytest.raises(OSError) as exc:
                s.getsockopt(level, opt, size)
            assert exc.value.errno == errno.ENOPROTOOPT
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            with pytest.raises(OSError):
                u.getsockopt(socket.IPPROTO_TCP, SOCKSTATE_OPT, 72)


def _prog_ids(name: str) -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out) if p.get("name") == name}


def test_program_and_link_released_on_close():
    require_ebpf()
    from sniproxy.ebpf.sockstate import PROGRAM, SocketStateReader
    before = _prog_ids(PROGRAM)
    r = SocketStateReader.open()
    mine = _prog_ids(PROGRAM) - before
    assert len(mine) == 1
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    assert [lk for lk in links if lk.get("prog_id") in mine and lk.get("type") == "cgroup"]
    r.close()
    assert not (_prog_ids(PROGRAM) & mine), "program still loaded after close()"


def test_without_cap_perfmon_open_says_which_capability():
    require_ebpf()
    drop = "-perfmon,-sys_admin"
    code = ("from sniproxy.ebpf.sockstate import SocketStateReader\n"
            "try:\n    SocketStateReader.open()\nexcept OSError as e:\n    print(e)\n")
    r = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}",
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "CAP_PERFMON is missing" in r.stdout, (r.stdout, r.stderr)
