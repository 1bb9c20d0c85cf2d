"""Prometheus view of the kernel data path: read on each /metrics scrape in the supervisor."""
from __future__ import annotations

from sniproxy.ebpf.objects import BpfError
from sniproxy.ebpf.sockmap import STAT_NAMES as BPF_STAT_NAMES
from sniproxy.ebpf.stats import FALLBACK_REASONS, TCP_SPLICE_FALLBACK_REASONS, hit_rate


class _TcpSpliceMetrics:
    """The ebpf_tcp_splice_* families (issue 11)."""

    def _tcp_splice(self, totals, ts_dp):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily("ebpf_tcp_splice_active_flows",
                                "Connections spliced in tc now (not yet finished)",
                                value=totals["ts_armed"] - totals["ts_ended"])
        yield CounterMetricFamily("ebpf_tcp_splice_engaged",
                                  "Connections handed to the tc splice",
                                  value=totals["ts_armed"] - totals["ts_adopted"])
        fb = CounterMetricFamily("ebpf_tcp_splice_fallbacks",
                                 "Connections the tc splice refused (they took the next relay "
                                 "kind), by reason", labels=["reason"])
        for r in TCP_SPLICE_FALLBACK_REASONS:
            fb.add_metric([r], totals[f"ts_fallback_{r}"])
        yield fb
        if ts_dp is None:
            return
        try:
            st = ts_dp.stats()
        except BpfError:
            return
        nbytes = CounterMetricFamily("ebpf_tcp_splice_bytes",
                                     "Payload bytes spliced in tc (retransmissions included)",
                                     labels=["direction"])
        nbytes.add_metric(["client_to_backend"], st["c2b_bytes"])
        nbytes.add_metric(["backend_to_client"], st["b2c_bytes"])
        yield nbytes
        pk = CounterMetricFamily("ebpf_tcp_splice_packets", "Segments spliced in tc",
                                 labels=["direction"])
        pk.add_metric(["client_to_backend"], st["c2b_packets"])
        pk.add_metric(["backend_to_client"], st["b2c_packets"])
        yield pk
        yield CounterMetricFamily("ebpf_tcp_splice_frozen_packets",
                                  "Packets of the proxy's own spliced sockets dropped at egress",
                                  value=st["frozen"])


class KernelCollector(_TcpSpliceMetrics):
    """prometheus_client custom collector: read on each /metrics scrape in the supervisor."""

    def __init__(self, kdp):   # relay.datapath.KernelDataPath
        self.kdp = kdp

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        kdp = self.kdp
        totals = kdp.counters.totals()
        modes = kdp.modes
        state = GaugeMetricFamily("ebpf_feature_state", "1 for the state each eBPF feature is in",
                                  labels=["feature", "state"])
        for name, f in modes.features.items():
            for s in ("active", "degraded", "disabled"):
                state.add_metric([name, s], 1.0 if f.state == s else 0.0)
        yield state
        # Lets an alert tell "disabled because the config says so" from "asked for, not running".
        requested = GaugeMetricFamily("ebpf_feature_requested",
                                      "1 when the config asks for the eBPF feature",
                                      labels=["feature"])
        for name, f in modes.features.items():
            requested.add_metric([name], 1.0 if f.requested else 0.0)
        yield requested
        active = totals["inserted"] - totals["removed"]
        yield GaugeMetricFamily("ebpf_active_connections",
                                "Connections relayed by the kernel now (all workers)", value=active)
        util = GaugeMetricFamily("ebpf_map_utilization", "Entries used / max_entries, by map",
                                 labels=["map"])
        if kdp.sockmap is not None:
            util.add_metric(["sockmap"], 2 * active / kdp.sockmap.maps.max_entries)
        ts_dp = getattr(kdp, "tcp_splice", None)
        if ts_dp is not None:
            util.add_metric(["tcp_splice"], (totals["ts_armed"] - totals["ts_removed"])
                            / ts_dp.max_flows)
        if kdp.dns_map is not None:
            m = kdp.dns_map.map
            try:
                util.add_metric(["dns_cache"], len(m.lookup_batch()) / m.max_entries)
            except BpfError:
                pass
        yield util
        yield from self._tcp_splice(totals, ts_dp)
        yield from self._sockmap(totals)
        if kdp.dns_map is not None:
            yield from self._dns_cache(totals)

    def _sockmap(self, totals):
        """ebpf_sockmap_*: the proxy's shared counters, then the program's per-CPU ones."""
        from prometheus_client.core import CounterMetricFamily

        kdp = self.kdp
        fallbacks = CounterMetricFamily("ebpf_sockmap_fallbacks",
                                        "Connections that could not enter the sockmap and used "
                                        "the user-space relay, by reason", labels=["reason"])
        for r in FALLBACK_REASONS:
            fallbacks.add_metric([r], totals[f"fallback_{r}"])
        yield fallbacks
        yield CounterMetricFamily("ebpf_sockmap_pauses",
                                  "Sources paused because max_inflight_bytes were in flight",
                                  value=totals["pauses"])
        yield CounterMetricFamily("ebpf_sockmap_inflight_over_limit",
                                  "Times a direction had more than max_inflight_bytes in the kernel "
                                  "and not paused (backpressure off, or the other direction busy)",
                                  value=totals["over_limit"])
        if kdp.modes.running("stats") and kdp.stat_map is not None:
            bpf = {n: kdp.stat_map.percpu_sum(i) for i, n in enumerate(BPF_STAT_NAMES)}
            redirects = CounterMetricFamily("ebpf_sockmap_redirects",
                                            "skbs redirected by the verdict program",
                                            labels=["direction"])
            redirects.add_metric(["client_to_backend"], bpf["up_skbs"])
            redirects.add_metric(["backend_to_client"], bpf["down_skbs"])
            yield redirects
            nbytes = CounterMetricFamily("ebpf_sockmap_redirected_bytes",
                                         "Bytes redirected by the verdict program",
                                         labels=["direction"])
            nbytes.add_metric(["client_to_backend"], bpf["up_bytes"])
            nbytes.add_metric(["backend_to_client"], bpf["down_bytes"])
            yield nbytes
            fails = CounterMetricFamily("ebpf_sockmap_redirect_failures",
                                        "skbs the program could not redirect", labels=["reason"])
            fails.add_metric(["peer_gone"], bpf["redirect_fail"])
            fails.add_metric(["no_peer"], bpf["no_peer"])
            yield fails
            yield CounterMetricFamily("ebpf_sockmap_fin_skbs_dropped",
                                      "Zero-length skbs (FIN) dropped by the verdict program",
                                      value=bpf["fin_drops"])
            notes = CounterMetricFamily("ebpf_sockmap_credit_notifications",
                                        "Backpressure notifications from the program",
                                        labels=["result"])
            notes.add_metric(["sent"], bpf["notify"])
            notes.add_metric(["lost"], bpf["notify_lost"])
            yield notes

    @staticmethod
    def _dns_cache(totals):
        """ebpf_dns_cache_*: the seed's hit rate, per level, and the lookups behind it."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        l1, l2, miss = totals["dns_l1_hit"], totals["dns_l2_hit"], totals["dns_miss"]
        lookups = l1 + l2 + miss
        yield GaugeMetricFamily("ebpf_dns_cache_hit_rate",
                                "DNS cache hits (either level) / lookups, all workers",
                                value=hit_rate(l1 + l2, lookups))
        level = GaugeMetricFamily("ebpf_dns_cache_level_hit_rate",
                                  "Hit rate of each level: 1 = per-worker dict (all lookups), "
                                  "2 = shared BPF LRU map (lookups that missed level 1)",
                                  labels=["level"])
        level.add_metric(["1"], hit_rate(l1, lookups))
        level.add_metric(["2"], hit_rate(l2, l2 + miss))
        yield level
        counts = CounterMetricFamily("ebpf_dns_cache_lookups", "DNS cache lookups by result",
                                     labels=["result"])
        counts.add_metric(["l1_hit"], l1)
        counts.add_metric(["l2_hit"], l2)
        counts.add_metric(["miss"], miss)
        yield counts
