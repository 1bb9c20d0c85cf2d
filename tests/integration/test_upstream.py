"""The upstream layer against real local servers: Happy Eyeballs on ::1 / 127.0.0.1, pproxy and
danted as SOCKS5 servers, a dnslib DNS server, and the Connector end to end. Loopback only."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

import pytest
import uvloop
from tests.integration.socks_servers import (
    blackhole,
    closed_port,
    shared_port,
    start_danted,
    start_dns_server,
    start_pproxy,
    start_scripted_socks5,
    start_tcp_server,
)

from sniproxy.proxy.resolver import MemoryDnsCache, ResolveError, Resolver
from sniproxy.proxy.upstream import Connector, UpstreamError, open_direct, open_socks5

BANNER = b"220 backend says hello first\r\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a coroutine on a fresh loop of each kind: the proxy must work under both."""

    def runner(coro):
        if request.param == "uvloop":
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
                return r.run(coro)
        return asyncio.run(coro)

    return runner


async def read_exactly(sock: socket.socket, n: int, leftover: bytes = b"") -> bytes:
    loop = asyncio.get_running_loop()
    data = leftover
    async with asyncio.timeout(5):
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                break
            data += chunk
    return data


def assert_ready_socket(sock: socket.socket) -> None:
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- Happy Eyeballs ----------------------------------------------------------------------------

def test_ipv6_blackhole_falls_back_to_ipv4_after_the_delay(run):
    port = shared_port(("127.0.0.1", "::1"))
    with blackhole("::1", port), start_tcp_server("127.0.0.1", port=port):
        start = time.monotonic()
        sock = run(open_direct(["::1", "127.0.0.1"], port, timeout_s=5, happy_eyeballs_delay_s=0.3))
        elapsed = time.monotonic() - start
        with sock:
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
            assert_ready_socket(sock)
    assert 0.25 <= elapsed < 2.0, elapsed


def test_ipv6_refused_moves_on_at_once_without_waiting_for_the_delay(run):
    port = shared_port(("127.0.0.1", "::1"))
    with start_tcp_server("127.0.0.1", port=port):  # nothing on [::1]:port -> RST
        start = time.monotonic()
        sock = run(open_direct(["::1", "127.0.0.1"], port, timeout_s=5, happy_eyeballs_delay_s=3))
        with sock:
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
    assert time.monotonic() - start < 1.5  # far below the 3 s delay


def test_first_family_wins_when_both_answer(run):
    port = shared_port(("127.0.0.1", "::1"))
    with start_tcp_server("::1", port=port), start_tcp_server("127.0.0.1", port=port):
        with run(open_direct(["::1", "127.0.0.1"], port, timeout_s=5)) as sock:
            assert sock.family == socket.AF_INET6
        with run(open_direct(["127.0.0.1", "::1"], port, timeout_s=5)) as sock:
            assert sock.family == socket.AF_INET


def test_addresses_are_interleaved_by_family(run):
    # Two dead IPv6 addresses first; interleaving tries 127.0.0.1 second, so no wait on ::2-ish.
    port = shared_port(("127.0.0.1", "::1"))
    with blackhole("::1", port), start_tcp_server("127.0.0.1", port=port):
        start = time.monotonic()
        sock = run(open_direct(["::1", "::1", "::ffff:127.0.0.2", "127.0.0.1"], port, timeout_s=5,
                               happy_eyeballs_delay_s=0.3))
        with sock:
            assert sock.getpeername()[0] == "127.0.0.1"
    assert time.monotonic() - start < 1.5


def test_all_refused(run):
    with closed_port("127.0.0.1") as port:
        with pytest.raises(UpstreamError) as err:
            run(open_direct(["::1", "127.0.0.1"], port, timeout_s=5))
    e = err.value
    assert e.kind == "refused"
    assert [a for a, _ in e.attempts] == [f"[::1]:{port}", f"127.0.0.1:{port}"]
    assert all(msg == "connection refused" for _, msg in e.attempts)
    assert "is the service listening" in str(e)


def test_all_blackholed_times_out_within_the_deadline(run):
    port = shared_port(("127.0.0.1", "::1"))
    with blackhole("::1", port), blackhole("127.0.0.1", port):
        start = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            run(open_direct(["::1", "127.0.0.1"], port, timeout_s=0.6, happy_eyeballs_delay_s=0.1))
        elapsed = time.monotonic() - start
    assert err.value.kind == "timeout"
    assert len(err.value.attempts) == 2 and "no answer within 0.6s" in str(err.value)
    assert 0.55 <= elapsed < 2.0


def test_no_addresses_is_a_dns_error(run):
    with pytest.raises(UpstreamError) as err:
        run(open_direct([], 443, timeout_s=1))
    assert err.value.kind == "dns"


# -- SOCKS5 against real servers ---------------------------------------------------------------

def socks_exchange(run, server, host, port, **kw):
    async def go():
        sock, leftover = await open_socks5(server, host, port, timeout_s=5, **kw)
        with sock:
            assert_ready_socket(sock)
            return await read_exactly(sock, len(BANNER), leftover)

    return run(go())


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1"])
def test_pproxy_connect_by_name_and_by_ip(run, target):
    with start_tcp_server("127.0.0.1", banner=BANNER) as backend, start_pproxy() as socks:
        assert socks_exchange(run, ("127.0.0.1", socks.port), target, backend.port) == BANNER


def test_pproxy_with_good_credentials(run):
    with start_tcp_server("127.0.0.1", banner=BANNER) as backend, \
            start_pproxy(auth=("alice", "s3cret")) as socks:
        got = socks_exchange(run, ("127.0.0.1", socks.port), "localhost", backend.port,
                             username="alice", password="s3cret")
        assert got == BANNER


def test_pproxy_with_bad_credentials(run):
    with start_pproxy(auth=("alice", "s3cret")) as socks:
        with pytest.raises(UpstreamError) as err:
            socks_exchange(run, ("127.0.0.1", socks.port), "localhost", 9, username="alice",
                           password="wrong", upstream_name="corp")
    assert err.value.kind == "socks"
    assert "'alice'" in str(err.value) and "probably rejected" in str(err.value)


def test_pproxy_requires_auth_but_none_configured(run):
    with start_pproxy(auth=("alice", "s3cret")) as socks:
        with pytest.raises(UpstreamError) as err:
            socks_exchange(run, ("127.0.0.1", socks.port), "localhost", 9, upstream_name="corp")
    assert err.value.kind == "socks"
    assert "configure \"username\" and \"password\" for upstream 'corp'" in str(err.value)


@pytest.mark.parametrize("target", ["localhost", "127.0.0.1"])
def test_danted_connect_by_name_and_by_ip(run, tmp_path, target):
    with start_tcp_server("127.0.0.1", banner=BANNER) as backend, start_danted(tmp_path) as socks:
        assert socks_exchange(run, ("127.0.0.1", socks.port), target, backend.port) == BANNER


def test_danted_reports_refused_destination(run, tmp_path):
    with closed_port() as port, start_danted(tmp_path) as socks:
        with pytest.raises(UpstreamError) as err:
            socks_exchange(run, ("127.0.0.1", socks.port), "127.0.0.1", port, upstream_name="corp")
    assert err.value.kind == "refused"
    assert "connection refused" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)


def test_early_backend_bytes_in_the_reply_segment_are_returned(run):
    reply = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
    with start_scripted_socks5([reply + BANNER[:10], BANNER[10:]]) as socks:
        async def go():
            sock, leftover = await open_socks5(("127.0.0.1", socks.port), "example.test", 443,
                                               timeout_s=5)
            with sock:
                return leftover, await read_exactly(sock, len(BANNER), leftover)

        leftover, whole = run(go())
    assert leftover == BANNER[:10]
    assert whole == BANNER
    assert socks.received[-1] == b"\x05\x01\x00\x03\x0cexample.test\x01\xbb"


@pytest.mark.parametrize(("rep", "kind"), [(1, "socks"), (2, "socks"), (3, "unreachable"),
                                           (4, "unreachable"), (5, "refused"), (6, "timeout")])
def test_reply_codes_map_to_error_kinds(run, rep, kind):
    with start_scripted_socks5([bytes([5, rep, 0, 1, 0, 0, 0, 0, 0, 0])]) as socks:
        with pytest.raises(UpstreamError) as err:
            run(open_socks5(("127.0.0.1", socks.port), "example.test", 443, timeout_s=5))
    assert err.value.kind == kind


def test_socks_server_down(run):
    with closed_port() as port:
        with pytest.raises(UpstreamError) as err:
            run(open_socks5(("127.0.0.1", port), "example.test", 443, timeout_s=2,
                            upstream_name="corp"))
    assert err.value.kind == "socks"
    assert "SOCKS5 upstream 'corp'" in str(err.value) and "not reachable" in str(err.value)


def test_socks_handshake_timeout(run):
    # Accepts and reads, never answers the greeting.
    with start_tcp_server("127.0.0.1", read_first=1000) as silent:
        start = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            run(open_socks5(("127.0.0.1", silent.port), "example.test", 443, timeout_s=0.5))
    assert err.value.kind == "timeout"
    assert "did not finish the SOCKS5 handshake" in str(err.value)
    assert "state await_method" in str(err.value)
    assert time.monotonic() - start < 3


def test_socks_server_blackholed_is_a_socks_error(run):
    with blackhole("127.0.0.1") as port:
        with pytest.raises(UpstreamError) as err:
            run(open_socks5(("127.0.0.1", port), "example.test", 443, timeout_s=0.5))
    assert err.value.kind == "socks" and "timed out" in str(err.value)


# -- Resolver against a real DNS server --------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_resolver(dns_server, clock=None, **kw) -> Resolver:
    return Resolver(MemoryDnsCache(64), nameservers=[dns_server.addr], hosts_path=None,
                    clock=clock or time.monotonic, **kw)


def test_answers_are_cached_for_their_real_ttl(run):
    records = {"both.test": [("AAAA", "::1", 30), ("A", "127.0.0.1", 60)]}
    with start_dns_server(records) as dns_server:
        clock = Clock()
        r = make_resolver(dns_server, clock)
        assert run(r.resolve("both.test")) == ["::1", "127.0.0.1"]
        assert dns_server.total("both.test") == 2  # A and AAAA
        clock.now += 29.5
        assert run(r.resolve("both.test")) == ["::1", "127.0.0.1"]
        assert dns_server.total("both.test") == 2
        clock.now += 1  # past the smaller TTL (30 s)
        run(r.resolve("both.test"))
        assert dns_server.total("both.test") == 4
    s = r.stats()
    assert (s["hits"], s["misses"], s["errors"]) == (1, 2, 0)


@pytest.mark.parametrize(("ttl", "live_until"), [(1, 5), (100_000, 3600)])
def test_ttls_are_clamped(run, ttl, live_until):
    with start_dns_server({"t.test": [("A", "192.0.2.1", ttl)]}) as dns_server:
        clock = Clock()
        r = make_resolver(dns_server, clock, min_ttl_s=5, max_ttl_s=3600)
        run(r.resolve("t.test"))
        clock.now += live_until - 0.1
        run(r.resolve("t.test"))
        assert dns_server.total("t.test") == 2
        clock.now += 0.2
        run(r.resolve("t.test"))
        assert dns_server.total("t.test") == 4


def test_cname_chain_uses_the_smallest_ttl(run):
    records = {"alias.test": [("CNAME", "real.test.", 10)], "real.test": [("A", "192.0.2.7", 300)]}
    with start_dns_server(records) as dns_server:
        clock = Clock()
        r = make_resolver(dns_server, clock)
        assert run(r.resolve("alias.test")) == ["192.0.2.7"]
        clock.now += 10.1
        run(r.resolve("alias.test"))
        assert dns_server.total("alias.test") == 4


def test_nxdomain_is_cached_negatively(run):
    with start_dns_server({}) as dns_server:
        clock = Clock()
        r = make_resolver(dns_server, clock, negative_ttl_s=5)
        with pytest.raises(ResolveError, match="NXDOMAIN"):
            run(r.resolve("nope.test"))
        with pytest.raises(ResolveError, match=r"NXDOMAIN.*\(cached\)"):
            run(r.resolve("nope.test"))
        assert dns_server.total("nope.test") == 2
        clock.now += 5.1
        with pytest.raises(ResolveError):
            run(r.resolve("nope.test"))
        assert dns_server.total("nope.test") == 4
    assert r.stats()["negative_hits"] == 1


def test_name_without_addresses_is_cached_negatively(run):
    with start_dns_server({"mx-only.test": [("MX", "10 mail.test.", 60)]}) as dns_server:
        r = make_resolver(dns_server)
        with pytest.raises(ResolveError, match="no A or AAAA records"):
            run(r.resolve("mx-only.test"))
        with pytest.raises(ResolveError, match="cached"):
            run(r.resolve("mx-only.test"))


def test_concurrent_lookups_share_one_query(run):
    with start_dns_server({"slow.test": [("A", "192.0.2.8", 60)]}) as dns_server:
        dns_server.delay_s = 0.3
        r = make_resolver(dns_server)

        async def many():
            return await asyncio.gather(*(r.resolve("slow.test") for _ in range(20)))

        results = run(many())
        assert results == [["192.0.2.8"]] * 20
        assert dns_server.total("slow.test") == 2  # one A, one AAAA for all twenty callers
    assert r.stats()["coalesced"] == 19 and r.stats()["misses"] == 1


def test_one_caller_giving_up_does_not_cancel_the_shared_query(run):
    with start_dns_server({"slow.test": [("A", "192.0.2.8", 60)]}) as dns_server:
        dns_server.delay_s = 0.3
        r = make_resolver(dns_server)

        async def go():
            impatient = asyncio.ensure_future(r.resolve("slow.test"))
            patient = asyncio.ensure_future(r.resolve("slow.test"))
            await asyncio.sleep(0)  # let both register on the shared query
            impatient.cancel()
            return await patient

        assert run(go()) == ["192.0.2.8"]


def test_timeout_is_an_error_and_not_cached(run):
    with start_dns_server({"quiet.test": [("A", "192.0.2.9", 60)]}) as dns_server:
        dns_server.silent.add("quiet.test")
        r = make_resolver(dns_server, timeout_s=0.3)
        with pytest.raises(ResolveError, match=r"timed out after 0.3s asking 127.0.0.1:\d+"):
            run(r.resolve("quiet.test"))
        dns_server.silent.clear()
        assert run(r.resolve("quiet.test")) == ["192.0.2.9"]
    assert r.stats()["errors"] == 1


# -- Connector end to end ----------------------------------------------------------------------

@dataclass
class Decision:
    host: str
    port: int
    upstream: str = "direct"
    proxy_protocol: str | None = None
    dynamic: bool = False
    allow_private: bool = False


@dataclass
class SocksUpstream:
    addr: str
    username: str | None = None
    password: str | None = None


def test_direct_with_proxy_v1_header(run):
    client, server = ("192.0.2.10", 51000), ("192.0.2.1", 443)
    header = b"PROXY TCP4 192.0.2.10 192.0.2.1 51000 443\r\n"
    with start_dns_server({"backend.test": [("A", "127.0.0.1", 60)]}) as dns_server, \
            start_tcp_server("127.0.0.1", read_first=len(header)) as backend:
        connector = Connector(make_resolver(dns_server), {}, connect_timeout_s=5)

        async def go():
            conn = await connector.connect(Decision("backend.test", backend.port, proxy_protocol="v1"),
                                           client, server)
            with conn.sock:
                assert_ready_socket(conn.sock)
                await asyncio.get_running_loop().sock_recv(conn.sock, 1)  # backend closes: EOF
            return conn

        conn = run(go())
    assert backend.received == [header]
    assert conn.backend_addr == f"127.0.0.1:{backend.port}" and conn.leftover == b""
    assert 0 < conn.connect_seconds < 5


def test_dynamic_route_refuses_internal_destinations(run):
    with start_dns_server({"internal.test": [("A", "127.0.0.1", 60)]}) as dns_server:
        connector = Connector(make_resolver(dns_server), {}, connect_timeout_s=5)
        with pytest.raises(UpstreamError) as err:
            run(connector.connect(Decision("internal.test", 443, dynamic=True), None, None))
    assert err.value.kind == "forbidden"
    assert "127.0.0.1 (loopback)" in str(err.value)
    assert '"allow_private": true' in str(err.value)


def test_dynamic_route_with_allow_private_connects(run):
    with start_tcp_server("127.0.0.1") as backend:
        connector = Connector(Resolver(MemoryDnsCache(4), nameservers=[], hosts_path=None), {}, 5)
        conn = run(connector.connect(
            Decision("127.0.0.1", backend.port, dynamic=True, allow_private=True), None, None))
        conn.sock.close()


def test_dynamic_socks_route_refuses_internal_ip_literal(run):
    connector = Connector(Resolver(MemoryDnsCache(4), nameservers=[], hosts_path=None),
                          {"corp": SocksUpstream("127.0.0.1:1")}, 5)
    with pytest.raises(UpstreamError) as err:
        run(connector.connect(Decision("10.1.2.3", 443, upstream="corp", dynamic=True), None, None))
    assert err.value.kind == "forbidden" and "private" in str(err.value)


def test_socks_upstream_with_proxy_v2_header(run, tmp_path):
    client, server = ("2001:db8::10", 51000, 0, 0), ("2001:db8::1", 443, 0, 0)
    header_len = 16 + 36
    with start_tcp_server("127.0.0.1", read_first=header_len) as backend, \
            start_pproxy(auth=("bob", "pw")) as socks:
        connector = Connector(Resolver(MemoryDnsCache(4), nameservers=[], hosts_path=None),
                              {"corp": SocksUpstream(socks.addr, "bob", "pw")}, 5)

        async def go():
            conn = await connector.connect(
                Decision("localhost", backend.port, upstream="corp", proxy_protocol="v2"),
                client, server)
            with conn.sock:
                await asyncio.get_running_loop().sock_recv(conn.sock, 1)
            return conn

        conn = run(go())
    assert backend.received and backend.received[0][12:16] == b"\x21\x21\x00\x24"
    assert conn.backend_addr == f"localhost:{backend.port}" and conn.upstream == "corp"


def test_unknown_upstream_and_dns_failure(run):
    with start_dns_server({}) as dns_server:
        connector = Connector(make_resolver(dns_server), {"corp": SocksUpstream("127.0.0.1:1")}, 5)
        with pytest.raises(UpstreamError) as err:
            run(connector.connect(Decision("h.test", 443, upstream="nope"), None, None))
        assert err.value.kind == "socks" and "(configured: corp)" in str(err.value)
        with pytest.raises(UpstreamError) as err:
            run(connector.connect(Decision("missing.test", 443), None, None))
        assert err.value.kind == "dns" and "NXDOMAIN" in str(err.value)
