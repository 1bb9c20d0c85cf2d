"""Resolver logic without the network: the LRU cache, expiry on an injected clock, hosts file,
IP literals, nameserver specs. Real DNS (TTLs from answers, NXDOMAIN, coalescing, timeouts) is in
tests/integration/test_upstream.py against a dnslib server."""

from __future__ import annotations

import asyncio
import os

import pytest

from sniproxy.proxy.resolver import (
    CachedAnswer,
    HostsFile,
    MemoryDnsCache,
    ResolveError,
    Resolver,
    ip_literal,
    parse_nameserver,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_resolver(tmp_path, clock, hosts: str = "", **kw) -> Resolver:
    path = tmp_path / "hosts"
    path.write_text(hosts)
    # A nameserver that is never asked in these tests: every answer comes from hosts or the cache.
    return Resolver(MemoryDnsCache(16), nameservers=["127.0.0.1:9"], hosts_path=str(path),
                    clock=clock, timeout_s=0.2, **kw)


# -- MemoryDnsCache ---------------------------------------------------------------------------

def test_cache_honours_expiry():
    cache = MemoryDnsCache(4)
    cache.put("a.test", CachedAnswer(("192.0.2.1",), expires_at=10.0))
    assert cache.get("a.test", 9.999).addresses == ("192.0.2.1",)
    assert cache.get("a.test", 10.0) is None
    assert len(cache) == 0 and cache.stats()["expirations"] == 1


def test_cache_is_a_bounded_lru():
    cache = MemoryDnsCache(3)
    for name in ("a", "b", "c"):
        cache.put(name, CachedAnswer(("192.0.2.1",), 100.0))
    assert cache.get("a", 0) is not None  # a is now the most recently used
    cache.put("d", CachedAnswer(("192.0.2.4",), 100.0))
    assert cache.get("b", 0) is None  # the least recently used went
    assert all(cache.get(n, 0) is not None for n in ("a", "c", "d"))
    assert len(cache) == 3 and cache.stats()["evictions"] == 1


def test_cache_put_replaces():
    cache = MemoryDnsCache(2)
    cache.put("a", CachedAnswer(("192.0.2.1",), 100.0))
    cache.put("a", CachedAnswer(("192.0.2.2",), 100.0))
    assert cache.get("a", 0).addresses == ("192.0.2.2",) and len(cache) == 1


def test_cache_needs_room():
    with pytest.raises(ValueError):
        MemoryDnsCache(0)


# -- Resolver over the cache, on an injected clock ----------------------------------------------

def test_ip_literals_bypass_everything(tmp_path):
    r = make_resolver(tmp_path, Clock())
    assert asyncio.run(r.resolve("192.0.2.9")) == ["192.0.2.9"]
    assert asyncio.run(r.resolve("[2001:db8::0001]")) == ["2001:db8::1"]
    assert r.stats()["hits"] == r.stats()["misses"] == 0


def test_cached_answer_served_until_expiry(tmp_path):
    clock = Clock()
    r = make_resolver(tmp_path, clock)
    r.cache.put("svc.test", CachedAnswer(("2001:db8::1", "192.0.2.1"), clock.now + 30))
    assert asyncio.run(r.resolve("SVC.test.")) == ["2001:db8::1", "192.0.2.1"]
    clock.now += 29.9
    assert asyncio.run(r.resolve("svc.test")) == ["2001:db8::1", "192.0.2.1"]
    assert r.stats()["hits"] == 2
    clock.now += 0.2
    # Expired: the resolver goes to DNS, here a port nobody answers on, and says so.
    with pytest.raises(ResolveError, match="timed out"):
        asyncio.run(r.resolve("svc.test"))
    assert r.stats()["misses"] == 1 and r.stats()["errors"] == 1


def test_negative_answer_is_served_and_counted(tmp_path):
    clock = Clock()
    r = make_resolver(tmp_path, clock)
    r.cache.put("gone.test", CachedAnswer((), clock.now + 5, negative=True,
                                          reason="NXDOMAIN (the name does not exist)"))
    with pytest.raises(ResolveError, match=r"'gone.test': NXDOMAIN .*\(cached\)"):
        asyncio.run(r.resolve("gone.test"))
    assert r.stats()["negative_hits"] == 1


def test_hosts_file_answers_first_and_is_reread_when_changed(tmp_path):
    clock = Clock()
    r = make_resolver(tmp_path, clock, "# comment\n192.0.2.5  pinned.test alias.test # tail\n"
                                       "2001:db8::5 pinned.test\n")
    r.cache.put("pinned.test", CachedAnswer(("198.51.100.1",), clock.now + 100))
    assert asyncio.run(r.resolve("pinned.test")) == ["2001:db8::5", "192.0.2.5"]
    assert asyncio.run(r.resolve("ALIAS.test")) == ["192.0.2.5"]
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.6 pinned.test\n")
    st = hosts.stat()
    os.utime(hosts, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert asyncio.run(r.resolve("pinned.test")) == ["192.0.2.6"]
    # alias.test left the hosts file: the (unreachable) DNS is asked now.
    with pytest.raises(ResolveError):
        asyncio.run(r.resolve("alias.test"))
    assert r.stats()["hosts_hits"] == 3


def test_hosts_parse_ignores_garbage():
    table = HostsFile.parse("not-an-ip foo\n\n   \n127.0.0.1\n10.0.0.1 ok.test\nfe80::1%lo ll.test\n")
    assert table == {"ok.test": ("10.0.0.1",), "ll.test": ("fe80::1",)}


def test_missing_hosts_file_is_empty(tmp_path):
    assert HostsFile(str(tmp_path / "absent")).lookup("localhost") is None


def test_no_nameservers_is_a_clear_error(tmp_path):
    r = Resolver(MemoryDnsCache(4), nameservers=[], hosts_path=None)
    with pytest.raises(ResolveError, match="no nameservers"):
        asyncio.run(r.resolve("example.test"))


def test_ttl_bounds_are_validated():
    with pytest.raises(ValueError):
        Resolver(MemoryDnsCache(4), nameservers=[], min_ttl_s=10, max_ttl_s=5)


# -- small parsers ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [("192.0.2.53", ("192.0.2.53", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)),
     ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)), ("2001:db8::53", ("2001:db8::53", 53))],
)
def test_parse_nameserver(spec, expected):
    assert parse_nameserver(spec) == expected


@pytest.mark.parametrize("spec", ["dns.example", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x"])
def test_parse_nameserver_rejects(spec):
    with pytest.raises(ValueError, match="expected"):
        parse_nameserver(spec)


def test_ip_literal():
    assert ip_literal("[::1]") == "::1"
    assert ip_literal("example.com") is None
