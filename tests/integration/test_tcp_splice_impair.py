"""Delay and reordering on the veths, end to end across the splice (the issue asks for
`tc netem`; this kernel has no sch_netem, sch_fq or tbf, so the injector is built from what it
has: htb + a cls_bpf classifier, reorder_link.bpf.c). The receivers' TCP counters prove the
reordering happened; the transfer stays sha256-exact.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.netns import Topology, nsexec
from tests.integration.test_tcp_splice import (
    HELLO, MiB, EchoBackend, Proxy, _tag, spliced, stream_sha, upload_download,
)

pytestmark = pytest.mark.ebpf
# The slow class: a 64 KiB GSO packet waits ~1.3 ms there, a 1514-byte one ~30 us; the
# classifier sends two packets every 5 ms through it, so it never holds a backlog.
SLOW_RATE = "400mbit"


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


def _reorder_object(tmp_path) -> str:
    out = tmp_path / "reorder_link.bpf.o"
    bpf_dir = Path(__file__).resolve().parents[2] / "src/sniproxy/ebpf/bpf"
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{bpf_dir}", "-c",
                    str(Path(__file__).with_name("reorder_link.bpf.c")), "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return str(out)


def _impair(ns: str, dev: str, obj: str) -> None:
    """htb at the root of `dev`: 1:10 unlimited (the default), 1:20 at SLOW_RATE with a
    one-packet bucket; the classifier picks 1:20 for the delayed packets."""
    def tc(*args):
        nsexec(ns, "tc", *args)
    tc("qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
    tc("class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit")
    tc("class", "add", "dev", dev, "parent", "1:1", "classid", "1:10", "htb", "rate", "50gbit",
       "ceil", "100gbit")
    tc("class", "add", "dev", dev, "parent", "1:1", "classid", "1:20", "htb", "rate", SLOW_RATE,
       "ceil", SLOW_RATE, "burst", "2k", "cburst", "2k")
    tc("qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "pfifo", "limit", "64")
    tc("filter", "add", "dev", dev, "parent", "1:", "bpf", "obj", obj, "sec", "classifier")


def _tcp_ext(ns: str) -> dict[str, int]:
    lines = nsexec(ns, "cat", "/proc/net/netstat").stdout.splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return dict(zip(head.split()[1:], map(int, values.split()[1:])))
    raise KeyError("TcpExt")


def _slow_packets(ns: str, dev: str) -> int:
    out = nsexec(ns, "tc", "-s", "class", "show", "dev", dev, "classid", "1:20").stdout
    return int(out.split("Sent ")[1].split(" bytes ")[1].split(" pkt")[0])


def test_delay_and_reordering_both_ways_stay_exact(tmp_path):
    obj = _reorder_object(tmp_path)
    with Topology.three(_tag()) as t:
        for side in ("c", "b"):
            ns, dev = t.links[side]
            _impair(ns, dev, obj)
        be = t.run(t.backend, EchoBackend, t.backend_ip)
        proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}")
        before = {ns: _tcp_ext(ns) for ns in (t.client, t.backend)}
        size = 32 * MiB
        got = t.run(t.client, upload_download, t.proxy_client_ip, proxy.port, size)
        assert got == (len(HELLO) + size, stream_sha(HELLO, size))
        assert be.wait(1)[0][:2] == (len(HELLO) + size, stream_sha(HELLO, size))
        spliced(proxy)
        for side in ("c", "b"):
            ns, dev = t.links[side]
            assert _slow_packets(ns, dev) > 0, f"nothing delayed on {dev}"
        # Out-of-order segments queued by each receiver: the backend (client -> backend,
        # delayed on the client's veth) and the client (the echo, delayed on the backend's).
        ofo = {ns: _tcp_ext(ns)["TCPOFOQueue"] - before[ns]["TCPOFOQueue"]
               for ns in (t.client, t.backend)}
        assert all(n > 0 for n in ofo.values()), ofo
        print("out-of-order segments queued:", ofo)
        proxy.wait_clean()
