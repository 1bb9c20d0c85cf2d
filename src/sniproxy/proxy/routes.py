"""The route table: which backend a TLS server name goes to.

Precedence (documented in docs/configuration.md, "Route matching"):
  1. an exact name;
  2. a "*.suffix" wildcard; among several, the longest suffix wins (nginx `server_name`);
     "*.example.org" matches "a.example.org" and "x.y.example.org", not "example.org";
  3. a "~regex" route, the first in config order whose `re.search` finds the name
     (case-insensitive; anchor it yourself with ^...$);
  4. the default backend (also for clients that send no SNI), else no route: refuse.

The name is normalised first: lower case, one trailing dot removed, U-labels IDNA-encoded to
A-labels. Exact lookup is one dict probe; wildcards cost one dict probe per label of the name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Literal

from sniproxy.config import (
    DEFAULT_ROUTE_NAME,
    DIRECT,
    RouteConfig,
    normalize_hostname,
    parse_backend,
)

__all__ = ["RouteDecision", "RouteTable", "is_forbidden_destination", "normalize_sni"]

ProxyProtocol = Literal["v1", "v2"] | None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one connection goes. For a dynamic ("$sni:port") route, `host` is the SNI."""

    route_name: str
    host: str
    port: int
    upstream: str  # a key of config.upstreams, or "direct"
    proxy_protocol: ProxyProtocol
    dynamic: bool
    allow_private: bool


@dataclass(frozen=True, slots=True)
class _Target:
    route_name: str
    host: str | None  # None: use the SNI
    port: int
    upstream: str
    proxy_protocol: ProxyProtocol
    allow_private: bool

    @classmethod
    def from_route(cls, route: RouteConfig) -> _Target:
        backend = route.target
        return cls(route.route_name, backend.host, backend.port, route.upstream, route.proxy_protocol, route.allow_private)

    def decide(self, sni: str) -> RouteDecision:
        dynamic = self.host is None
        return RouteDecision(
            route_name=self.route_name,
            host=sni if dynamic else self.host,  # type: ignore[arg-type]
            port=self.port,
            upstream=self.upstream,
            proxy_protocol=self.proxy_protocol,
            dynamic=dynamic,
            allow_private=self.allow_private,
        )


def normalize_sni(sni: str) -> str:
    """The form routes are matched against: lower case, no trailing dot, A-labels.

    A name that is not a valid IDNA name is only lower-cased: it can still hit a regex route or
    the default backend, never an exact or wildcard one (those are valid names by construction).
    """
    if sni.isascii():
        name = sni.lower()
        return name[:-1] if name.endswith(".") else name
    try:
        return normalize_hostname(sni)
    except ValueError:
        name = sni.lower()
        return name[:-1] if name.endswith(".") else name


class RouteTable:
    """Immutable lookup structure built from validated route configs."""

    def __init__(self, routes: Iterable[RouteConfig], default_backend: str | None) -> None:
        self.routes: tuple[RouteConfig, ...] = tuple(routes)
        self._exact: dict[str, _Target] = {}
        self._wildcard: dict[str, _Target] = {}  # keyed by the suffix after "*."
        self._regex: list[tuple[re.Pattern[str], _Target]] = []
        for route in self.routes:
            target = _Target.from_route(route)
            kind = route.kind
            # setdefault: config validation forbids duplicates; if one slips through, the first wins
            # exactly as config order would decide.
            if kind == "exact":
                self._exact.setdefault(route.match, target)
            elif kind == "wildcard":
                self._wildcard.setdefault(route.match[2:], target)
            else:
                self._regex.append((re.compile(route.match[1:], re.IGNORECASE), target))
        self._default: _Target | None = None
        if default_backend is not None:
            backend = parse_backend(default_backend)
            if backend.dynamic:
                raise ValueError("default_backend cannot be \"$sni:port\"; permit $sni with an explicit route")
            self._default = _Target(DEFAULT_ROUTE_NAME, backend.host, backend.port, DIRECT, None, False)

    def __len__(self) -> int:
        return len(self.routes)

    @property
    def has_default(self) -> bool:
        return self._default is not None

    def match(self, sni: str | None) -> RouteDecision | None:
        """The route for this server name, the default backend, or None (refuse the client)."""
        if sni is None or sni == "":
            return self._default.decide("") if self._default is not None else None
        name = normalize_sni(sni)
        target = self._exact.get(name)
        if target is None and self._wildcard:
            # Suffixes from longest to shortest: the first hit is the longest wildcard.
            dot = name.find(".")
            while dot != -1:
                target = self._wildcard.get(name[dot + 1 :])
                if target is not None:
                    break
                dot = name.find(".", dot + 1)
        if target is None:
            for pattern, candidate in self._regex:
                if pattern.search(name):
                    target = candidate
                    break
        if target is None:
            target = self._default
        return target.decide(name) if target is not None else None


# Destinations a "$sni:port" route refuses unless allow_private: the client picks the name, so
# without this a public listener is an open door into the proxy's own networks (SSRF).
_FORBIDDEN_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),  # "this network"; 0.0.0.0 connects to the local host
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "private"),  # RFC 6598 carrier-grade NAT: someone's internal network
        ("169.254.0.0/16", "link-local"),  # includes cloud metadata at 169.254.169.254
        ("224.0.0.0/4", "multicast"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "reserved"),  # TEST-NET-1
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),  # TEST-NET-2
        ("203.0.113.0/24", "reserved"),  # TEST-NET-3
        ("240.0.0.0/4", "reserved"),  # class E and the broadcast address
    )
)
_FORBIDDEN_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/8", "reserved"),  # IPv4-compatible and other legacy forms (mapped/NAT64 checked first)
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments, incl. Teredo and ORCHID
        ("2001:db8::/32", "reserved"),  # documentation
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("fc00::/7", "private"),  # unique local addresses
        ("fec0::/10", "private"),  # deprecated site-local
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def is_forbidden_destination(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why dynamic forwarding must not connect to `ip` ("loopback", "private", "link-local",
    "unspecified", "multicast", "reserved"), or None for a public address.

    IPv6 forms that embed an IPv4 address (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4
    2002::/16) are judged by the IPv4 address they lead to.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_forbidden_destination(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_forbidden_destination(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _SIX_TO_FOUR:
            return is_forbidden_destination(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
        table: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = _FORBIDDEN_V6
    else:
        table = _FORBIDDEN_V4
    # Most specific reason first: ::1 is "loopback", not the "reserved" ::/8 around it.
    for network, reason in table:
        if ip in network:
            return reason
    return None
