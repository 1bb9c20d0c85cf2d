"""DNS resolution for backends: IP literals, /etc/hosts, then DNS with a TTL-honouring cache.

Order of answers for `await Resolver.resolve(host)`:
1. IP literals are returned as they are (no cache, no counters).
2. Names in the hosts file (re-read when it changes) are answered from it.
3. The cache (`DnsCache`): a positive entry returns its addresses, a negative one raises.
4. DNS through dnspython's asyncio resolver: A and AAAA queried concurrently, the answers' real
   TTLs clamped to [min_ttl_s, max_ttl_s]; NXDOMAIN or no address at all is cached negatively for
   negative_ttl_s. Concurrent lookups of one name share one query (coalescing).

Addresses are returned IPv6 first, then IPv4; `upstream.open_direct` interleaves them for Happy
Eyeballs. The cache is a protocol so that a BPF LRU map can stand behind it later, with
`MemoryDnsCache` as the per-worker first level.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import dns.asyncresolver

log = logging.getLogger("sniproxy")

Address = tuple[int, tuple]  # (family, sockaddr), as socket.getaddrinfo gives them

DEFAULT_HOSTS_PATH = "/etc/hosts"
# The hosts file is read whole; one bigger than this is a mistake, not a hosts file.
MAX_HOSTS_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CachedAnswer:
    addresses: tuple[str, ...]
    expires_at: float  # on the resolver's clock (time.monotonic by default)
    negative: bool = False
    reason: str = ""  # for a negative answer: what DNS said, repeated in the error


class DnsCache(Protocol):
    def get(self, name: str, now: float) -> CachedAnswer | None: ...

    def put(self, name: str, answer: CachedAnswer) -> None: ...

    def stats(self) -> dict[str, int]: ...


class MemoryDnsCache:
    """Bounded LRU of answers; an expired entry is dropped when it is looked up.

    At `max_entries` the least recently used entry is evicted (counted in `evictions`).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.evictions = 0
        self.expirations = 0

    def get(self, name: str, now: float) -> CachedAnswer | None:
        answer = self._entries.get(name)
        if answer is None:
            return None
        if answer.expires_at <= now:
            del self._entries[name]
            self.expirations += 1
            return None
        self._entries.move_to_end(name)
        return answer

    def put(self, name: str, answer: CachedAnswer) -> None:
        self._entries[name] = answer
        self._entries.move_to_end(name)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "max_entries": self.max_entries,
            "evictions": self.evictions,
            "expirations": self.expirations,
        }


class TwoLevelDnsCache:
    """A per-worker `MemoryDnsCache` in front of a shared cache (the BPF LRU map of
    `ebpf.dnscache.SharedDnsMap`, which every worker reads and fills)."""

    # Level 1 holds the hottest names of one worker; small so that a stale copy is short-lived.
    L1_ENTRIES = 1024

    def __init__(self, shared, counters=None, l1_entries: int = L1_ENTRIES):
        self.l1 = MemoryDnsCache(l1_entries)
        self.shared = shared
        self.counters = counters          # shared counter row (ebpf_dns_cache_hit_rate) or None
        self.l1_hits = 0

    def get(self, name: str, now: float) -> CachedAnswer | None:
        answer = self.l1.get(name, now)
        if answer is not None:
            self.l1_hits += 1
            if self.counters is not None:
                self.counters.add("dns_l1_hit")
            log.debug("DNS cache hit: %s (level 1, this worker)", name)
            return answer
        record = self.shared.get(name, now)
        if record is None:
            return None
        answer = CachedAnswer(*record)
        self.l1.put(name, answer)
        return answer

    def put(self, name: str, answer: CachedAnswer) -> None:
        self.l1.put(name, answer)
        self.shared.put(name, answer)

    def stats(self) -> dict[str, int]:
        return {**self.l1.stats(), "l1_hit": self.l1_hits, **self.shared.stats()}


class ResolveError(Exception):
    """A name could not be resolved; `reason` says why (NXDOMAIN, timeout, no nameservers...)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"cannot resolve {host!r}: {reason}")
        self.host = host
        self.reason = reason


@functools.lru_cache(maxsize=4096)   # fixed backends ask about the same few strings every time
def ip_literal(host: str) -> str | None:
    """The normalised IP if `host` is an IP literal ("[::1]" accepted), else None."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def preload_dnspython() -> None:
    """Import dnspython now (in the supervisor, before the workers fork) so that its ~6 MiB
    are shared by every worker instead of imported again in each one on its first query."""
    import dns.asyncresolver  # noqa: F401
    import dns.exception  # noqa: F401
    import dns.nameserver  # noqa: F401
    import dns.rdatatype  # noqa: F401
    import dns.resolver  # noqa: F401


def parse_nameserver(spec: str) -> tuple[str, int]:
    """"1.1.1.1", "1.1.1.1:5353", "::1", "[::1]:5353" -> (ip, port)."""
    spec = spec.strip()
    error = ValueError(f"bad nameserver {spec!r}: expected \"ip\", \"ip:port\" or \"[ipv6]:port\"")
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise error
        port_s = rest[1:] if rest else "53"
    elif spec.count(":") == 1:
        host, _, port_s = spec.partition(":")
    else:
        host, port_s = spec, "53"
    if ip_literal(host) is None or not port_s.isdigit() or not 0 < int(port_s) <= 0xFFFF:
        raise error
    return host, int(port_s)


class HostsFile:
    """/etc/hosts, parsed; re-read when its mtime, size or inode changes."""

    def __init__(self, path: str = DEFAULT_HOSTS_PATH) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._names: dict[str, tuple[str, ...]] = {}

    def lookup(self, name: str) -> tuple[str, ...] | None:
        self._refresh()
        return self._names.get(name)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._names = None, {}
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, "rb") as f:
                text = f.read(MAX_HOSTS_FILE_BYTES).decode("utf-8", "replace")
        except OSError:
            return  # keep the last good table
        self._stamp, self._names = stamp, self.parse(text)

    @staticmethod
    def parse(text: str) -> dict[str, tuple[str, ...]]:
        names: dict[str, list[str]] = {}
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            ip = ip_literal(fields[0].split("%", 1)[0])
            if ip is None:
                continue
            for name in fields[1:]:
                addrs = names.setdefault(name.lower().rstrip("."), [])
                if ip not in addrs:
                    addrs.append(ip)
        # IPv6 first, like DNS answers, stable otherwise.
        return {n: tuple(sorted(a, key=lambda ip: ":" not in ip)) for n, a in names.items()}


class Resolver:
    """Async resolver with a cache; one per worker (per event loop)."""

    def __init__(
        self,
        cache: DnsCache,
        *,
        nameservers: list[str] | None = None,
        min_ttl_s: float = 5,
        max_ttl_s: float = 3600,
        negative_ttl_s: float = 5,
        timeout_s: float = 5,
        hosts_path: str | None = DEFAULT_HOSTS_PATH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= min_ttl_s <= max_ttl_s:
            raise ValueError(f"need 0 <= min_ttl_s <= max_ttl_s, got {min_ttl_s}, {max_ttl_s}")
        self.cache = cache
        self.min_ttl_s = min_ttl_s
        self.max_ttl_s = max_ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self.hosts = HostsFile(hosts_path) if hosts_path else None
        self._inflight: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        self.counters = {"hits": 0, "misses": 0, "negative_hits": 0, "errors": 0,
                         "hosts_hits": 0, "coalesced": 0, "queries": 0}
        # Checked now (a bad entry is a config error at start), built on the first query.
        self._servers = None if nameservers is None else [parse_nameserver(s) for s in nameservers]
        self._dns_built = False
        self._dns_resolver: dns.asyncresolver.Resolver | None = None
        self._no_dns_reason = ""

    @property
    def _dns(self) -> dns.asyncresolver.Resolver | None:
        """dnspython's resolver, made on first use: importing dnspython costs ~6 MiB per
        process, which a config whose backends are all IP addresses never needs."""
        if not self._dns_built:
            self._dns_resolver, self._no_dns_reason = self._make_dns(self._servers)
            self._dns_built = True
        return self._dns_resolver

    def _make_dns(self, servers: list[tuple[str, int]] | None) -> tuple[dns.asyncresolver.Resolver | None, str]:
        import dns.asyncresolver
        import dns.nameserver
        import dns.resolver

        if servers is None:
            try:
                r = dns.asyncresolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration:
                return None, ("no nameservers: /etc/resolv.conf has none; "
                              "list them in the resolver's \"nameservers\" config")
        else:
            r = dns.asyncresolver.Resolver(configure=False)
            if not servers:
                return None, "no nameservers: the resolver's \"nameservers\" config list is empty"
            r.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in servers]
        r.lifetime = self.timeout_s
        r.timeout = self.timeout_s
        r.cache = None  # ours is the cache; dnspython's would hide TTLs from the counters
        return r, ""

    @property
    def nameservers(self) -> list[str]:
        import dns.nameserver

        if self._dns is None:
            return []
        out = []
        for ns in self._dns.nameservers:
            if isinstance(ns, dns.nameserver.Do53Nameserver):
                host = f"[{ns.address}]" if ":" in ns.address else ns.address
                out.append(f"{host}:{ns.port}")
            else:
                out.append(str(ns))
        return out

    def stats(self) -> dict[str, int]:
        return {**self.counters, "inflight": len(self._inflight),
                **{f"cache_{k}": v for k, v in self.cache.stats().items()}}

    async def resolve(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of `host`; raises ResolveError."""
        ip = ip_literal(host)
        if ip is not None:
            return [ip]
        name = host.lower().rstrip(".")
        if not name:
            raise ResolveError(host, "empty host name")
        if self.hosts is not None:
            local = self.hosts.lookup(name)
            if local:
                self.counters["hosts_hits"] += 1
                return list(local)
        cached = self.cache.get(name, self.clock())
        if cached is not None:
            if cached.negative:
                self.counters["negative_hits"] += 1
                raise ResolveError(host, f"{cached.reason} (cached)")
            self.counters["hits"] += 1
            return list(cached.addresses)
        fut = self._inflight.get(name)
        if fut is None:
            self.counters["misses"] += 1
            fut = asyncio.ensure_future(self._query(name))
            self._inflight[name] = fut
            fut.add_done_callback(lambda f, n=name: self._finished(n, f))
        else:
            self.counters["coalesced"] += 1
        # shield: one caller giving up (its connection closed) must not cancel the others' query.
        return list(await asyncio.shield(fut))

    def _finished(self, name: str, fut: asyncio.Future) -> None:
        if self._inflight.get(name) is fut:
            del self._inflight[name]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: every waiter may have gone away

    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.min_ttl_s), self.max_ttl_s)

    async def _query(self, name: str) -> tuple[str, ...]:
        import dns.rdatatype
        import dns.resolver

        if self._dns is None:
            self.counters["errors"] += 1
            raise ResolveError(name, self._no_dns_reason)
        self.counters["queries"] += 1
        results = await asyncio.gather(
            self._query_type(name, dns.rdatatype.AAAA),
            self._query_type(name, dns.rdatatype.A),
            return_exceptions=True,
        )
        addresses: list[str] = []
        ttls: list[float] = []
        nxdomain = False
        failures: list[str] = []
        for rtype, res in zip(("AAAA", "A"), results):
            if isinstance(res, dns.resolver.NXDOMAIN):
                nxdomain = True
            elif isinstance(res, dns.resolver.NoAnswer):
                pass
            elif isinstance(res, BaseException):
                failures.append(f"{rtype}: {self._describe(res)}")
            else:
                rr_addrs, ttl = res
                addresses += rr_addrs
                if rr_addrs:
                    ttls.append(ttl)
        now = self.clock()
        if addresses:
            ttl = self._clamp(min(ttls))
            self.cache.put(name, CachedAnswer(tuple(addresses), now + ttl, False))
            return tuple(addresses)
        if failures:
            # A timeout or SERVFAIL says nothing about the name: not cached, retried next time.
            self.counters["errors"] += 1
            raise ResolveError(name, "; ".join(failures))
        reason = "NXDOMAIN (the name does not exist)" if nxdomain else "no A or AAAA records"
        self.cache.put(name, CachedAnswer((), now + self.negative_ttl_s, True, reason))
        raise ResolveError(name, reason)

    async def _query_type(self, name: str, rdtype) -> tuple[list[str], float]:
        assert self._dns is not None
        # lifetime bounds dnspython's retries; wait_for is the backstop for the whole call.
        answer = await asyncio.wait_for(
            self._dns.resolve(name + ".", rdtype, search=False, raise_on_no_answer=True),
            self.timeout_s + 1,
        )
        # minimum_ttl covers the whole CNAME chain, not only the final A/AAAA rrset.
        return [r.address for r in answer], float(answer.chaining_result.minimum_ttl)

    def _describe(self, exc: BaseException) -> str:
        import dns.exception
        import dns.resolver

        servers = ", ".join(self.nameservers) or "none"
        if isinstance(exc, (dns.exception.Timeout, asyncio.TimeoutError)):
            return f"timed out after {self.timeout_s:g}s asking {servers}; check the nameservers"
        if isinstance(exc, dns.resolver.NoNameservers):
            return f"every nameserver failed ({servers}): {exc}"
        return f"{type(exc).__name__}: {exc}"
