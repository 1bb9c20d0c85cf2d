"""The BPF LRU DNS cache: two levels, TTLs, sharing across fork, pinning on bpffs, the proxy's hit rates."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.ebpf_required import require_ebpf, skip_or_fail
from tests.integration.harness import ProxyProcess, RawBackend, base_config, client_hello_bytes, free_port
from tests.integration.socks_servers import start_dns_server

pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


def answer(addrs, ttl=60.0, negative=False, reason=""):
    from sniproxy.proxy.resolver import CachedAnswer
    return CachedAnswer(tuple(addrs), time.monotonic() + ttl, negative, reason)


def BpfDnsCache(dns_map):
    """What a worker's resolver uses: its own level 1 in front of the shared BPF map."""
    from sniproxy.ebpf.dnscache import SharedDnsMap
    from sniproxy.proxy.resolver import TwoLevelDnsCache
    return TwoLevelDnsCache(SharedDnsMap(dns_map))


def test_two_levels_count_and_honour_ttl():
    from sniproxy.ebpf.dnscache import open_dns_map
    m = open_dns_map(64, None).map
    try:
        a = BpfDnsCache(m)
        b = BpfDnsCache(m)                       # another worker: same map, own level 1
        a.put("web.test", answer(["192.0.2.1", "2001:db8::1"]))
        now = time.monotonic()
        assert a.get("web.test", now).addresses == ("192.0.2.1", "2001:db8::1")
        assert b.get("web.test", now).addresses == ("192.0.2.1", "2001:db8::1")   # level 2
        assert b.get("web.test", now) is not None                                  # now level 1
        assert (a.stats()["l1_hit"], b.stats()["l2_hit"], b.stats()["l1_hit"]) == (1, 1, 1)
        a.put("short.test", answer(["192.0.2.9"], ttl=0.05))
        assert b.get("short.test", time.monotonic() + 1) is None                   # expired
        assert b.stats()["l2_expired"] == 1
        a.put("nx.test", answer([], negative=True, reason="NXDOMAIN"))
        neg = b.get("nx.test", time.monotonic())
        assert neg.negative and neg.reason == "NXDOMAIN"
        assert b.get("x" * 300, time.monotonic()) is None        # too long for a key: level 1 only
    finally:
        m.close()


def test_lru_is_bounded_by_max_entries():
    from sniproxy.ebpf.dnscache import open_dns_map
    m = open_dns_map(16, None).map
    try:
        c = BpfDnsCache(m)
        for i in range(200):
            c.put(f"n{i}.test", answer([f"192.0.2.{i % 250}"]))
        assert m.count() <= 16
    finally:
        m.close()


def test_shared_with_a_forked_worker():
    from sniproxy.ebpf.dnscache import open_dns_map
    m = open_dns_map(64, None).map
    try:
        pid = os.fork()
        if pid == 0:
            BpfDnsCache(m).put("forked.test", answer(["198.51.100.7"]))
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        got = BpfDnsCache(m).get("forked.test", time.monotonic())
        assert got is not None and got.addresses == ("198.51.100.7",)
    finally:
        m.close()


@pytest.fixture
def bpffs(tmp_path):
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a bpffs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_pinned_map_survives_a_restart(bpffs):
    from sniproxy.ebpf.dnscache import open_dns_map
    pin = str(bpffs / "sni-proxy")
    first = open_dns_map(64, pin)
    assert first.pinned_at == f"{pin}/dns_cache" and os.path.exists(first.pinned_at)
    BpfDnsCache(first.map).put("kept.test", answer(["203.0.113.5"]))
    first.map.close()                             # the "proxy" is gone
    second = open_dns_map(64, pin)
    try:
        assert "reused" in second.note
        assert BpfDnsCache(second.map).get("kept.test", time.monotonic()).addresses == ("203.0.113.5",)
    finally:
        second.map.close()
    third = open_dns_map(128, pin)                # another size: replaced, not reused
    try:
        assert third.map.max_entries == 128 and "reused" not in third.note
    finally:
        third.map.close()


def test_not_on_bpffs_means_pinning_off(tmp_path):
    from sniproxy.ebpf.dnscache import open_dns_map
    d = open_dns_map(16, str(tmp_path / "pins"))
    try:
        assert d.pinned_at is None and "not on a bpffs" in d.note
    finally:
        d.map.close()


def test_proxy_workers_share_the_cache_and_export_hit_rates(tmp_path, bpffs):
    be = RawBackend(reply_bytes=100)
    with start_dns_server({"backend.test": [("A", "127.0.0.1", 300)]}) as dns:
        cfg = base_config(free_port(), free_port(), workers=2,
                          routes=[{"match": "*.test", "backend": f"backend.test:{be.port}",
                                   "allow_private": True}],
                          dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
                          ebpf={"enabled": True, "dns_cache": {"pin_path": str(bpffs / "sp")}})
        p = ProxyProcess(cfg, tmp_path).start()
        try:
            port = int(cfg["listen_addr"].rsplit(":", 1)[1])
            for _ in range(40):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(client_hello_bytes("a.test"))
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):
                        pass
            e = p.status()["ebpf"]
            assert e["dns_cache"] == "active" and e["pinning"] == "on", e
            assert dns.total("backend.test") <= 2 * 2      # A and AAAA once, by one or both workers
            rate = p.metric("ebpf_dns_cache_hit_rate")
            assert 0.9 <= rate < 1, p.metrics()
            assert p.metric("ebpf_dns_cache_lookups_total", result="l1_hit") >= 30
            assert p.metric("ebpf_map_utilization", map="dns_cache") > 0
        finally:
            p.stop()
