"""Start-up of the kernel data path, in the supervisor before the workers fork.

    kdp = KernelDataPath.start(config)      # measure, decide each feature's mode (strict: raises)
    factory = kdp.worker_factory()          # before each fork: reserves the worker's ring and row
    kernel = factory(metrics)               # in the worker: relay.sockmap.WorkerKernel

It owns the BPF objects and shared maps (sockmap program, DNS cache map, counters); the
workers only use them. /status reads `status()`, /metrics `telemetry.kernel_metrics`.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from sniproxy.ebpf import sockmap as sm
from sniproxy.ebpf.modes import Modes, decide_modes
from sniproxy.ebpf.objects import BPF_MAP_TYPE_PERCPU_ARRAY, BpfError, Map
from sniproxy.ebpf.sockmap import STAT_NAMES as BPF_STAT_NAMES
from sniproxy.ebpf.stats import FALLBACK_REASONS, TCP_SPLICE_FALLBACK_REASONS, SharedCounters
from sniproxy.relay.sockmap import SO_SNDBUFFORCE, WorkerKernel

log = logging.getLogger("sniproxy")


class KernelStartError(Exception):
    """Strict mode: a requested eBPF feature cannot run. The message lists each with its fix."""

class KernelDataPath:
    """Owns the BPF objects and shared maps; created once in the supervisor before forking."""

    def __init__(self, config, modes: Modes, sockmap: sm.SockmapDataPath | None, dns_map,
                 counters: SharedCounters, sndbuf_force_ok: bool, tcp_splice=None):
        self.config = config
        self.tcp_splice = tcp_splice            # ebpf.tcpsplice.TcpSpliceDataPath or None
        self.modes = modes
        self.sockmap = sockmap
        self.dns_map = dns_map                  # dnscache.DnsMap or None
        self.counters = counters
        self.sndbuf_force_ok = sndbuf_force_ok
        self._spawned = 0
        self._rows = counters.rows
        self.stat_map: Map | None = sockmap.maps.stat if sockmap is not None else None

    # --- start ----------------------------------------------------------------------------
    @classmethod
    def start(cls, config, support=None) -> "KernelDataPath":
        """Measure, decide each feature's mode, start what can run. Strict mode raises."""
        from sniproxy.ebpf.support import check_system_support

        requested = config.ebpf_requested()
        support = support if support is not None else check_system_support()
        failures: dict[str, str] = {}
        degraded: dict[str, str] = {}
        rows = max(sm.MAX_RINGS, 2 * config.workers + 2)
        sockmap_dp, stat_map = _start_sockmap_and_stats(config, requested, support, rows,
                                                        failures)
        sndbuf_ok = _sndbuf_force_allowed()
        if config.ebpf.sockmap.sndbuf_bytes and not sndbuf_ok:
            degraded["sockmap"] = (
                f"ebpf.sockmap.sndbuf_bytes={config.ebpf.sockmap.sndbuf_bytes} cannot be forced "
                "(SO_SNDBUFFORCE needs CAP_NET_ADMIN): the send buffer is capped by "
                "net.core.wmem_max, which cut sockmap throughput from ~1.7 GB/s to ~0.6 GB/s here; "
                "fix: grant CAP_NET_ADMIN or raise net.core.wmem_max")
        dns_map = None
        if requested["dns_cache"] and support.ok("dns_cache"):
            dns_map = _open_dns_cache(config, failures)
        tcp_splice = None
        if requested.get("tcp_splice") and support.ok("tcp_splice"):
            tcp_splice = _start_tcp_splice(config, rows, failures)
        modes = decide_modes(requested, support, failures=failures, degraded=degraded)
        self = cls(config, modes, sockmap_dp, dns_map, SharedCounters(rows), sndbuf_ok,
                   tcp_splice)
        self.stat_map = stat_map
        missing = modes.unavailable()
        if config.fallback_mode == "strict" and any(f.state != "degraded" for _, f in missing):
            self.close()
            lines = [f"  {name}: {f.reason}" for name, f in missing if f.state != "degraded"]
            raise KernelStartError(
                "eBPF strict mode (fallback_mode \"strict\"): requested feature(s) cannot run:\n"
                + "\n".join(lines)
                + "\nfix the cause above, disable the feature in ebpf.*, or set fallback_mode "
                  "to \"auto\" to run with what works")
        self._log_modes(missing)
        return self

    def _log_modes(self, missing) -> None:
        """What start-up decided, once: each missing feature with its fix, then the seed's lines."""
        config, modes = self.config, self.modes
        for name, f in missing:
            if f.state == "degraded":
                log.warning("eBPF %s degraded: %s", name, f.reason)
            else:
                log.warning("eBPF %s disabled: %s; %s", name, f.reason, _FALLBACK_TEXT[name])
        if self.dns_map is not None:
            log.info("eBPF DNS cache: %s", self.dns_map.note)
        if modes.running("sockmap"):
            if config.ebpf.sockmap.backpressure:
                log.info("eBPF sockmap backpressure: a direction pauses above max_inflight_bytes="
                         "%d in the kernel's queue (not while the other direction is busy: "
                         "then the excess is counted in ebpf_sockmap_inflight_over_limit_total)",
                         config.ebpf.sockmap.max_inflight_bytes)
            else:
                log.warning("ebpf.sockmap.backpressure is off: a slow receiver lets the kernel "
                            "queue without bound (counted in "
                            "ebpf_sockmap_inflight_over_limit_total); set it to true to bound it")
        if self.tcp_splice is not None:
            log.info("eBPF tcp_splice: tc programs on %s (max_flows %d)",
                     ", ".join(a.name for a in self.tcp_splice.attached), self.tcp_splice.max_flows)
        # The seed's lines, which operators grep: "eBPF manager initialised" / "... failed
        # (falling back to the traditional mode)", then the mode of each feature.
        summary = (f"mode {modes.mode} (tcp_splice {modes.state('tcp_splice')}, sockmap "
                   f"{modes.state('sockmap')}, dns_cache {modes.state('dns_cache')}, stats "
                   f"{modes.state('stats')})")
        if modes.mode == "none" and missing:
            log.warning("eBPF manager initialisation failed (falling back to the traditional "
                        "mode): %s; the warnings above say why and how to fix it", summary)
            log.info("using the traditional data forwarding mode: user-space relay, per-worker "
                     "DNS cache")
        else:
            log.info("eBPF manager initialised: %s", summary)

    # --- workers --------------------------------------------------------------------------
    def worker_factory(self) -> Callable[[Any], WorkerKernel]:
        """Call before each fork: reserves this worker's ring and counter row in the parent."""
        index = self._spawned % self._rows
        self._spawned += 1
        row = self.counters.row(index)
        row.retire_active()
        ring = None
        if self.sockmap is not None and self.modes.running("sockmap"):
            ring = self.sockmap.new_ring(index)
        ts_ring = None
        if self.tcp_splice is not None:
            ts_ring = self.tcp_splice.new_ring(index)

        def make(metrics) -> WorkerKernel:
            kernel = WorkerKernel(self, metrics, ring, index, row)
            kernel.tcp_splice = None
            if ts_ring is not None:
                from sniproxy.relay.tcpsplice import WorkerSplice
                cfg = self.config.ebpf.tcp_splice
                counters = self.counters
                kernel.tcp_splice = WorkerSplice(
                    self.tcp_splice, ts_ring, index, row, linger_s=cfg.linger_s,
                    max_flows=cfg.max_flows,
                    total_active=lambda: counters.total("ts_armed") - counters.total("ts_removed"),
                    shared=counters)
                kernel.tcp_splice.idle_timeout_s = self.config.timeouts.idle_s
            return kernel

        make.row = index          # what worker_gone() needs when this worker dies
        return make

    def worker_gone(self, row: int) -> None:
        """In the supervisor, once the worker of `row` exited (even by SIGKILL): purge the map
        entries it left and retire its active count (else /status reports connections that do
        not exist, and the map-capacity check falls back with map_full for good)."""
        purged = 0
        if self.sockmap is not None:
            try:
                purged = self.sockmap.purge_ring(row)
            except BpfError as exc:
                log.warning("could not purge the sockmap entries of a dead worker: %s", exc)
        self.counters.row(row).retire_active()
        if purged:
            log.warning("sockmap: removed %d socket entries (%d connections) left by a worker "
                        "that died", purged, purged // 2)

    def tune_listener(self, sock: socket.socket) -> None:
        """Before listen(): tcp_splice's MSS clamp (the attached interfaces' MTUs differ)."""
        if self.tcp_splice is not None:
            self.tcp_splice.clamp(sock)

    # --- views ----------------------------------------------------------------------------
    def status(self) -> dict:
        out = self.modes.status()
        if self.dns_map is not None:
            out["pinning"] = "on" if self.dns_map.pinned_at else "off"
            if self.dns_map.pinned_at:
                out["pin_path"] = self.dns_map.pinned_at
            else:
                out["reasons"]["pinning"] = self.dns_map.note
        else:
            out["pinning"] = "off"
        totals = self.counters.totals()
        out["active_connections"] = totals["inserted"] - totals["removed"]
        if self.sockmap is not None:
            try:
                out["map_entries"] = self.sockmap.entries()
            except BpfError:
                pass
        out["fallbacks"] = {r: totals[f"fallback_{r}"] for r in FALLBACK_REASONS}
        out["tcp_splice_detail"] = self.tcp_splice_status(totals)
        return out

    def tcp_splice_status(self, totals: dict | None = None) -> dict:
        totals = totals if totals is not None else self.counters.totals()
        out: dict = {"state": self.modes.state("tcp_splice")}
        reason = self.modes.features["tcp_splice"].reason
        if reason:
            out["reason"] = reason
        if self.tcp_splice is not None:
            out["interfaces"] = [a.name for a in self.tcp_splice.attached]
            out["max_flows"] = self.tcp_splice.max_flows
            # MSS clamp: the smallest MTU of the attached interfaces when they differ
            out["clamp_mtu"] = self.tcp_splice.clamp_mtu
            # restart survival: where the flow maps are pinned (null: not), and how many live
            # flows this proxy took over from its predecessor at start
            out["pin_path"] = self.tcp_splice.pin_dir
            out["inherited_flows"] = self.tcp_splice.inherited
            reader = self.tcp_splice.state_reader
            out["socket_state"] = "bpf_getsockopt" if reader is not None else "tcp_repair"
            if reader is None and self.tcp_splice.state_reader_note:
                out["socket_state_detail"] = self.tcp_splice.state_reader_note
            from sniproxy.relay.tcpsplice import handover_mode
            out["handover"], detail = handover_mode(self.tcp_splice)
            if detail:
                out["handover_detail"] = detail
            out["active_flows"] = totals["ts_armed"] - totals["ts_ended"]
            out["lingering_flows"] = totals["ts_ended"] - totals["ts_removed"]
            out["engaged_total"] = totals["ts_armed"] - totals["ts_adopted"]
        out["fallbacks"] = {r: totals[f"ts_fallback_{r}"] for r in TCP_SPLICE_FALLBACK_REASONS}
        return out

    def close(self) -> None:
        if self.tcp_splice is not None:
            try:
                self.tcp_splice.close()       # removes exactly the filters/qdiscs it added
            except BpfError as exc:
                log.warning("removing the tcp_splice tc programs: %s", exc)
            self.tcp_splice = None
        if self.stat_map is not None and self.sockmap is None:
            self.stat_map.close()
        self.stat_map = None
        if self.sockmap is not None:
            try:
                self.sockmap.close()
            except BpfError as exc:
                log.warning("detaching the sockmap program: %s", exc)
            self.sockmap = None
        if self.dns_map is not None:
            self.dns_map.map.close()         # a pinned map lives on in bpffs, by design
            self.dns_map = None
        self.counters.close()


def _start_sockmap_and_stats(config, requested, support, rows: int, failures: dict[str, str]):
    """(the loaded sockmap data path or None, the per-CPU stats map or None)."""
    sockmap_dp = stat_map = None
    if requested["sockmap"] and support.ok("sockmap"):
        try:
            sockmap_dp = sm.SockmapDataPath.load(config.ebpf.sockmap.max_entries,
                                                 stats_on=requested["stats"], rings=rows)
            stat_map = sockmap_dp.maps.stat
        except OSError as exc:
            failures["sockmap"] = f"loading the sockmap program failed: {exc}"
    if requested["stats"] and support.ok("stats") and stat_map is None:
        # No program to count (the sockmap is off): the counters still exist, shared,
        # so /metrics keeps its shape. SOCKHASH maps need CAP_NET_ADMIN, this one does not.
        try:
            stat_map = Map.create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, len(BPF_STAT_NAMES),
                                  "sni_proxy_stat")
        except OSError as exc:
            failures["stats"] = f"creating the per-CPU stats map failed: {exc}"
    return sockmap_dp, stat_map


def _open_dns_cache(config, failures: dict[str, str]):
    """The shared LRU map, pinned on bpffs when ebpf.dns_cache.pin_path asks (mounting
    /sys/fs/bpf here, at start-up, as root: logged), else None with the failure recorded."""
    from sniproxy.ebpf import bpffs
    from sniproxy.ebpf.dnscache import open_dns_map
    pin_path = config.ebpf.dns_cache.pin_path
    pin_problem = None
    if pin_path is not None:
        pin_problem = bpffs.ensure_mounted(pin_path, "the shared DNS cache (ebpf.dns_cache.pin_path)")
    try:
        return open_dns_map(config.ebpf.dns_cache.max_entries, pin_path, pin_problem=pin_problem)
    except OSError as exc:
        failures["dns_cache"] = (f"creating the BPF LRU map failed: {exc}; the per-worker "
                                 "in-memory DNS cache is used")
        return None


def _start_tcp_splice(config, rows: int, failures: dict[str, str]):
    """Load and attach the tc programs; on failure record why (the mode says disabled)."""
    from sniproxy.ebpf import tcpsplice as ts

    cfg = config.ebpf.tcp_splice
    if cfg.interfaces:
        names = list(cfg.interfaces)
    else:
        names, how = default_splice_interfaces(config)
        log.info("tcp_splice: attaching to %s (%s; set ebpf.tcp_splice.interfaces to choose)",
                 ", ".join(names), how)
    pin_dir = cfg.pin_path
    if pin_dir is not None:
        from sniproxy.ebpf import bpffs
        problem = bpffs.ensure_mounted(pin_dir, "the tcp_splice flow maps "
                                                "(ebpf.tcp_splice.pin_path)")
        if problem:
            log.warning("tcp_splice: the flow maps are not pinned, so live flows do not survive "
                        "a restart: %s (ebpf.tcp_splice.pin_path)", problem)
            pin_dir = None
    try:
        dp = ts.TcpSpliceDataPath.load(cfg.max_flows, rings=rows, pin_dir=pin_dir)
    except OSError as exc:          # BpfError is an OSError
        failures["tcp_splice"] = f"loading the tc programs failed: {exc}"
        return None
    owners = _live_owners(dp) if dp.inherited else []
    if owners:
        # Another running proxy uses these pins: taking its flows over would break it.
        dp.pins.clear()
        dp.pin_dir = None
        dp.close()
        failures["tcp_splice"] = (
            f"the flow maps pinned at {pin_dir} belong to running process(es) "
            f"{', '.join(map(str, owners))} (another sni-proxy?); fix: give each proxy its own "
            "ebpf.tcp_splice.pin_path")
        return None
    if dp.pin_note:
        log.warning("tcp_splice: the pinned flow maps of a previous proxy were not reused: %s; "
                    "its flows end at their next packet", dp.pin_note)
    try:
        dp.attach(names)
        if dp.inherited:
            n = dp.orphan_claims(config.workers)
            log.info("tcp_splice: took over %d live flow(s) of a previous proxy from %s; the "
                     "workers remove each once it ended or went idle", n, pin_dir)
        if dp.stale_replaced:
            log.warning("tcp_splice: replaced %d tc filter(s) left by a proxy that was killed; %s",
                        dp.stale_replaced,
                        "its flows go on (pinned maps)" if dp.inherited else
                        "connections it still spliced are reset at their next packet")
        _start_state_reader(dp, cfg.bpf_socket_state)
        _log_handover(dp)
    except OSError as exc:          # BpfError is an OSError
        dp.close()
        failures["tcp_splice"] = (f"attaching the tc programs to {', '.join(names)} failed: "
                                  f"{exc}; fix: check ebpf.tcp_splice.interfaces and that "
                                  "CAP_NET_ADMIN is granted")
        return None
    return dp


def _log_handover(dp) -> None:
    """Which hand-over the workers run (issue 14: the compiled one, or Python and why)."""
    from sniproxy.relay.tcpsplice import handover_mode
    mode, why = handover_mode(dp)
    if mode == "compiled":
        log.info("tcp_splice: hand-over compiled (sniproxy.ebpf._handover; "
                 "SNI_PROXY_HANDOVER=python selects the Python one)")
    else:
        log.info("tcp_splice: hand-over in Python: %s", why)


def _start_state_reader(dp, wanted: bool) -> None:
    """The hand-over's one-call socket reader (ebpf/sockstate.py); without it, TCP_REPAIR."""
    if not wanted:
        dp.state_reader_note = "off in the config (ebpf.tcp_splice.bpf_socket_state)"
        log.info("tcp_splice: socket state read with TCP_REPAIR (%s)", dp.state_reader_note)
        return
    from sniproxy.ebpf.sockstate import SocketStateReader
    try:
        dp.state_reader = SocketStateReader.open()
    except OSError as exc:
        dp.state_reader_note = str(exc)
        log.info("tcp_splice: socket state read with TCP_REPAIR, 10 system calls more per "
                 "connection: the BPF getsockopt reader is unavailable: %s (it needs kernel "
                 "6.2+, CAP_PERFMON and a cgroup v2 hierarchy)", exc)
        return
    log.info("tcp_splice: socket state read by a BPF getsockopt program attached to cgroup %s "
             "(set ebpf.tcp_splice.bpf_socket_state false to use TCP_REPAIR instead)",
             dp.state_reader.cgroup)


def _live_owners(dp) -> list[int]:
    """Processes that still claim flows in pinned maps (none after a SIGKILL of the proxy)."""
    import os
    from sniproxy.ebpf.tcpsplice import pid_alive
    return sorted({pid for pid, _ in dp.claimed().values()
                   if pid not in (0, os.getpid()) and pid_alive(pid)})


# Addresses in the documentation ranges (RFC 5737, RFC 3849): their route is the default one.
_DEFAULT_ROUTE_PROBES = ("192.0.2.1", "2001:db8::1")


def default_splice_interfaces(config) -> tuple[list[str], str]:
    """The interfaces tcp_splice attaches to when ebpf.tcp_splice.interfaces is null, and how
    they were found: `lo`, the interfaces holding the listen addresses (all that are up for a
    wildcard address: clients may come through any), and the interfaces of the routes to
    the backends and SOCKS5 servers (the default route's when a backend is a name, which
    resolves at connect time). A flow that uses another one takes the next relay kind
    (`interface_not_attached`, logged with the fix)."""
    import ipaddress
    from sniproxy.ebpf import tcpsplice as ts

    up = ts.up_interfaces()
    want = {"lo"}
    for addr in config.listen:
        try:
            ip = ipaddress.ip_address(addr.host)
        except ValueError:
            return up, f"listen address {addr.host} is a name: every interface that is up"
        if ip.is_unspecified:
            return up, f"listen address {addr.host} is a wildcard: every interface that is up"
        try:
            name = ts.address_interface(addr.host)
        except OSError:
            name = None
        if name is None:
            return up, f"no interface holds listen address {addr.host}: every interface that is up"
        want.add(name)
    hosts, by_name = [], False
    targets = [(r.upstream, r.target.host) for r in config.routes]
    if config.default_backend is not None:
        # validated "host:port" / "[v6]:port" / "$sni:port" (relay/ does not import config)
        host = config.default_backend.rsplit(":", 1)[0].strip("[]")
        targets.append(("direct", None if host.lower() == "$sni" else host))
    for upstream, host in targets:
        if upstream != "direct" and upstream in config.upstreams:
            host = config.upstreams[upstream].address.host
        if host is None:
            by_name = True                 # "$sni:port": the client's name
            continue
        try:
            ipaddress.ip_address(host)
            hosts.append(host)
        except ValueError:
            by_name = True
    if by_name:
        hosts.extend(_DEFAULT_ROUTE_PROBES)
    for host in dict.fromkeys(hosts):
        try:
            want.add(socket.if_indextoname(ts.route_oif(host)))
        except OSError:
            pass                          # no route (yet): that backend falls back, counted
    return ([n for n in up if n in want],
            "lo, the listen addresses' interfaces and the routes to the backends")


_FALLBACK_TEXT = {
    "tcp_splice": "connections use the next relay kind (sockmap, then user space)",
    "sockmap": "connections use the user-space relay (splice/copy)",
    "dns_cache": "each worker uses its own in-memory DNS cache",
    "stats": "the ebpf_* per-CPU counters are not exported",
}


def _sndbuf_force_allowed() -> bool:
    with socket.socket() as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 1 << 20)
            return True
        except OSError:
            return False
