"""Route table: documented precedence, name normalisation, forbidden dynamic destinations."""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy.config import DEFAULT_ROUTE_NAME, RouteConfig, parse_config
from sniproxy.proxy.routes import RouteDecision, RouteTable, is_forbidden_destination, normalize_sni


def table(routes: list[dict[str, Any]], default_backend: str | None = None, **extra: Any) -> RouteTable:
    cfg = parse_config({"routes": routes, "default_backend": default_backend, **extra})
    return RouteTable(cfg.routes, cfg.default_backend)


def name_of(t: RouteTable, sni: str | None) -> str | None:
    decision = t.match(sni)
    return None if decision is None else decision.route_name


def r(match: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"match": match, "backend": f"10.0.0.{n}:443", "name": f"r{n}", **extra}


def test_exact_beats_wildcard_beats_regex_whatever_the_order() -> None:
    t = table([r("~example", 1), r("*.example.com", 2), r("a.example.com", 3)])
    assert name_of(t, "a.example.com") == "r3"
    assert name_of(t, "b.example.com") == "r2"
    assert name_of(t, "example.com") == "r1"  # the wildcard does not cover the bare name
    assert name_of(t, "example.net") == "r1"
    assert name_of(t, "other.test") is None


def test_longest_wildcard_wins_regardless_of_order() -> None:
    t = table([r("*.com", 1), r("*.example.com", 2), r("*.b.example.com", 3)])
    assert name_of(t, "x.b.example.com") == "r3"
    assert name_of(t, "y.x.b.example.com") == "r3"
    assert name_of(t, "b.example.com") == "r2"
    assert name_of(t, "a.example.com") == "r2"
    assert name_of(t, "example.com") == "r1"
    assert name_of(t, "com") is None


def test_wildcard_depth_and_bare_name() -> None:
    t = table([r("*.example.org", 1)])
    assert name_of(t, "a.example.org") == "r1"
    assert name_of(t, "x.y.z.example.org") == "r1"
    assert name_of(t, "example.org") is None
    assert name_of(t, "badexample.org") is None  # a suffix must start at a label boundary


def test_first_regex_in_config_order_with_search_semantics() -> None:
    t = table([r("~^api-[0-9]+\\.example\\.net$", 1), r("~example", 2), r("~^api-", 3)])
    assert name_of(t, "api-12.example.net") == "r1"
    assert name_of(t, "api-x.example.net") == "r2"  # unanchored: matches anywhere
    assert name_of(t, "api-x.other.net") == "r3"
    assert name_of(t, "API-7.EXAMPLE.NET") == "r1"  # case-insensitive, on the normalised name
    t = table([r("~^API-[0-9]+$", 1)])
    assert name_of(t, "api-1") == "r1"  # upper case in the pattern still matches


def test_case_trailing_dot_and_idna_of_the_sni() -> None:
    t = table([r("a.example.com", 1), r("bücher.example", 2), r("*.münchen.de", 3), r("~^xn--", 4)])
    assert name_of(t, "A.Example.COM") == "r1"
    assert name_of(t, "a.example.com.") == "r1"
    assert name_of(t, "a.example.com..") is None  # only one trailing dot is removed
    assert name_of(t, "xn--bcher-kva.example") == "r2"
    assert name_of(t, "Bücher.example") == "r2"
    assert name_of(t, "BÜCHER.example.") == "r2"
    assert name_of(t, "www.MÜNCHEN.de") == "r3"
    assert name_of(t, "www.xn--mnchen-3ya.de") == "r3"
    assert name_of(t, "ü.test") == "r4"  # regexes see the A-label form
    assert normalize_sni("Straße.example") == "strasse.example"  # IDNA 2003 mapping, as the config


def test_sni_that_is_not_a_valid_idna_name_only_reaches_regex_or_default() -> None:
    t = table([r("~\\s", 1)], default_backend="10.9.9.9:443")
    assert name_of(t, "a b.ü") == "r1"
    t = table([r("a.example.com", 1)], default_backend="10.9.9.9:443")
    assert name_of(t, "\u0000ü") == DEFAULT_ROUTE_NAME


def test_default_backend_and_no_sni() -> None:
    t = table([r("a.example.com", 1)], default_backend="Fallback.Internal:8443")
    decision = t.match(None)
    assert decision == RouteDecision(DEFAULT_ROUTE_NAME, "fallback.internal", 8443, "direct", None, False, False)
    assert t.match("") == decision
    assert t.match("zzz.test") == decision
    assert t.has_default
    no_default = table([r("a.example.com", 1)])
    assert no_default.match(None) is None and no_default.match("zzz.test") is None


def test_decision_carries_route_settings() -> None:
    t = table(
        [
            {"match": "*.example.org", "backend": "$sni:8443", "upstream": "corp", "proxy_protocol": "v1"},
            {"match": "lab.internal", "backend": "$sni:443", "allow_private": True},
            {"match": "v6.example", "backend": "[2001:db8::5]:443", "proxy_protocol": "v2"},
        ],
        upstreams={"corp": {"type": "socks5", "addr": "127.0.0.1:1080"}},
    )
    assert t.match("X.Example.org.") == RouteDecision(
        "*.example.org", "x.example.org", 8443, "corp", "v1", dynamic=True, allow_private=False
    )
    assert t.match("lab.internal") == RouteDecision("lab.internal", "lab.internal", 443, "direct", None, True, True)
    assert t.match("v6.example") == RouteDecision("v6.example", "2001:db8::5", 443, "direct", "v2", False, False)


def test_dynamic_host_is_the_normalised_sni() -> None:
    t = table([{"match": "*.example.org", "backend": "$sni:443"}])
    decision = t.match("Bücher.Example.org.")
    assert decision is not None and decision.host == "xn--bcher-kva.example.org" and decision.dynamic


def test_default_backend_cannot_be_dynamic_when_built_directly() -> None:
    with pytest.raises(ValueError, match="explicit route"):
        RouteTable([], "$sni:443")


def test_ten_thousand_exact_routes_match_by_hash_lookup() -> None:
    routes = [{"match": f"host{i}.example.com", "backend": "10.0.0.1:443"} for i in range(10_000)]
    routes.append({"match": "*.example.com", "backend": "10.0.0.2:443"})
    t = table(routes)
    assert len(t) == 10_001
    names = [f"host{i}.example.com" for i in range(0, 10_000, 7)] + ["nohost.example.com"]
    lookups = 0
    start = time.perf_counter()
    for _ in range(20):
        for name in names:
            assert t.match(name) is not None
            lookups += 1
    per_lookup = (time.perf_counter() - start) / lookups
    # A linear scan of 10k routes costs milliseconds per lookup; a dict probe, about a microsecond.
    assert per_lookup < 100e-6, f"{per_lookup * 1e6:.1f} us per lookup"
    assert name_of(t, "host9999.example.com") == "host9999.example.com"
    assert name_of(t, "host10000.example.com") == "*.example.com"


# ---- brute-force reference of the documented precedence


def reference_match(routes: tuple[RouteConfig, ...], sni: str) -> str | None:
    name = sni.lower()
    if name.endswith("."):
        name = name[:-1]
    for route in routes:
        if route.kind == "exact" and route.match == name:
            return route.route_name
    best: RouteConfig | None = None
    for route in routes:
        suffix = route.match[2:]
        if route.kind == "wildcard" and name.endswith("." + suffix):
            if best is None or len(suffix) > len(best.match) - 2:
                best = route
    if best is not None:
        return best.route_name
    for route in routes:
        if route.kind == "regex" and re.search(route.match[1:], name, re.IGNORECASE):
            return route.route_name
    return None


LABELS = st.sampled_from(["a", "b", "c", "ab", "xn--bcher-kva", "x-1"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
REGEXES = st.sampled_from(["~^a\\.", "~b$", "~c", "~^a\\.b$", "~^(ab|c)\\.", "~x-1", "~\\.b\\."])
MATCHES = st.one_of(NAMES, NAMES.map(lambda n: "*." + n), REGEXES)
QUERIES = st.tuples(NAMES, st.booleans(), st.booleans()).map(
    lambda q: (q[0].upper() if q[1] else q[0]) + ("." if q[2] else "")
)


@settings(max_examples=300, deadline=None)
@given(matches=st.lists(MATCHES, unique=True, max_size=12), queries=st.lists(QUERIES, min_size=1, max_size=20))
def test_table_agrees_with_brute_force_reference(matches: list[str], queries: list[str]) -> None:
    routes = [{"match": m, "backend": f"10.0.{i // 250}.{i % 250 + 1}:443", "name": f"r{i}"} for i, m in enumerate(matches)]
    cfg = parse_config({"routes": routes, "default_backend": "10.255.0.1:443"})
    t = RouteTable(cfg.routes, cfg.default_backend)
    for sni in queries:
        expected = reference_match(cfg.routes, sni) or DEFAULT_ROUTE_NAME
        assert name_of(t, sni) == expected, (sni, matches)


# ---- forbidden destinations for "$sni" routes


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("100.127.255.254", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("fd00::1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("2001:db8::1", "reserved"),
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("2002:c0a8:0101::1", "private"),  # 6to4 of 192.168.1.1
        ("::7f00:1", "reserved"),  # deprecated IPv4-compatible form
    ],
)
def test_forbidden_destinations(address: str, reason: str) -> None:
    assert is_forbidden_destination(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    ["1.1.1.1", "8.8.8.8", "100.63.255.255", "100.128.0.0", "172.32.0.1", "169.255.0.1", "2606:4700::1111",
     "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_destinations_are_allowed(address: str) -> None:
    assert is_forbidden_destination(ipaddress.ip_address(address)) is None
