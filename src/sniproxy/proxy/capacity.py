"""Capacity: can this config hold its `max_connections` on this host, and with what.

Two users:

* start-up (`proxy.main`): `plan_capacity` turns `"workers": "auto"` into a number of workers
  that keeps every worker under the fd limit, sizes the sockmap maps when
  `ebpf.sockmap.max_entries` is not set, and `resolve` returns the concrete config; an explicit
  value is kept and, when it cannot reach max_connections, a warning gives the exact numbers.
* `sni-proxy check --config FILE`: `capacity_report` adds the host's side (fs.file-max,
  fs.nr_open, somaxconn, tcp_max_syn_backlog, ephemeral ports per backend, tcp_mem, conntrack,
  memory) as a doctor-style list with the sysctl lines to apply.

Pure arithmetic over a `HostLimits` snapshot, so the unit tests feed it made-up hosts.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

# Sockets per connection: client + backend. The splice relay adds two pipes (4 fds); the
# sockmap relay and the copy relay add none.
FDS_SOCKETS = 2
FDS_PER_CONNECTION_SPLICE = 6
# Fds a worker needs besides its connections: listeners, epoll, control socket, log file,
# the BPF maps and ring it inherits (~30), and the idle pipes its PipePool may keep
# (relay.userspace.PipePool max_idle 256 pipes = 512 fds).
FDS_RESERVED_PER_WORKER = 640
# "auto" never goes above this many workers (the config's own bound).
MAX_AUTO_WORKERS = 256
# The sockmap maps hold one entry per socket: two per connection (relay.sockmap.try_relay).
SOCKMAP_ENTRIES_PER_CONNECTION = 2
SOCKMAP_DEFAULT_ENTRIES = 65536
# tcp_splice holds one flow slot per spliced connection, plus the finished ones still lingering
# (ebpf.tcp_splice.linger_s, like TIME_WAIT): room for a quarter more than max_connections.
TCP_SPLICE_DEFAULT_FLOWS = 16384
TCP_SPLICE_FLOWS_HEADROOM = 4          # max_connections / 4 more slots for lingering flows
# Memory estimates for the report, measured with bench/held_connections.py at 10,000-100,000
# held connections on kernel 6.18 (docs/benchmarks.md, "Held connections and memory"): kernel
# memory of the proxy's side of a connection (two sockets, files, epoll entries; the psock and
# map entries with the sockmap; two pipes with splice), its Python objects, and the idle
# proxy (supervisor and shared pages, then each worker's own pages).
KERNEL_BYTES_PER_CONNECTION = {"tcp_splice": 5_000, "sockmap": 14_000, "splice": 17_700,
                               "copy": 10_000}
USER_BYTES_PER_CONNECTION = 6_000
PROXY_IDLE_BYTES = 30 << 20
WORKER_IDLE_BYTES = 5 << 20
PAGE = 4096


@dataclass(frozen=True)
class HostLimits:
    """What the host allows, read once (`HostLimits.read()`) or made up in tests."""
    fd_soft: int
    fd_hard: int
    cpus: int
    file_max: int = 1 << 31
    nr_open: int = 1 << 20
    file_nr: int = 0                       # fds open now, machine-wide
    somaxconn: int = 4096
    tcp_max_syn_backlog: int = 4096
    port_range: tuple[int, int] = (32768, 60999)
    tcp_mem: tuple[int, int, int] | None = None     # pages: low, pressure, high
    conntrack_max: int | None = None                # None: conntrack not loaded
    mem_available: int | None = None                # bytes
    euid: int = 0

    @classmethod
    def read(cls) -> "HostLimits":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        meminfo = _read_meminfo()
        file_nr = _read_ints("/proc/sys/fs/file-nr")
        return cls(
            fd_soft=soft, fd_hard=hard,
            cpus=len(os.sched_getaffinity(0)),
            file_max=_first(_read_ints("/proc/sys/fs/file-max"), 1 << 31),
            nr_open=_first(_read_ints("/proc/sys/fs/nr_open"), 1 << 20),
            file_nr=_first(file_nr, 0),
            somaxconn=_first(_read_ints("/proc/sys/net/core/somaxconn"), 4096),
            tcp_max_syn_backlog=_first(_read_ints("/proc/sys/net/ipv4/tcp_max_syn_backlog"), 4096),
            port_range=tuple(_read_ints("/proc/sys/net/ipv4/ip_local_port_range") or (32768, 60999)),
            tcp_mem=tuple(_read_ints("/proc/sys/net/ipv4/tcp_mem")) or None,
            conntrack_max=_first(_read_ints("/proc/sys/net/netfilter/nf_conntrack_max"), None),
            mem_available=meminfo.get("MemAvailable"),
            euid=os.geteuid(),
        )

    @property
    def ports(self) -> int:
        return self.port_range[1] - self.port_range[0] + 1


def _read_ints(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _first(values: list[int], default):
    return values[0] if values else default


def _read_meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


# ============================================================================== plan
@dataclass
class CapacityPlan:
    """Workers, fds and map sizes for a config on a host; `problems` say what cannot fit."""
    max_connections: int
    workers: int
    workers_auto: bool
    fds_per_connection: int
    relay: str                              # the relay the fd count assumes
    fd_limit: int                           # per process (the soft limit after raising it)
    sockmap_entries: int | None             # None: the sockmap is not asked for
    sockmap_auto: bool = False
    tcp_splice_flows: int | None = None     # None: tcp_splice is not asked for
    tcp_splice_auto: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def per_worker_connections(self) -> int:
        return -(-self.max_connections // self.workers)

    @property
    def fds_per_worker(self) -> int:
        return self.per_worker_connections * self.fds_per_connection + FDS_RESERVED_PER_WORKER

    @property
    def connections_per_worker_possible(self) -> int:
        return max(0, (self.fd_limit - FDS_RESERVED_PER_WORKER) // self.fds_per_connection)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.workers} worker(s){' (auto)' if self.workers_auto else ''} x "
                f"{self.per_worker_connections} connections, {self.fds_per_connection} fds each "
                f"({self.relay}) = {self.fds_per_worker} fds per worker (limit {self.fd_limit})"
                + (f"; sockmap maps {self.sockmap_entries} entries"
                   + (" (auto)" if self.sockmap_auto else "") if self.sockmap_entries else "")
                + (f"; tcp_splice {self.tcp_splice_flows} flows"
                   + (" (auto)" if self.tcp_splice_auto else "") if self.tcp_splice_flows else ""))


def relay_fds(config, *, kernel_relay: bool | None = None) -> tuple[int, str]:
    """(fds per connection, relay name) for the relay most connections of this config get."""
    requested = config.ebpf_requested()
    if kernel_relay is None:
        kernel_relay = requested["sockmap"] or requested["tcp_splice"]
    if kernel_relay:
        # Both kernel relays hold the two sockets at most (tcp_splice keeps one after the
        # hand-over); connections they refuse take the user-space relay, counted by reason.
        return FDS_SOCKETS, "tcp_splice" if requested["tcp_splice"] else "sockmap"
    if config.relay.mode == "copy":
        return FDS_SOCKETS, "copy"
    return FDS_PER_CONNECTION_SPLICE, "splice"


def plan_capacity(config, host: HostLimits, *, kernel_relay: bool | None = None) -> CapacityPlan:
    """How the proxy reaches config.max_connections on `host` (the fd limit raised to the hard one)."""
    fds, relay = relay_fds(config, kernel_relay=kernel_relay)
    fd_limit = max(host.fd_soft, host.fd_hard)
    per_worker_cap = max(0, (fd_limit - FDS_RESERVED_PER_WORKER) // fds)
    auto = config.workers == "auto"
    if auto:
        needed = -(-config.max_connections // per_worker_cap) if per_worker_cap else MAX_AUTO_WORKERS + 1
        workers = min(MAX_AUTO_WORKERS, max(host.cpus, needed, 1))
    else:
        workers = config.workers
    sockmap_entries = None
    sockmap_auto = False
    if config.ebpf_requested()["sockmap"]:
        want = SOCKMAP_ENTRIES_PER_CONNECTION * config.max_connections
        if "max_entries" in config.ebpf.sockmap.model_fields_set:
            sockmap_entries = config.ebpf.sockmap.max_entries
        else:
            sockmap_entries = max(SOCKMAP_DEFAULT_ENTRIES, want)
            sockmap_auto = True
    tcp_splice_flows = None
    tcp_splice_auto = False
    if config.ebpf_requested()["tcp_splice"]:
        if "max_flows" in config.ebpf.tcp_splice.model_fields_set:
            tcp_splice_flows = config.ebpf.tcp_splice.max_flows
        else:
            tcp_splice_flows = max(TCP_SPLICE_DEFAULT_FLOWS, tcp_splice_flows_wanted(config))
            tcp_splice_auto = True
    plan = CapacityPlan(config.max_connections, workers, auto, fds, relay, fd_limit,
                        sockmap_entries, sockmap_auto, tcp_splice_flows, tcp_splice_auto)
    if plan.fds_per_worker > fd_limit:
        reach = plan.connections_per_worker_possible * workers
        need_workers = -(-config.max_connections // per_worker_cap) if per_worker_cap else None
        fixes = [f"raise the fd limit to {plan.fds_per_worker} (systemd LimitNOFILE="
                 f"{plan.fds_per_worker}, or ulimit -Hn; the hard limit here is {host.fd_hard})"]
        if need_workers is not None and need_workers <= MAX_AUTO_WORKERS:
            fixes.append(f"set workers to {need_workers} or \"auto\"" if not auto
                         else f"(auto already uses {workers})")
        fixes.append(f"or lower max_connections to {reach}")
        plan.problems.append(
            f"max_connections={config.max_connections} over {workers} worker(s) is "
            f"{plan.per_worker_connections} per worker x {fds} fds ({relay} relay) + "
            f"{FDS_RESERVED_PER_WORKER} reserved = {plan.fds_per_worker} fds, but the fd limit is "
            f"{fd_limit}: the proxy reaches about {reach} connections; fix: " + "; ".join(fixes))
    if sockmap_entries is not None and sockmap_entries < SOCKMAP_ENTRIES_PER_CONNECTION * config.max_connections:
        plan.problems.append(
            f"ebpf.sockmap.max_entries={sockmap_entries} holds {sockmap_entries // 2} connections "
            f"(2 sockets each), fewer than max_connections={config.max_connections}: the rest use "
            f"the user-space relay (counted as map_full); fix: set ebpf.sockmap.max_entries to "
            f"{SOCKMAP_ENTRIES_PER_CONNECTION * config.max_connections} or remove it (auto)")
    if tcp_splice_flows is not None and tcp_splice_flows < config.max_connections:
        plan.problems.append(
            f"ebpf.tcp_splice.max_flows={tcp_splice_flows} splices fewer connections than "
            f"max_connections={config.max_connections}: the rest take the next relay kind "
            f"(counted as map_full); fix: set it to {tcp_splice_flows_wanted(config)} or remove "
            "it (sized automatically)")
    return plan


def tcp_splice_flows_wanted(config) -> int:
    return config.max_connections + config.max_connections // TCP_SPLICE_FLOWS_HEADROOM


def resolve(config, plan: CapacityPlan):
    """The config with the plan's numbers in place of "auto" and the unset sockmap size."""
    update = {}
    if config.workers != plan.workers:
        update["workers"] = plan.workers
    if plan.sockmap_auto and config.ebpf.sockmap.max_entries != plan.sockmap_entries:
        sockmap = config.ebpf.sockmap.model_copy(update={"max_entries": plan.sockmap_entries})
        # model_copy marks max_entries as set: mark it unset again so that a reload (or a
        # second plan) still sees "not set by the user" and sizes it the same way.
        sockmap.model_fields_set.discard("max_entries")
        update["ebpf"] = config.ebpf.model_copy(update={"sockmap": sockmap})
    if plan.tcp_splice_auto and config.ebpf.tcp_splice.max_flows != plan.tcp_splice_flows:
        ts = config.ebpf.tcp_splice.model_copy(update={"max_flows": plan.tcp_splice_flows})
        ts.model_fields_set.discard("max_flows")        # still "not set by the user" (as above)
        ebpf = update.get("ebpf", config.ebpf)
        update["ebpf"] = ebpf.model_copy(update={"tcp_splice": ts})
    return config.model_copy(update=update) if update else config


# ============================================================================== report
@dataclass
class Item:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    sysctl: str = ""                # a line for /etc/sysctl.d when the fix is a sysctl
    warn_only: bool = False         # shown, but does not make the config unreachable


@dataclass
class CapacityReport:
    plan: CapacityPlan
    items: list[Item]

    @property
    def ok(self) -> bool:
        return all(i.ok or i.warn_only for i in self.items)

    def sysctl_lines(self) -> list[str]:
        return list(dict.fromkeys(i.sysctl for i in self.items if not i.ok and i.sysctl))

    def to_dict(self) -> dict:
        p = self.plan
        return {
            "ok": self.ok,
            "max_connections": p.max_connections,
            "workers": p.workers, "workers_auto": p.workers_auto,
            "relay": p.relay, "fds_per_connection": p.fds_per_connection,
            "connections_per_worker": p.per_worker_connections,
            "fds_per_worker": p.fds_per_worker, "fd_limit": p.fd_limit,
            "sockmap_entries": p.sockmap_entries,
            "tcp_splice_flows": p.tcp_splice_flows,
            "items": [{"name": i.name, "ok": i.ok, "detail": i.detail, "fix": i.fix,
                       "sysctl": i.sysctl, "warn_only": i.warn_only} for i in self.items],
            "sysctl": self.sysctl_lines(),
        }


def capacity_report(config, host: HostLimits, *, kernel_relay: bool | None = None) -> CapacityReport:
    plan = plan_capacity(config, host, kernel_relay=kernel_relay)
    n = config.max_connections
    items: list[Item] = []
    fd_problem = next((p for p in plan.problems if p.startswith("max_connections=")), "")
    items.append(Item(
        "fds per worker", not fd_problem,
        f"{plan.workers} worker(s){' (auto)' if plan.workers_auto else ''}: "
        f"{plan.per_worker_connections} connections x {plan.fds_per_connection} fds "
        f"({plan.relay} relay) + {FDS_RESERVED_PER_WORKER} = {plan.fds_per_worker} of {plan.fd_limit}",
        fd_problem.split("fix: ", 1)[-1] if fd_problem else ""))
    if plan.fds_per_worker > host.nr_open:
        items.append(Item("fs.nr_open", False,
                          f"{host.nr_open}: no process may have {plan.fds_per_worker} fds",
                          "raise fs.nr_open", f"fs.nr_open = {_round_up(plan.fds_per_worker)}"))
    total_fds = plan.workers * plan.fds_per_worker
    items.append(Item("fs.file-max", host.file_max >= total_fds + host.file_nr,
                      f"{host.file_max} (open now {host.file_nr}; the proxy may open {total_fds})",
                      "raise fs.file-max", f"fs.file-max = {_round_up(total_fds + host.file_nr)}"))
    if plan.sockmap_entries is not None:
        need = SOCKMAP_ENTRIES_PER_CONNECTION * n
        items.append(Item(
            "sockmap map size", plan.sockmap_entries >= need,
            f"{plan.sockmap_entries} entries{' (auto)' if plan.sockmap_auto else ''} for "
            f"{n} connections x 2 sockets = {need}",
            f"set ebpf.sockmap.max_entries to {need} or remove it (sized automatically)"))
    if plan.tcp_splice_flows is not None:
        items.append(Item(
            "tcp_splice flow slots", plan.tcp_splice_flows >= n,
            f"{plan.tcp_splice_flows} flows{' (auto)' if plan.tcp_splice_auto else ''} for "
            f"{n} connections (and the finished ones lingering "
            f"{config.ebpf.tcp_splice.linger_s:g} s)",
            f"set ebpf.tcp_splice.max_flows to {tcp_splice_flows_wanted(config)} or remove it "
            "(sized automatically)"))
    backlog = config.listen_backlog
    items.append(Item("net.core.somaxconn", host.somaxconn >= backlog,
                      f"{host.somaxconn} (listen_backlog {backlog}: the kernel caps it here)",
                      "raise it or lower listen_backlog", f"net.core.somaxconn = {backlog}",
                      warn_only=True))
    items.append(Item("net.ipv4.tcp_max_syn_backlog", host.tcp_max_syn_backlog >= backlog,
                      f"{host.tcp_max_syn_backlog} (listen_backlog {backlog})",
                      "raise it (SYN floods of new clients then wait instead of being dropped)",
                      f"net.ipv4.tcp_max_syn_backlog = {backlog}", warn_only=True))
    ports = host.ports
    targets = _backends(config)
    for target in targets:
        # Each backend address has its own ports from one source address. Worst case, every
        # connection goes to this one backend; at best they spread evenly over the fixed ones:
        # short of the even share, max_connections is out of reach (✗); short of the worst
        # case, only a skewed mix of names would hit the limit (!).
        even = -(-n // len(targets))
        items.append(Item(
            f"ephemeral ports to {target}", ports >= n,
            f"{ports} ports ({host.port_range[0]}-{host.port_range[1]}) from one source address; "
            f"up to {n} connections may go to this backend"
            + (f" ({even} if spread evenly over {len(targets)} backends)" if len(targets) > 1 else ""),
            "widen the range" + ("" if n <= 64511 else
                                 "; above 64,511 one source address is not enough: give the backend "
                                 "several addresses or ports"),
            "net.ipv4.ip_local_port_range = 1024 65535", warn_only=ports >= even))
    sockets = 2 * n
    if host.tcp_mem is not None:
        low, pressure, high = host.tcp_mem
        need_pages = sockets          # an idle socket still charges about a page when used
        items.append(Item(
            "net.ipv4.tcp_mem", high >= need_pages,
            f"{low} {pressure} {high} pages; {sockets} sockets need at least {need_pages} pages "
            f"({need_pages * PAGE >> 20} MiB) when each holds one page",
            "raise the pressure and high values",
            f"net.ipv4.tcp_mem = {max(low, need_pages // 2)} {max(pressure, need_pages)} "
            f"{max(high, 2 * need_pages)}"))
    if host.conntrack_max is not None:
        items.append(Item("net.netfilter.nf_conntrack_max", host.conntrack_max >= sockets,
                          f"{host.conntrack_max} for {sockets} flows (client and backend side)",
                          "raise it (or exempt the proxy's traffic with a NOTRACK rule)",
                          f"net.netfilter.nf_conntrack_max = {_round_up(sockets)}"))
    per_conn = KERNEL_BYTES_PER_CONNECTION[plan.relay] + USER_BYTES_PER_CONNECTION
    if plan.relay == "copy":
        per_conn += 2 * config.relay.buffer_bytes          # one buffer per direction
    memory = n * per_conn + PROXY_IDLE_BYTES + plan.workers * WORKER_IDLE_BYTES
    if host.mem_available is not None:
        items.append(Item(
            "memory", host.mem_available >= memory,
            f"about {memory >> 20} MiB for {n} idle connections ({per_conn} B each with the "
            f"{plan.relay} relay, measured) and {plan.workers} workers; "
            f"{host.mem_available >> 20} MiB available",
            "add memory or lower max_connections"))
    return CapacityReport(plan, items)


def _backends(config) -> list[str]:
    """Fixed destinations every connection of a route goes to (SOCKS5 upstreams, fixed backends)."""
    seen: dict[str, None] = {}
    for route in config.routes:
        if route.upstream != "direct":
            seen[f"SOCKS5 upstream {route.upstream} ({config.upstreams[route.upstream].addr})"] = None
        elif not route.target.dynamic:
            seen[str(route.target)] = None
    if config.default_backend is not None:
        seen[config.default_backend] = None
    return list(seen)


def plan_and_resolve(config, host: HostLimits | None = None, *, kernel_relay: bool | None = None):
    """(the config with concrete workers and map sizes, the plan): start-up and reload."""
    plan = plan_capacity(config, host or HostLimits.read(), kernel_relay=kernel_relay)
    return resolve(config, plan), plan


def _round_up(n: int) -> int:
    """n rounded up to a round number for a sysctl line (two significant digits)."""
    step = 10 ** max(0, len(str(n)) - 2)
    return -(-n // step) * step


def format_report(report: CapacityReport, source: str) -> str:
    p = report.plan
    lines = [f"Capacity: can {source} hold max_connections={p.max_connections} on this host?"]
    for i in report.items:
        mark = "✓" if i.ok else ("!" if i.warn_only else "✗")
        lines.append(f"  {mark} {i.name}: {i.detail}")
        if not i.ok and i.fix:
            lines.append(f"      fix: {i.fix}")
    sysctl = report.sysctl_lines()
    if sysctl:
        lines.append("  sysctl lines to apply (e.g. in /etc/sysctl.d/90-sni-proxy.conf, then "
                     "`sysctl --system`):")
        lines.extend(f"    {s}" for s in sysctl)
    lines.append(f"  Capacity: {'✓ reachable' if report.ok else '✗ not reachable as configured'}"
                 f" ({p.summary()})")
    return "\n".join(lines)


def config_capacity(path: str, *, sockmap_ok: bool) -> dict:
    """`sni-proxy check --config`: the capacity report of a config file as a dict with `text`.

    A config that does not validate is not evaluated (`ok` stays true: the eBPF part of the
    check reads only the `ebpf` section, and `sni-proxy --check-config` reports the problems).
    """
    from sniproxy.config import ConfigError, load_config
    try:
        config = load_config(path)
    except (ConfigError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"ok": True, "evaluated": False, "reason": first,
                "text": f"Capacity: not evaluated, the config does not validate ({first}); "
                        f"run `sni-proxy --config {path} --check-config`"}
    kernel_relay = config.ebpf_requested()["sockmap"] and sockmap_ok
    report = capacity_report(config, HostLimits.read(), kernel_relay=kernel_relay)
    return {**report.to_dict(), "evaluated": True, "text": format_report(report, path)}
