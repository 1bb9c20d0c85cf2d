"""The capacity arithmetic: workers, fds per worker, sockmap sizes, host sysctls (made-up hosts)."""
from __future__ import annotations

import pytest

from sniproxy.config import ConfigError, parse_config
from sniproxy.proxy import capacity
from sniproxy.proxy.capacity import HostLimits, capacity_report, plan_capacity, resolve

HOST = HostLimits(fd_soft=1024, fd_hard=20000, cpus=2, file_max=2_000_000, nr_open=1 << 20,
                  somaxconn=4096, tcp_max_syn_backlog=2048, port_range=(32768, 60999),
                  tcp_mem=(287889, 383855, 575778), conntrack_max=None, mem_available=20 << 30)


def config(**extra):
    return parse_config({"listen_addr": "127.0.0.1:8443", "default_backend": "10.0.0.5:443", **extra})


def sockmap_config(**extra):
    return config(ebpf={"enabled": True}, **extra)


def test_auto_workers_fit_100k_connections_under_20000_fds_with_the_sockmap():
    plan = plan_capacity(sockmap_config(workers="auto", max_connections=100_000), HOST)
    # (20000 - 640) // 2 = 9680 connections per worker -> ceil(100000 / 9680) = 11 workers
    assert plan.relay == "tcp_splice" and plan.fds_per_connection == 2   # sockmap: its fallback
    assert plan.workers == 11 and plan.workers_auto
    assert plan.per_worker_connections == 9091
    assert plan.fds_per_worker == 9091 * 2 + 640 <= 20000
    assert plan.ok and plan.sockmap_entries == 200_000 and plan.sockmap_auto


def test_auto_workers_with_the_splice_relay_count_its_pipes():
    plan = plan_capacity(config(workers="auto", max_connections=100_000), HOST)
    # (20000 - 640) // 6 = 3226 per worker -> 31 workers
    assert (plan.relay, plan.fds_per_connection, plan.workers) == ("splice", 6, 31)
    assert plan.ok and plan.sockmap_entries is None


def test_auto_never_below_the_cpus_and_copy_relay_needs_two_fds():
    plan = plan_capacity(config(workers="auto", max_connections=1000, relay={"mode": "copy"}),
                         HOST)
    assert (plan.workers, plan.fds_per_connection) == (2, 2)


def test_sockmap_requested_but_unavailable_plans_for_splice():
    plan = plan_capacity(sockmap_config(workers="auto", max_connections=100_000), HOST,
                         kernel_relay=False)
    assert (plan.relay, plan.workers) == ("splice", 31)


def test_explicit_workers_that_cannot_fit_say_the_numbers_and_the_fix():
    plan = plan_capacity(config(workers=2, max_connections=50_000), HOST)
    assert plan.workers == 2 and not plan.ok
    (problem,) = plan.problems
    assert "25000 per worker x 6 fds (splice relay) + 640 reserved = 150640 fds" in problem
    assert "the fd limit is 20000" in problem
    assert "reaches about 6452 connections" in problem            # 3226 x 2
    assert "set workers to 16 or \"auto\"" in problem            # ceil(50000 / 3226)
    assert "LimitNOFILE=150640" in problem and "lower max_connections to 6452" in problem


def test_auto_that_cannot_fit_is_a_problem():
    tiny = HostLimits(fd_soft=700, fd_hard=700, cpus=2)
    plan = plan_capacity(config(workers="auto", max_connections=100_000), tiny)
    assert plan.workers == capacity.MAX_AUTO_WORKERS and not plan.ok


def test_explicit_sockmap_size_is_kept_and_checked():
    plan = plan_capacity(config(max_connections=50_000, workers=8,
                                ebpf={"enabled": True, "sockmap": {"max_entries": 65536}}),
                         HOST)
    assert plan.sockmap_entries == 65536 and not plan.sockmap_auto
    (problem,) = plan.problems
    assert "holds 32768 connections" in problem and "max_entries to 100000" in problem


def test_resolve_fills_in_auto_and_is_stable():
    cfg = sockmap_config(workers="auto", max_connections=100_000)
    plan = plan_capacity(cfg, HOST)
    resolved = resolve(cfg, plan)
    assert resolved.workers == 11 and resolved.ebpf.sockmap.max_entries == 200_000
    # Planning the resolved config again (a reload does) gives the same numbers.
    again = resolve(resolved, plan_capacity(resolved, HOST))
    assert again.ebpf.sockmap.max_entries == 200_000 and again.workers == 11
    # Smaller max_connections: the auto-sized map never goes below the default.
    small = plan_capacity(sockmap_config(max_connections=1000), HOST)
    assert small.sockmap_entries == capacity.SOCKMAP_DEFAULT_ENTRIES


def test_workers_auto_is_valid_config_and_other_strings_are_not():
    assert config(workers="auto").workers == "auto"
    assert config(workers=4).workers == 4
    with pytest.raises(ConfigError) as err:
        config(workers="many")
    assert 'workers: got \'many\': expected an integer from 1 to 256, or "auto"' in str(err.value)


def test_report_lists_the_sysctls_to_apply():
    cfg = sockmap_config(workers="auto", max_connections=100_000, listen_backlog=8192)
    host = HostLimits(**{**HOST.__dict__, "conntrack_max": 65536})
    report = capacity_report(cfg, host)
    by_name = {i.name: i for i in report.items}
    assert by_name["fds per worker"].ok
    assert by_name["sockmap map size"].ok
    assert not by_name["net.core.somaxconn"].ok and by_name["net.core.somaxconn"].warn_only
    ports = by_name["ephemeral ports to 10.0.0.5:443"]
    assert not ports.ok and "28232 ports" in ports.detail and "several addresses" in ports.fix
    assert not by_name["net.netfilter.nf_conntrack_max"].ok
    assert report.sysctl_lines() == [
        "net.core.somaxconn = 8192",
        "net.ipv4.tcp_max_syn_backlog = 8192",
        "net.ipv4.ip_local_port_range = 1024 65535",
        "net.netfilter.nf_conntrack_max = 200000",
    ]
    assert not report.ok                      # ports and conntrack cannot reach 100,000
    text = capacity.format_report(report, "c.json")
    assert "✗ ephemeral ports to 10.0.0.5:443" in text and "! net.core.somaxconn" in text
    assert "sysctl --system" in text


def test_report_of_a_config_that_fits():
    cfg = sockmap_config(workers="auto", max_connections=20_000)
    report = capacity_report(cfg, HOST)
    assert report.ok, [i for i in report.items if not i.ok]
    assert report.to_dict()["workers"] == 3          # ceil(20000 / 9680)


def test_tcp_mem_and_memory_checks():
    host = HostLimits(**{**HOST.__dict__, "tcp_mem": (1000, 2000, 3000), "mem_available": 100 << 20})
    report = capacity_report(config(workers="auto", max_connections=10_000), host)
    by_name = {i.name: i for i in report.items}
    assert not by_name["net.ipv4.tcp_mem"].ok
    assert by_name["net.ipv4.tcp_mem"].sysctl == "net.ipv4.tcp_mem = 10000 20000 40000"
    assert not by_name["memory"].ok


def test_round_up():
    assert capacity._round_up(207042) == 210000
    assert capacity._round_up(7) == 7


def test_ports_per_backend_fail_only_when_even_spread_cannot_fit():
    routes = [{"match": f"n{i}.example.com", "backend": f"10.0.0.{i}:443"} for i in range(1, 5)]
    cfg = parse_config({"listen_addr": "127.0.0.1:8443", "routes": routes, "workers": "auto",
                        "max_connections": 100_000, "ebpf": {"enabled": True}})
    report = capacity_report(cfg, HOST)
    ports = [i for i in report.items if i.name.startswith("ephemeral ports")]
    assert len(ports) == 4
    # 28,232 ports >= 25,000 (even share of 4): only a skewed mix hits it, a warning.
    assert all(not i.ok and i.warn_only and "25000 if spread evenly over 4" in i.detail for i in ports)
    assert report.ok
    # Two backends: 50,000 each even when spread evenly: out of reach.
    cfg2 = parse_config({"listen_addr": "127.0.0.1:8443", "routes": routes[:2], "workers": "auto",
                         "max_connections": 100_000, "ebpf": {"enabled": True}})
    assert not capacity_report(cfg2, HOST).ok


def test_dnspython_is_preloaded_only_for_configs_that_resolve_names():
    from sniproxy.proxy.main import config_needs_dns
    assert not config_needs_dns(config())                                      # IP backend
    assert config_needs_dns(parse_config({"routes": [{"match": "*.a.com", "backend": "$sni:443"}]}))
    assert config_needs_dns(parse_config({"routes": [{"match": "a.com", "backend": "b.lan:443"}]}))
    assert not config_needs_dns(parse_config({"routes": [{"match": "a.com", "backend": "[::1]:443"}]}))


def test_tcp_splice_flows_sized_from_max_connections_or_checked():
    cfg = config(workers="auto", max_connections=100_000, ebpf={"enabled": True})
    plan = plan_capacity(cfg, HOST)
    assert plan.tcp_splice_flows == 125_000 and plan.tcp_splice_auto and plan.ok
    resolved = resolve(cfg, plan)
    assert resolved.ebpf.tcp_splice.max_flows == 125_000
    assert "max_flows" not in resolved.ebpf.tcp_splice.model_fields_set
    again = resolve(resolved, plan_capacity(resolved, HOST))
    assert again.ebpf.tcp_splice.max_flows == 125_000
    # Below the default: the default.
    assert plan_capacity(config(max_connections=1000, ebpf={"enabled": True}),
                         HOST).tcp_splice_flows == capacity.TCP_SPLICE_DEFAULT_FLOWS
    # Set by the user: kept, and a problem when it cannot hold max_connections.
    small = plan_capacity(config(max_connections=50_000, workers=8,
                                 ebpf={"enabled": True, "tcp_splice": {"max_flows": 20_000}}),
                          HOST)
    assert small.tcp_splice_flows == 20_000 and not small.tcp_splice_auto
    (problem,) = small.problems
    assert "max_flows=20000" in problem and "set it to 62500" in problem
    report = capacity_report(config(max_connections=50_000, workers=8,
                                    ebpf={"enabled": True, "tcp_splice": {"max_flows": 20_000}}),
                             HOST)
    (item,) = [i for i in report.items if i.name == "tcp_splice flow slots"]
    assert not item.ok and "62500" in item.fix
    # Not asked for: no slots planned.
    off = plan_capacity(config(ebpf={"enabled": True, "tcp_splice": {"enabled": False}}), HOST)
    assert off.tcp_splice_flows is None
