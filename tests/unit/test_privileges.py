"""privileges.py: the feature -> capability table and the systemd lines built from it."""
from __future__ import annotations

from sniproxy.config import parse_config
from sniproxy.privileges import (capabilities, nofile_limit, required_privileges,
                                       setpriv_argv, stop_timeout_s, unit_lines)

BASE = {"listen_addr": "127.0.0.1:8443", "default_backend": "10.0.0.5:443"}


def config(**over):
    return parse_config({**BASE, **over})


def directive(lines, key):
    (line,) = [x for x in lines if x.startswith(key + "=")]
    return line.split("=", 1)[1]


def test_no_ebpf_and_a_high_port_need_no_capability():
    cfg = config()
    assert required_privileges(cfg) == []
    lines = unit_lines(cfg)
    assert directive(lines, "AmbientCapabilities") == ""        # systemd: the empty set
    assert directive(lines, "CapabilityBoundingSet") == ""


def test_each_feature_names_its_capabilities():
    cfg = config(ebpf={"enabled": True})
    needs = required_privileges(cfg)
    assert capabilities(needs) == ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")
    assert {(n.capability, n.feature) for n in needs} == {
        ("CAP_BPF", "ebpf.sockmap"), ("CAP_BPF", "ebpf.dns_cache"), ("CAP_BPF", "ebpf.stats"),
        ("CAP_NET_ADMIN", "ebpf.sockmap"), ("CAP_BPF", "ebpf.tcp_splice"),
        ("CAP_NET_ADMIN", "ebpf.tcp_splice"), ("CAP_PERFMON", "ebpf.tcp_splice")}
    no_splice = config(ebpf={"enabled": True, "tcp_splice": {"enabled": False}})
    assert capabilities(required_privileges(no_splice)) == ("CAP_BPF", "CAP_NET_ADMIN")
    dns_only = config(ebpf={"enabled": True, "sockmap": {"enabled": False},
                            "tcp_splice": {"enabled": False}, "stats": {"enabled": False}})
    assert capabilities(required_privileges(dns_only)) == ("CAP_BPF",)
    forced = config(ebpf={"enabled": True, "sockmap": {"sndbuf_bytes": 1 << 22},
                          "tcp_splice": {"enabled": False}})
    assert ("CAP_NET_ADMIN", "ebpf.sockmap.sndbuf_bytes") in {
        (n.capability, n.feature) for n in required_privileges(forced)}
    assert capabilities(required_privileges(forced)) == ("CAP_BPF", "CAP_NET_ADMIN")


def test_network_tracing_needs_perfmon_even_without_the_data_path():
    cfg = config(ebpf={"enabled": False, "tracing": {"network": True}})
    needs = required_privileges(cfg)
    assert capabilities(needs) == ("CAP_BPF", "CAP_PERFMON")
    assert {n.feature for n in needs} == {"ebpf.tracing.network"}


def test_pin_paths_inside_another_are_opened_once():
    from sniproxy.privileges import pin_paths
    cfg = config(ebpf={"enabled": True, "dns_cache": {"pin_path": "/sys/fs/bpf/sp"},
                       "tcp_splice": {"pin_path": "/sys/fs/bpf/sp/tcp_splice"}})
    assert pin_paths(cfg) == ["/sys/fs/bpf/sp"]
    apart = config(ebpf={"enabled": True, "dns_cache": {"pin_path": "/sys/fs/bpf/sp"},
                         "tcp_splice": {"pin_path": "/sys/fs/bpf/sp-flows"}})
    assert pin_paths(apart) == ["/sys/fs/bpf/sp", "/sys/fs/bpf/sp-flows"]


def test_low_ports_need_net_bind_service():
    cfg = config(listen_addr=["0.0.0.0:443", "[::]:443"], metrics_addr="127.0.0.1:80")
    needs = required_privileges(cfg)
    assert capabilities(needs) == ("CAP_NET_BIND_SERVICE",)
    assert {n.feature for n in needs} == {"listen_addr", "metrics_addr"}


def test_limits_follow_max_connections_workers_and_the_drain_grace():
    cfg = config(max_connections=50000, workers=2, timeouts={"shutdown_grace_s": 30.0})
    assert nofile_limit(cfg) == 25000 * 6 + 64
    assert stop_timeout_s(cfg) == 45
    assert stop_timeout_s(config(timeouts={"shutdown_grace_s": 2.5})) == 18
    assert nofile_limit(config(max_connections=5, workers=2)) == 3 * 6 + 64   # rounded up
    lines = unit_lines(cfg)
    assert directive(lines, "LimitNOFILE") == "150064"
    assert directive(lines, "TimeoutStopSec") == "45"
    assert "KillMode=mixed" in lines and "KillSignal=SIGTERM" in lines


def test_pin_path_is_opened_only_when_the_dns_cache_is_on():
    on = unit_lines(config(ebpf={"enabled": True, "dns_cache": {"pin_path": "/sys/fs/bpf/x"}}))
    assert directive(on, "ReadWritePaths") == "-/sys/fs/bpf/x"
    off = unit_lines(config(ebpf={"enabled": True, "dns_cache": {"enabled": False}}))
    assert not [x for x in off if x.startswith("ReadWritePaths=")]
    unpinned = unit_lines(config(ebpf={"enabled": True, "dns_cache": {"pin_path": None}}))
    assert not [x for x in unpinned if x.startswith("ReadWritePaths=")]


def test_setpriv_grants_the_same_set_and_can_drop_one():
    cfg = config(ebpf={"enabled": True})
    argv = setpriv_argv(cfg, 65534, 65534)
    assert "--ambient-caps=-all,+bpf,+net_admin,+perfmon" in argv and argv[-1] == "--"
    assert "--bounding-set=-all,+bpf,+perfmon" in setpriv_argv(cfg, 65534, 65534,
                                                               drop="CAP_NET_ADMIN")
