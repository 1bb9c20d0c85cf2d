"""The application object of one worker: config, routes, resolver, connector, metrics, relay choice.

No global state: tests and workers build their own. A reload replaces the parts a new
config changes; connections already running keep the objects they started with.
"""
from __future__ import annotations

import logging
import socket
from typing import Any

from sniproxy.relay.choose import RelaySettings, choose_relay
from sniproxy.relay.userspace import PipePool, splice_available
from sniproxy.proxy.resolver import MemoryDnsCache, Resolver
from sniproxy.proxy.routes import RouteTable
from sniproxy.proxy.server import ConnectionInfo
from sniproxy.proxy.upstream import Connector
from sniproxy.telemetry.metrics import HotPath, ProxyMetrics

log = logging.getLogger("sniproxy")
access_log = logging.getLogger("sniproxy.access")


class ProxyApp:
    def __init__(self, config, metrics: ProxyMetrics, *, kernel_relay=None, dns_cache=None,
                 socket_tagger=None):
        self.metrics = metrics
        # (socket, route name, "client" | "backend") -> None: counts the socket's TCP figures
        # under the route in the kernel (ebpf.tracing.network); None when that is off.
        self.socket_tagger = socket_tagger
        self.hot = HotPath(metrics)
        self.pipes = PipePool()
        self.kernel_relay = kernel_relay          # sniproxy.ebpf.sockmap relay when active, else None
        self.splice_ok = splice_available()
        self._dns_cache = dns_cache
        self.config = config
        self.apply(config)

    def apply(self, config) -> None:
        """Build everything that depends on the config (start and reload).

        All parts are built first and swapped in together: a failure leaves the old ones.
        """
        routes = RouteTable(config.routes, config.default_backend)
        cache = self._dns_cache or MemoryDnsCache(config.dns.cache_size)
        resolver = self._reusable_resolver(config) or Resolver(
            cache,
            nameservers=list(config.dns.nameservers) if config.dns.nameservers else None,
            min_ttl_s=config.dns.min_ttl_s,
            max_ttl_s=config.dns.max_ttl_s,
            negative_ttl_s=config.dns.negative_ttl_s,
            timeout_s=config.timeouts.dns_s,
        )
        connector = Connector(resolver, config.upstreams, config.timeouts.connect_s)
        mode = config.relay.mode
        if mode == "splice" and not self.splice_ok:
            log.warning("relay.mode is \"splice\" but splice(2) does not work here: using copy")
        self.config, self.routes, self.resolver, self.connector = config, routes, resolver, connector
        # max_connections is for the whole proxy: each worker takes its share (rounded up).
        self.connection_limit = -(-config.max_connections // config.workers)
        self._dns_cache = cache
        self.use_splice = self.splice_ok and mode in ("auto", "splice")
        self.relay_settings = RelaySettings(config.timeouts.idle_s, self.use_splice,
                                            config.relay.buffer_bytes)

    def _reusable_resolver(self, config):
        """Keep the resolver (its cache, in-flight lookups and counters) when DNS settings stay."""
        old = getattr(self, "resolver", None)
        if old is not None and self.config.dns == config.dns and \
                self.config.timeouts.dns_s == config.timeouts.dns_s:
            return old
        return None

    # Resolver counters -> (level, result) labels of sniproxy_dns_cache_lookups
    _DNS_COUNTERS = {"hits": ("cache", "hit"), "misses": ("cache", "miss"),
                     "negative_hits": ("cache", "negative_hit"), "hosts_hits": ("hosts", "hit"),
                     "errors": ("dns", "error"), "queries": ("dns", "query")}

    def flush_metrics(self) -> None:
        self.hot.flush()
        self.sync_dns_metrics()

    def sync_dns_metrics(self) -> None:
        """Publish the resolver's counters as deltas (workers write metrics, the supervisor reads)."""
        stats = self.resolver.stats()
        last = self._dns_last if getattr(self, "_dns_last_owner", None) is self.resolver else {}
        for key, (level, result) in self._DNS_COUNTERS.items():
            delta = stats.get(key, 0) - last.get(key, 0)
            if delta > 0:
                self.metrics.dns_lookups.labels(level, result).inc(delta)
        self._dns_last, self._dns_last_owner = stats, self.resolver

    def relay_factory(self, client: socket.socket, backend: socket.socket):
        relay = choose_relay(client, backend, self.relay_settings, kernel=self.kernel_relay,
                             pipes=self.pipes)
        self.hot.relay_chosen(relay.kind)
        return relay

    def access_logger(self, info: ConnectionInfo, result: Any, duration: float) -> None:
        fields = {
            "client": info.client,
            "sni": info.sni,
            "route": info.route,
            "backend": info.backend,
            "upstream": info.upstream,
            "relay": info.relay,
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "duration_s": round(duration, 4),
            "outcome": result.outcome,
        }
        if result.detail:
            fields["detail"] = result.detail
        level = logging.INFO if result.outcome in ("ok", "idle_timeout") else logging.WARNING
        access_log.log(level, "", extra={"fields": fields})
