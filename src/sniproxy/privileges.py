"""Which privileges a config needs, and the systemd / setpriv lines that grant exactly those.

    needs = required_privileges(config)     # [Need("CAP_BPF", "ebpf.sockmap", "load ..."), ...]
    capabilities(needs)                     # ("CAP_BPF", "CAP_NET_ADMIN")
    print("\\n".join(unit_lines(config)))   # [Service] lines of deploy/systemd/sni-proxy.service

One explicit table, next to the features: `sni-proxy check --config FILE` prints it, the unit file
in deploy/systemd/ follows it, and tests/integration/test_deploy.py runs the proxy as an
unprivileged user with exactly these capabilities (and with one missing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sniproxy.ebpf.support import FEATURE_CAPABILITIES
from sniproxy.proxy.capacity import FDS_PER_CONNECTION_SPLICE

# Ports below this need CAP_NET_BIND_SERVICE (unless net.ipv4.ip_unprivileged_port_start is
# lowered, which is host-wide and not the proxy's to decide).
PRIVILEGED_PORT_LIMIT = 1024
# fds a process holds besides connections: listeners, control socket, epoll, BPF maps and
# programs, the metrics files, logs.
FDS_BASE = 64
# The supervisor SIGKILLs workers still alive `shutdown_grace_s + 10` s after SIGTERM; systemd
# must wait a little longer than that, or it kills them first and the drain is cut short.
SUPERVISOR_BACKSTOP_S = 10
STOP_MARGIN_S = 5


_BPF = ("create BPF maps and load BPF programs (kernel >= 5.8; older kernels need "
        "CAP_SYS_ADMIN instead)")
_WHY = {
    ("tcp_splice", "CAP_BPF"): _BPF,
    ("tcp_splice", "CAP_NET_ADMIN"): "attach the tc (clsact) programs and read the sockets' "
                                     "sequence numbers in TCP_REPAIR mode",
    ("tcp_splice", "CAP_PERFMON"): "load the tc programs (the verifier rejects their "
                                   "variable-offset stack reads of TCP options without it: "
                                   "\"variable stack access prohibited for !root\") and the "
                                   "hand-over's BPF socket reader (reads struct tcp_sock)",
    ("sockmap", "CAP_BPF"): _BPF,
    ("sockmap", "CAP_NET_ADMIN"): "attach the sk_skb verdict program to the SOCKHASH map",
    ("dns_cache", "CAP_BPF"): _BPF,
    ("stats", "CAP_BPF"): _BPF,
}


@dataclass(frozen=True)
class Need:
    capability: str     # e.g. "CAP_BPF"
    feature: str        # the config key that asks for it, e.g. "ebpf.sockmap"
    why: str


def required_privileges(config) -> list[Need]:
    """Every capability the config's enabled features need, each with the feature and why."""
    needs: list[Need] = []
    requested = config.ebpf_requested()
    for feature, on in requested.items():
        for cap in FEATURE_CAPABILITIES[feature] if on else ():
            needs.append(Need(cap, f"ebpf.{feature}", _WHY[feature, cap]))
    if config.ebpf.tracing.network:
        # started whether or not ebpf.enabled is (proxy/main.py): tp_btf / raw_tp programs
        for cap, why in (("CAP_BPF", _BPF),
                         ("CAP_PERFMON", "attach tracing programs (tp_btf / raw_tp) to "
                                         "inet_sock_set_state and tcp_retransmit_skb")):
            needs.append(Need(cap, "ebpf.tracing.network", why))
    if requested["sockmap"]:
        if config.ebpf.sockmap.sndbuf_bytes:
            needs.append(Need("CAP_NET_ADMIN", "ebpf.sockmap.sndbuf_bytes",
                              "SO_SNDBUFFORCE: a send buffer above net.core.wmem_max"))
    for addr in config.listen:
        if 0 < addr.port < PRIVILEGED_PORT_LIMIT:
            needs.append(Need("CAP_NET_BIND_SERVICE", "listen_addr", f"bind port {addr.port}"))
    metrics = config.metrics
    if metrics is not None and 0 < metrics.port < PRIVILEGED_PORT_LIMIT:
        needs.append(Need("CAP_NET_BIND_SERVICE", "metrics_addr", f"bind port {metrics.port}"))
    return needs


def capabilities(needs: list[Need]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.capability for n in needs))


def nofile_limit(config) -> int:
    """Per process: a worker's share of max_connections x fds per user-space connection."""
    per_worker = -(-config.max_connections // config.workers)
    return per_worker * FDS_PER_CONNECTION_SPLICE + FDS_BASE


def stop_timeout_s(config) -> int:
    return math.ceil(config.timeouts.shutdown_grace_s) + SUPERVISOR_BACKSTOP_S + STOP_MARGIN_S


def pin_paths(config) -> list[str]:
    """bpffs directories the proxy writes (pinned maps), a directory inside another left out."""
    requested = config.ebpf_requested()
    paths = []
    if requested["dns_cache"] and config.ebpf.dns_cache.pin_path:
        paths.append(config.ebpf.dns_cache.pin_path.rstrip("/"))
    if requested["tcp_splice"] and config.ebpf.tcp_splice.pin_path:
        paths.append(config.ebpf.tcp_splice.pin_path.rstrip("/"))
    return [p for p in dict.fromkeys(paths)
            if not any(p.startswith(q + "/") for q in paths if q != p)]


def unit_lines(config) -> list[str]:
    """The [Service] lines of sni-proxy.service that depend on this config."""
    needs = required_privileges(config)
    caps = capabilities(needs)
    lines = ["# capabilities, by the feature that needs them:"]
    for cap in caps:
        features = ", ".join(dict.fromkeys(n.feature for n in needs if n.capability == cap))
        why = "; ".join(dict.fromkeys(n.why for n in needs if n.capability == cap))
        lines.append(f"#   {cap}: {features} ({why})")
    if not caps:
        lines.append("#   none: no eBPF feature and no port below 1024")
    lines += [f"AmbientCapabilities={' '.join(caps)}",
              f"CapabilityBoundingSet={' '.join(caps)}",
              f"# {config.max_connections} connections over {config.workers} worker(s), "
              f"{FDS_PER_CONNECTION_SPLICE} fds each + {FDS_BASE}",
              f"LimitNOFILE={nofile_limit(config)}",
              f"# timeouts.shutdown_grace_s={config.timeouts.shutdown_grace_s:g} + the "
              f"supervisor's {SUPERVISOR_BACKSTOP_S} s backstop + {STOP_MARGIN_S} s",
              "KillSignal=SIGTERM",
              "KillMode=mixed",
              f"TimeoutStopSec={stop_timeout_s(config)}"]
    for path in pin_paths(config):
        lines.append("# ebpf.*.pin_path (a directory on bpffs the proxy pins its maps in)")
        lines.append(f"ReadWritePaths=-{path}")
    return lines


def setpriv_argv(config, uid: int, gid: int, drop: str | None = None) -> list[str]:
    """`setpriv` giving an unprivileged user exactly the unit's capabilities (minus `drop`)."""
    caps = [c for c in capabilities(required_privileges(config)) if c != drop]
    names = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
            f"--inh-caps={names}", f"--ambient-caps={names}", f"--bounding-set={names}", "--"]
