"""ebpf.tracing.network: kernel-measured TCP figures per route on /metrics and in /status.

The supervisor starts a RouteNetworkTracer (observe/tracing/route_metrics.py) before the
workers fork; workers tag their sockets with the route (RouteNetworkTracer.tag), the BPF
programs count per route, and each scrape reads the per-CPU counters. A tracer that cannot
start leaves the proxy running without these metrics: /status says why.
"""
from __future__ import annotations

import logging

from sniproxy.config import DEFAULT_ROUTE_NAME

log = logging.getLogger("sniproxy")

#: Histogram buckets kept: log2 microsecond slot i ends at 2^(i+1) us; 2^25 us = 33 s is past
#: any connect timeout the config allows to be useful, longer ones land in +Inf.
_BUCKET_SLOTS = 25


class RouteTcpTelemetry:
    def __init__(self, tracer, state: str, reason: str) -> None:
        self.tracer = tracer
        self.state = state
        self.reason = reason

    @classmethod
    def start(cls) -> "RouteTcpTelemetry":
        from sniproxy.observe.tracing import TracerError
        from sniproxy.observe.tracing.route_metrics import RouteNetworkTracer
        tracer = RouteNetworkTracer()
        try:
            tracer.start()
        except TracerError as exc:
            log.warning("ebpf.tracing.network: disabled: %s", exc)
            return cls(None, "degraded", str(exc))
        log.info("ebpf.tracing.network: per-route TCP figures from the kernel (%s hooks)",
                 tracer.hook_mode)
        return cls(tracer, "active", f"{tracer.hook_mode} hooks on inet_sock_set_state and "
                                     "tcp_retransmit_skb, scoped to the proxy's sockets by cookie")

    @property
    def tagger(self):
        return self.tracer.tag if self.tracer is not None else None

    def status(self) -> dict:
        out = {"state": self.state, "reason": self.reason}
        if self.tracer is not None and self.tracer.running:
            ov = self.tracer.get_overhead()
            out["bpf_run_time_ns"] = ov.bpf_run_time_ns
            out["bpf_run_count"] = ov.bpf_run_count
        return out

    def collector(self, config_fn):
        return _Collector(self, config_fn)

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.stop()


class _Collector:
    def __init__(self, owner: RouteTcpTelemetry, config_fn) -> None:
        self.owner = owner
        self.config_fn = config_fn

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, HistogramMetricFamily,
                                            SummaryMetricFamily)

        from sniproxy.observe.tracing.route_metrics import route_id
        tracer = self.owner.tracer
        if tracer is None or not tracer.running:
            return
        config = self.config_fn()
        names = {route_id(r.route_name): r.route_name for r in config.routes}
        names[route_id(DEFAULT_ROUTE_NAME)] = DEFAULT_ROUTE_NAME
        latency = HistogramMetricFamily(
            "sniproxy_route_backend_connect_seconds",
            "Backend connect latency measured by the kernel (SYN sent -> established), by route",
            labels=["route"])
        failures = CounterMetricFamily(
            "sniproxy_route_backend_connect_failures",
            "Backend connects the kernel saw fail, by route and reason (sk_err)",
            labels=["route", "reason"])
        retrans = CounterMetricFamily(
            "sniproxy_route_tcp_retransmits", "TCP segments retransmitted, by route and side "
            "(backend: proxy to backend, client: proxy to client)", labels=["route", "side"])
        srtt = SummaryMetricFamily(
            "sniproxy_route_tcp_srtt_at_close_seconds",
            "Smoothed RTT of each connection when it closed, by route and side",
            labels=["route", "side"])
        for st in tracer.read():
            route = names.get(st.route, "unknown")
            if st.side == "backend":
                buckets, total = [], 0
                for i in range(_BUCKET_SLOTS):
                    total += st.connect_hist_us[i]
                    buckets.append((repr((1 << (i + 1)) / 1e6), total))
                buckets.append(("+Inf", sum(st.connect_hist_us)))
                latency.add_metric([route], buckets, st.connect_sum_us / 1e6)
                for reason, n in st.connect_failures.items():
                    failures.add_metric([route, reason], n)
            retrans.add_metric([route, st.side], st.retrans_segs)
            srtt.add_metric([route, st.side], st.closes, st.srtt_sum_us / 1e6)
        yield latency
        yield failures
        yield retrans
        yield srtt
