"""deploy/ tested for real: Prometheus rules and a real Prometheus scraping a real proxy, the Grafana
dashboard's PromQL, the systemd unit's privileges, the Kubernetes manifests, the logs operators grep.

One proxy (2 workers, eBPF on: tc splice, sockmap, DNS cache, stats, tracing.network) with real
TLS connections and one Debian `prometheus`, in a network namespace of the test, serve the
whole module; tests that need other privileges start their own proxy.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf, skip_or_fail
from tests.integration.harness import (REPO, Pki, ProxyProcess, base_config, curl, free_ports,
                                       make_pki, tls_backend, wait_until)
from tests.integration.prometheus_server import JOB, PrometheusServer, prometheus_binary
from tests.integration.netns import Topology, proxy_prefix, run_in
from tests.integration.otlp_receiver import HttpReceiver
from tests.integration.socks_servers import start_dns_server

DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "sni-proxy.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "sni-proxy.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "sni-proxy.json"

# What the module's traffic makes: (route, outcome) -> connections. OK_CONNECTIONS one after
# another and one held go through the tc splice (room for SPLICE_FLOWS flows); while that one
# is held, SOCKMAP_CONNECTIONS fall back to the sockmap.
OK_CONNECTIONS = 6
SPLICE_FLOWS = 1
SOCKMAP_CONNECTIONS = 2
TRAFFIC = {("a.test", "ok"): OK_CONNECTIONS + 1 + SOCKMAP_CONNECTIONS,
           ("down.test", "connect_failed"): 2,
           ("-", "no_route"): 1, ("-", "bad_hello"): 1}

# Metrics the dashboard shows that this module's proxy cannot produce, each with the reason.
# Every other metric a panel names must exist in the real Prometheus below.
EXPECTED_ABSENT = {
    "sniproxy_accept_errors_total":
        "a labelled counter appears at the first accept() error (EMFILE); not provoked here",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `apt-get install prometheus` (scripts/bootstrap.sh)")
    return path


# ------------------------------------------------------------------------ rules (no proxy)
def test_promtool_checks_the_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_fire_and_do_not_fire_every_alert():
    import yaml
    r = subprocess.run([promtool(), "test", "rules", str(RULES_TEST)], capture_output=True,
                       text=True, timeout=60, cwd=RULES_TEST.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = {rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for rule in g["rules"] if "alert" in rule}
    fired, quiet = set(), set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fired == alerts, f"alerts never shown firing: {alerts - fired}"
    assert quiet == alerts, f"alerts never shown quiet: {alerts - quiet}"


def test_every_alert_has_a_runbook_and_the_seed_thresholds():
    import yaml
    rules = {rule["alert"]: rule for g in yaml.safe_load(RULES.read_text())["groups"]
             for rule in g["rules"] if "alert" in rule}
    docs = (REPO / "docs" / "operations.md").read_text()
    for name, rule in rules.items():
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        anchor = ann["runbook"].split("#", 1)[1]
        assert ann["runbook"] == f"docs/operations.md#{name.lower()}", name
        assert re.search(rf"^#+ .*{name}\b", docs, re.M), f"docs/operations.md: no section {anchor}"
    # The seed's thresholds, as written in the quick start.
    assert "< 0.8" in rules["SniProxyDnsCacheHitRateLow"]["expr"]
    assert "> 0.9" in rules["SniProxyEbpfMapUtilizationHigh"]["expr"]
    assert "> 0.1" in rules["SniProxySockmapFallbackRateHigh"]["expr"]
    expr = rules["SniProxyProfilerOverheadHigh"]["expr"]
    assert "ebpf_profiler_overhead_cpu_percent > 1" in expr and "> 50 * 1024 * 1024" in expr


# ------------------------------------------------------------------------ a live proxy
class InNetns:
    """Calls `obj`'s methods from a thread inside network namespace `ns`: its 127.0.0.1 is the
    namespace's loopback, where the proxy and Prometheus listen."""

    def __init__(self, ns: str, obj):
        self._ns, self._obj = ns, obj

    def __getattr__(self, name):
        attr = getattr(self._obj, name)
        if callable(attr):
            return lambda *a, **kw: run_in(self._ns, attr, *a, **kw)
        return attr


@dataclass
class Stack:
    proxy: ProxyProcess           # an InNetns
    prom: PrometheusServer        # an InNetns
    ns: str


def make_traffic(port: int, pki: Pki, proxy: ProxyProcess) -> None:
    """Real TLS clients (curl, CA-verified) through the proxy, and one plain-HTTP client."""
    import ssl
    for _ in range(OK_CONNECTIONS):
        r = curl("a.test", port, "/", pki.ca_path)
        assert r.returncode == 0 and b'"backend": "A"' in r.stdout, r
        # a finished flow lingers (linger_s) before its entries go and its slot is free
        wait_until(lambda: proxy.metric("ebpf_map_utilization", map="tcp_splice") == 0, 15,
                   "the flow's entries removed")
    # The tc splice holds SPLICE_FLOWS flows: while one is held, the next connections fall back
    # to the sockmap (reason map_full), so both kernel relays have figures.
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                         server_hostname="a.test") as held:
        wait_until(lambda: proxy.metric("ebpf_tcp_splice_active_flows") == 1, 10, "a held flow")
        for _ in range(SOCKMAP_CONNECTIONS):
            r = curl("a.test", port, "/", pki.ca_path)
            assert r.returncode == 0 and b'"backend": "A"' in r.stdout, r
        held.sendall(b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
        while held.recv(4096):
            pass
    for name in ("down.test", "down.test", "nowhere.test"):
        assert curl(name, port, "/", pki.ca_path).returncode != 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:   # plain HTTP: not_tls
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while s.recv(4096):
            pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The proxy as deployed (eBPF on with the tc splice, the default relay, and
    ebpf.tracing.network; 2 workers) and a real Prometheus, both in a network namespace of the
    test's own (the tc splice attaches to every interface that is up, lo included)."""
    require_ebpf()
    if prometheus_binary() is None:
        pytest.fail("prometheus is missing: `apt-get install prometheus` (scripts/bootstrap.sh)")
    tmp = tmp_path_factory.mktemp("deploy")
    pki = make_pki(tmp / "pki", ["a.test"])
    with contextlib.ExitStack() as es:
        topo = es.enter_context(Topology.loopback(f"dep{os.getpid() % 100000}"))
        ns = topo.proxy

        def enter(cm):
            value = run_in(ns, cm.__enter__)
            es.callback(run_in, ns, cm.__exit__, None, None, None)
            return value
        backend_port = enter(tls_backend(pki, ["a.test"], "A"))
        dns = enter(start_dns_server({"backend.test": [("A", "127.0.0.1", 300)]}))
        otlp = run_in(ns, HttpReceiver)
        enter(otlp)
        port, metrics_port, dead_port = 8443, 9090, 9
        cfg = base_config(
            port, metrics_port, workers=2,
            routes=[{"match": "a.test", "backend": f"backend.test:{backend_port}",
                     "allow_private": True},
                    {"match": "down.test", "backend": f"127.0.0.1:{dead_port}"}],
            dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
            ebpf={"enabled": True, "dns_cache": {"pin_path": None},
                  "tcp_splice": {"max_flows": SPLICE_FLOWS, "linger_s": 0.2},
                  "tracing": {"network": True}},
            # the OTLP exporter and continuous profiling too: their families are linted as well
            otlp={"enabled": True, "endpoint": f"http://127.0.0.1:{otlp.port}",
                  "protocol": "http/protobuf", "interval_s": 1},
            profiling={"enabled": True, "export_interval_s": 1})
        (tmp / "proxy").mkdir()
        proxy = InNetns(ns, ProxyProcess(cfg, tmp / "proxy",
                                         argv_prefix=proxy_prefix(ns)))
        proxy.start()
        es.callback(proxy.stop)
        run_in(ns, make_traffic, port, pki, proxy._obj)
        proxy.signal(signal.SIGHUP)                     # sniproxy_config_reloads_total exists
        total = sum(TRAFFIC.values())
        wait_until(lambda: proxy.metric("sniproxy_connections_total") >= total, 10,
                   "the workers to publish their counts")
        wait_until(lambda: proxy.metric("sniproxy_config_reloads_total") >= 1, 10, "the reload")
        prom = InNetns(ns, PrometheusServer(tmp / "prometheus", [f"127.0.0.1:{metrics_port}"],
                                            rule_files=[RULES]))
        prom.start()
        es.callback(prom.stop)
        prom.wait_target_up()
        # rate() needs two samples in its window: wait for a few scrapes.
        prom.wait_value(f'count_over_time(up{{job="{JOB}"}}[1m])', lambda v: v >= 3)
        yield Stack(proxy, prom, ns)


# Every family the proxy publishes (prometheus_client's family names: no _total / _bucket).
# The module's proxy has every feature on, so all of them are on its /metrics but one.
ALL_FAMILIES = {
    "sniproxy_connections", "sniproxy_active_connections", "sniproxy_bytes",
    "sniproxy_relay_connections", "sniproxy_upstream_connect_seconds",
    "sniproxy_upstream_connect_failures", "sniproxy_client_hello_failures",
    "sniproxy_config_reloads", "sniproxy_dns_cache_lookups", "sniproxy_worker_restarts",
    "sniproxy_connection_limit_reached", "sniproxy_accept_errors",
    "sniproxy_route_backend_connect_seconds", "sniproxy_route_backend_connect_failures",
    "sniproxy_route_tcp_retransmits", "sniproxy_route_tcp_srtt_at_close_seconds",
    "sniproxy_otlp_exports", "sniproxy_otlp_last_success_timestamp_seconds",
    "sniproxy_otlp_queued", "sniproxy_otlp_dropped",
    "ebpf_feature_requested", "ebpf_feature_state", "ebpf_active_connections",
    "ebpf_map_utilization", "ebpf_dns_cache_hit_rate", "ebpf_dns_cache_level_hit_rate",
    "ebpf_dns_cache_lookups", "ebpf_sockmap_redirects", "ebpf_sockmap_redirected_bytes",
    "ebpf_sockmap_redirect_failures", "ebpf_sockmap_fallbacks", "ebpf_sockmap_pauses",
    "ebpf_sockmap_inflight_over_limit", "ebpf_sockmap_fin_skbs_dropped",
    "ebpf_sockmap_credit_notifications", "ebpf_tcp_splice_active_flows",
    "ebpf_tcp_splice_engaged", "ebpf_tcp_splice_fallbacks", "ebpf_tcp_splice_bytes",
    "ebpf_tcp_splice_packets", "ebpf_tcp_splice_frozen_packets", "ebpf_profiler_samples",
    "ebpf_profiler_dropped_samples", "ebpf_profiler_drains",
    "ebpf_profiler_overhead_cpu_percent", "ebpf_profiler_overhead_memory_bytes",
}
LIVE_ABSENT = {"sniproxy_accept_errors"}      # appears at the first accept() error


def test_promtool_check_metrics_finds_nothing_on_a_live_proxy(stack):
    from prometheus_client.parser import text_string_to_metric_families
    body = stack.proxy.metrics()
    families = {f.name for f in text_string_to_metric_families(body)}
    assert families == ALL_FAMILIES - LIVE_ABSENT      # the linter sees every family
    r = subprocess.run([promtool(), "check", "metrics"], input=body, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_prometheus_scrapes_the_counts_the_test_made(stack):
    prom = stack.prom
    assert prom.value(f'up{{job="{JOB}"}}') == 1
    for (route, outcome), n in TRAFFIC.items():
        got = prom.value(f'sum(sniproxy_connections_total{{job="{JOB}", route="{route}", '
                         f'outcome="{outcome}"}})')
        assert got == n, (route, outcome, got)
    assert prom.value('sum(sniproxy_relay_connections_total{relay="tcp_splice"})') == \
        OK_CONNECTIONS + 1
    assert prom.value('sum(sniproxy_relay_connections_total{relay="sockmap"})') == \
        SOCKMAP_CONNECTIONS
    assert prom.value('sum(sniproxy_client_hello_failures_total{reason="not_tls"})') == 1
    assert prom.value('sum(sniproxy_upstream_connect_failures_total{kind="refused"})') == 2
    ok = OK_CONNECTIONS + 1 + SOCKMAP_CONNECTIONS
    assert prom.value('sum(sniproxy_upstream_connect_seconds_count)') == ok
    assert prom.value('sum(sniproxy_bytes_total{direction="backend_to_client"})') > 0
    # the tc splice relay's figures
    assert prom.value("sum(ebpf_tcp_splice_engaged_total)") == OK_CONNECTIONS + 1
    assert prom.value('sum(ebpf_tcp_splice_fallbacks_total{reason="map_full"})') == \
        SOCKMAP_CONNECTIONS
    assert prom.value('sum(ebpf_tcp_splice_bytes_total)') > 0
    assert prom.value("ebpf_tcp_splice_active_flows") == 0
    # the seed's ebpf_* figures
    assert prom.value('sum(ebpf_sockmap_redirects_total)') > 0
    assert prom.value('sum(ebpf_sockmap_redirected_bytes_total{direction="backend_to_client"})') > 0
    assert prom.value("ebpf_active_connections") == 0          # every connection has ended
    assert 0 < prom.value("ebpf_dns_cache_hit_rate") < 1       # first lookup(s) missed, then hits
    assert prom.value("sum(ebpf_dns_cache_lookups_total)") >= ok
    assert prom.value('ebpf_map_utilization{map="sockmap"}') == 0
    assert prom.value('ebpf_map_utilization{map="dns_cache"}') > 0
    assert prom.value('ebpf_map_utilization{map="tcp_splice"}') == 0
    # ebpf.tracing.network: the kernel saw every backend connect of the route
    assert prom.value('sum(sniproxy_route_backend_connect_seconds_count{route="a.test"})') == ok
    assert prom.value('sum(sniproxy_route_backend_connect_failures_total{route="down.test"})') == 2
    modes = {(r["metric"]["feature"], r["metric"]["state"])
             for r in prom.query("ebpf_feature_state == 1")}
    assert modes == {("sockmap", "active"), ("dns_cache", "active"), ("stats", "active"),
                     ("tcp_splice", "active")}
    assert prom.value("sum(ebpf_feature_requested)") == 4


def test_every_rule_evaluates_without_error_in_prometheus(stack):
    import yaml
    prom = stack.prom
    exprs = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for expr in exprs:
        prom.query(expr)                      # raises with Prometheus' message on a bad expr

    def evaluated():
        rules = prom.rules()
        return rules if all(r["health"] != "unknown" for r in rules) else None
    rules = wait_until(evaluated, 15, "every rule to be evaluated", interval=0.2)
    assert len(rules) == len(exprs)
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad
    # A healthy proxy with a clean start fires nothing (only `for: 0` alerts could be pending).
    firing = [a for r in rules for a in r.get("alerts", []) if a["state"] == "firing"]
    assert not firing, firing


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
    walk(dash["panels"])
    return out


def grafana_to_promql(expr: str) -> str:
    """What Grafana sends for the dashboard's defaults: job sni-proxy, all instances."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", JOB)
            .replace("$instance", ".*"))


def test_dashboard_is_importable_json_with_the_panels_operators_expect():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "sni-proxy" and dash["schemaVersion"] >= 36
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance"}
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    text = json.dumps([q for _, q in dashboard_queries()])
    for metric in ("sniproxy_connections_total", "sniproxy_active_connections", "sniproxy_bytes_total",
                   "sniproxy_upstream_connect_seconds_bucket", "sniproxy_client_hello_failures_total",
                   "ebpf_feature_state", "ebpf_sockmap_redirects_total", "ebpf_tcp_splice_active_flows",
                   "ebpf_tcp_splice_engaged_total", "ebpf_tcp_splice_fallbacks_total",
                   "ebpf_tcp_splice_bytes_total", "ebpf_dns_cache_hit_rate", "ebpf_map_utilization",
                   "sniproxy_route_backend_connect_seconds_bucket",
                   "ebpf_profiler_overhead_cpu_percent", "ebpf_profiler_overhead_memory_bytes"):
        assert metric in text, metric


def test_every_dashboard_query_runs_in_prometheus_on_series_that_exist(stack):
    prom = stack.prom
    names = prom.metric_names()
    queries = dashboard_queries()
    used: set[str] = set()
    missing = []
    for title, expr in queries:
        promql = grafana_to_promql(expr)
        prom.query(promql)                                        # parse / evaluation errors
        for name in re.findall(r"\b((?:sniproxy|ebpf)_[a-z0-9_]+|up)\b", promql):
            used.add(name)
            if name not in names and name not in EXPECTED_ABSENT:
                missing.append((title, name))
    assert not missing, f"panels query series that never exist: {missing}"
    assert set(EXPECTED_ABSENT) <= used, "stale EXPECTED_ABSENT entries"
    # Not vacuous: every query on series that exist returns data now (sockmap and tc splice
    # panels included: the module's traffic went through both).
    empty = [(title, expr) for title, expr in queries
             if not set(re.findall(r"\b((?:sniproxy|ebpf)_[a-z0-9_]+)\b", expr)) & set(EXPECTED_ABSENT)
             and not prom.query(grafana_to_promql(expr))]
    assert not empty, f"panels with no data: {empty}"


# ------------------------------------------------------------------------ systemd
UNIT = DEPLOY / "systemd" / "sni-proxy.service"
REFERENCE_CONFIG = DEPLOY / "config.json"
INSTALLED_BINARY = "/opt/sni-proxy/.venv/bin/sni-proxy"
NOBODY = 65534            # an unprivileged user every Debian has


def unit_directives(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", "["))]


def test_systemd_analyze_verify_passes(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: `apt-get install systemd` (scripts/bootstrap.sh)")
    # verify checks that ExecStart= exists: point it at this checkout's entry point
    unit = tmp_path / "sni-proxy.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(REPO / ".venv/bin/sni-proxy")))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")   # unknown keys only warn: none allowed
    directives = unit_directives(UNIT.read_text())
    for line in ("User=sni-proxy", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in directives, line


def test_unit_lines_are_those_sni_proxy_check_prints_for_the_reference_config():
    from sniproxy.config import load_config
    from sniproxy.privileges import unit_lines
    expected = unit_directives("\n".join(unit_lines(load_config(REFERENCE_CONFIG))))
    assert "AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON" in expected
    assert "LimitNOFILE=150064" in expected and "TimeoutStopSec=45" in expected
    directives = unit_directives(UNIT.read_text())
    assert [d for d in expected if d not in directives] == []
    r = subprocess.run([str(REPO / ".venv/bin/sni-proxy"), "check", "--config", str(REFERENCE_CONFIG)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr
    printed = r.stdout.split("systemd [Service] lines for", 1)[1]
    assert unit_directives(printed.split("\n", 1)[1]) == expected


@pytest.fixture
def world_readable_dir():
    """The proxy runs as `nobody`: its config must be readable outside root's pytest tmp."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="sni-proxy-deploy-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def bpffs_for_nobody(world_readable_dir):
    mnt = world_readable_dir / "bpffs"
    mnt.mkdir()
    # as systemd mounts /sys/fs/bpf at boot: mode 0700, the service user cannot even traverse it
    r = subprocess.run(["mount", "-t", "bpf", "-o", "mode=0700", "bpf", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        skip_or_fail(f"cannot mount a bpffs here: {r.stderr.strip()}")
    # the unit's own `ExecStartPre=+` command, on this bpffs and for this user
    (pre,) = re.findall(r"^ExecStartPre=\+/bin/sh -c '(.*)'$", UNIT.read_text(), re.M)
    pre = pre.replace("/sys/fs/bpf", str(mnt)).replace("-o sni-proxy -g sni-proxy",
                                                       f"-o {NOBODY} -g {NOBODY}")
    subprocess.run(["/bin/sh", "-c", pre], check=True, timeout=10)
    yield mnt / "sni-proxy"
    subprocess.run(["umount", str(mnt)], check=False)


def capabilities_of(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", text, re.M).group(1))
    eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", text, re.M).group(1), 16)
    return uid, eff


def cap_mask(names) -> int:
    bits = {"CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
            "CAP_BPF": 39}
    return sum(1 << bits[n] for n in names)


# Every eBPF feature of the proxy on: the tc splice (default relay), the sockmap, the DNS cache
# and stats, and ebpf.tracing.network (the one that also needs CAP_PERFMON).
ALL_CAPS = ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")


@pytest.fixture
def netns():
    with Topology.loopback(f"dpu{os.getpid() % 100000}") as t:
        yield t.proxy


@contextlib.contextmanager
def unprivileged_proxy(tmp: Path, pins: Path, ns: str, drop: str | None):
    """The proxy as `nobody` with exactly the capabilities `sni-proxy check` lists for its
    config (minus `drop`), in network namespace `ns` with a TLS backend there; (proxy, pki, caps)
    where the proxy's methods run in `ns`."""
    from sniproxy.config import parse_config
    from sniproxy.privileges import capabilities, required_privileges, setpriv_argv
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is needed to run as another user with capabilities")
    pki = make_pki(tmp / "pki", ["a.test"])
    for path in [tmp / "pki", *(tmp / "pki").iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    backend = tls_backend(pki, ["a.test"], "A")
    backend_port = run_in(ns, backend.__enter__)
    try:
        cfg = base_config(8443, 9090, workers=2,
                          routes=[{"match": "a.test", "backend": f"127.0.0.1:{backend_port}"}],
                          ebpf={"enabled": True, "dns_cache": {"pin_path": str(pins)},
                                "tcp_splice": {"pin_path": str(pins / "tcp_splice"),
                                               "linger_s": 0.2},
                                "tracing": {"network": True}})
        config = parse_config(cfg)
        caps = capabilities(required_privileges(config))
        assert sorted(caps) == sorted(ALL_CAPS)
        proc_dir = tmp / f"proxy-{drop}"
        proc_dir.mkdir()
        proxy = ProxyProcess(cfg, proc_dir, env={"SNI_PROXY_LOG": "debug"},
                             argv_prefix=[*proxy_prefix(ns),
                                          *setpriv_argv(config, NOBODY, NOBODY, drop=drop)])
        proxy.config_path.chmod(0o644)
        inns = InNetns(ns, proxy)
        inns.start()
        try:
            yield inns, pki, [c for c in caps if c != drop]
        finally:
            proxy.stop()
    finally:
        run_in(ns, backend.__exit__, None, None, None)


def served_through(proxy, pki, relay: str) -> None:
    r = run_in(proxy._ns, curl, "a.test", 8443, "/", pki.ca_path)
    assert r.returncode == 0 and b'"backend": "A"' in r.stdout, r
    wait_until(lambda: proxy.metric("sniproxy_relay_connections_total", relay=relay) == 1,
               10, f"the connection to be counted as relayed by {relay}")


def test_unprivileged_user_with_the_unit_capabilities_runs_every_feature_active(
        world_readable_dir, bpffs_for_nobody, netns):
    require_ebpf()
    with unprivileged_proxy(world_readable_dir, bpffs_for_nobody, netns, drop=None) as \
            (proxy, pki, caps):
        status = proxy.status()
        for pid in [status["pid"]] + [w["pid"] for w in status["workers"]]:
            assert capabilities_of(pid) == (NOBODY, cap_mask(caps)), pid
        e = status["ebpf"]
        assert (e["mode"], e["tcp_splice"], e["sockmap"], e["dns_cache"], e["stats"],
                e["pinning"]) == ("full", "active", "active", "active", "active", "on"), e
        assert e["tcp_splice_detail"]["pin_path"] == str(bpffs_for_nobody / "tcp_splice"), e
        # the hand-over's one-call socket reader runs with the unit's capabilities too
        assert e["tcp_splice_detail"]["socket_state"] == "bpf_getsockopt", e["tcp_splice_detail"]
        assert status["tracing"]["network"]["state"] == "active", status["tracing"]
        served_through(proxy, pki, "tcp_splice")          # the default relay
        wait_until(lambda: proxy.metric("sniproxy_route_backend_connect_seconds_count",
                                        route="a.test") == 1, 10, "the kernel-measured connect")


@pytest.mark.parametrize("drop", ["CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"])
def test_one_capability_missing_is_named_and_the_proxy_degrades(
        world_readable_dir, bpffs_for_nobody, netns, drop):
    require_ebpf()
    with unprivileged_proxy(world_readable_dir, bpffs_for_nobody, netns, drop=drop) as \
            (proxy, pki, caps):
        status = proxy.status()
        assert capabilities_of(status["pid"]) == (NOBODY, cap_mask(caps))
        e = status["ebpf"]
        tracing = status["tracing"]["network"]
        features = (e["mode"], e["tcp_splice"], e["sockmap"], e["dns_cache"], e["stats"])
        log = proxy.log()
        if drop == "CAP_NET_ADMIN":     # the two kernel relays need it
            assert features == ("partial", "disabled", "disabled", "active", "active"), e
            for feature in ("tcp_splice", "sockmap"):
                assert f"missing capability {drop}" in e["reasons"][feature], e["reasons"]
                assert f"eBPF {feature} disabled: missing capability {drop}" in log
            assert "eBPF manager initialised: mode partial (tcp_splice disabled, sockmap disabled, " in log
            assert tracing["state"] == "active", tracing
            relay = "splice"
        elif drop == "CAP_BPF":         # every eBPF feature needs it
            assert features == ("none", "disabled", "disabled", "disabled", "disabled"), e
            assert f"missing capability {drop}" in e["reasons"]["sockmap"], e["reasons"]
            assert f"eBPF sockmap disabled: missing capability {drop}" in log
            assert "eBPF manager initialisation failed (falling back to the traditional " \
                   "mode): mode none" in log
            assert "using the traditional data forwarding mode" in log
            assert tracing["state"] == "degraded" and "CAP_BPF" in tracing["reason"], tracing
            relay = "splice"
        else:                           # the tc splice and ebpf.tracing.network need it
            assert features == ("partial", "disabled", "active", "active", "active"), e
            assert f"missing capability {drop}" in e["reasons"]["tcp_splice"], e["reasons"]
            assert f"eBPF tcp_splice disabled: missing capability {drop}" in log
            assert tracing["state"] == "degraded" and "CAP_PERFMON" in tracing["reason"], tracing
            assert "ebpf.tracing.network: disabled: " in log
            relay = "sockmap"
        served_through(proxy, pki, relay)                 # degraded, still serving
        if drop == "CAP_NET_ADMIN":     # the worker's side of it, at debug level
            assert "socket pair registration failed (program not loaded)" in proxy.log()


# ------------------------------------------------------------------------ Kubernetes
K8S = DEPLOY / "kubernetes"


def k8s_documents() -> list[tuple[Path, dict]]:
    import yaml
    return [(path, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate_offline_strict():
    import kubernetes_validate
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} == {"Namespace", "ConfigMap", "DaemonSet"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)   # unknown fields fail too
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name}: {e.path}: {e.message}")
    typo = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "DaemonSet")))
    typo["spec"]["template"]["spec"]["hostNetwrok"] = True           # the validator has teeth
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, "1.30.0", strict=True)


def test_daemonset_matches_its_config():
    from sniproxy.config import parse_config
    from sniproxy.privileges import capabilities, required_privileges, stop_timeout_s
    docs = {d["kind"]: d for _, d in k8s_documents()}
    config = parse_config(json.loads(docs["ConfigMap"]["data"]["config.json"]))
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert pod["hostNetwork"] is True and sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(
        cap.removeprefix("CAP_") for cap in capabilities(required_privileges(config)))
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] == stop_timeout_s(config)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["tls"] == config.listen[0].port and ports["metrics"] == config.metrics.port
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert config.ebpf.dns_cache.pin_path.startswith("/sys/fs/bpf/")
    assert volumes[mounts["/sys/kernel/btf"]["name"]]["hostPath"]["path"] == "/sys/kernel/btf"
    cm = volumes[mounts["/etc/sni-proxy"]["name"]]["configMap"]
    assert cm["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert "subPath" not in mounts["/etc/sni-proxy"]        # subPath mounts never see updates
    assert c["args"] == ["--config", "/etc/sni-proxy/config.json"]


# ------------------------------------------------------------------------ logs operators grep
def test_the_seed_log_lines_with_sni_proxy_log_debug(tmp_path):
    """`SNI_PROXY_LOG=debug` (the seed's RUST_LOG=debug) and the lines its troubleshooting greps:
    manager initialised, socket pair registered / registration failed (map full), DNS cache
    hit / miss, the mode summary."""
    import ssl
    require_ebpf()
    pki = make_pki(tmp_path / "pki", ["a.test"])
    with contextlib.ExitStack() as es:
        backend_port = es.enter_context(tls_backend(pki, ["a.test"], "A"))
        dns = es.enter_context(start_dns_server({"backend.test": [("A", "127.0.0.1", 300)]}))
        port, metrics_port = free_ports(2)
        cfg = base_config(port, metrics_port, workers=2,
                          routes=[{"match": "a.test", "backend": f"backend.test:{backend_port}",
                                   "allow_private": True}],
                          dns={"nameservers": [f"127.0.0.1:{dns.port}"]},
                          # room for one pair: a second concurrent connection finds the map full
                          ebpf={"enabled": True, "sockmap": {"max_entries": 2},
                                "dns_cache": {"pin_path": None}})
        proxy = ProxyProcess(cfg, tmp_path, env={"SNI_PROXY_LOG": "debug"}).start()
        es.callback(proxy.stop)
        ctx = ssl.create_default_context(cafile=str(pki.ca_path))
        held = es.enter_context(ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="a.test"))
        wait_until(lambda: "socket pair registered" in proxy.log(), 10, "the held pair")
        for _ in range(3):          # 3 over 2 workers: one worker sees the map full twice
            r = curl("a.test", port, "/", pki.ca_path)
            assert r.returncode == 0 and b'"backend": "A"' in r.stdout, r
        held.close()
        wait_until(lambda: proxy.metric("sniproxy_connections_total") >= 4, 10, "4 connections")
        # A client whose FIN arrives with its hello is in CLOSE_WAIT at the hand-over: "socket
        # closed" (the user-space relay finishes it).
        from tests.integration.harness import client_hello_bytes
        wait_until(lambda: proxy.status()["ebpf"]["map_entries"]["conn"] == 0, 10,
                   "the map empty again (room for the pair: not map full)")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            # corked: the FIN rides on the hello's segment (no thread switch can come between)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            s.sendall(client_hello_bytes("a.test"))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        wait_until(lambda: proxy.metric("ebpf_sockmap_fallbacks_total", reason="close_wait") == 1,
                   10, "the CLOSE_WAIT fallback")
        log = proxy.log()
    lines = log.splitlines()

    def grep(text: str, level: str) -> list[str]:
        return [line for line in lines if text in line and f" {level} " in line]
    assert grep("eBPF manager initialised: mode full (tcp_splice disabled, sockmap active, dns_cache active, "
                "stats active)", "INFO")
    assert grep("socket pair registered", "DEBUG")
    failed = grep("socket pair registration failed (map full): Map capacity full", "WARNING")
    pids = [re.search(r"\[(\d+)\]", line).group(1) for line in failed]
    # once per worker at WARNING (each curl may land on either worker); later ones at DEBUG
    assert failed and len(pids) == len(set(pids)), failed
    assert grep("socket pair registration failed (map full): Map capacity full", "DEBUG")
    assert grep("socket pair registration failed (socket closed)", "WARNING")
    assert grep("DNS cache miss: backend.test", "DEBUG")
    assert grep("DNS cache hit: backend.test", "DEBUG")


# ------------------------------------------------------------------------ profiler overhead
def test_profiler_metrics_file_feeds_the_overhead_alert(tmp_path):
    """`sni-proxy profile --metrics-file` writes what SniProxyProfilerOverheadHigh reads, in a
    form promtool accepts, and removes it when the profiler stops (no stale alert)."""
    require_ebpf()
    out = tmp_path / "profiler.prom"
    target = subprocess.Popen(["sleep", "30"])
    profiler = subprocess.Popen(
        [str(REPO / ".venv/bin/sni-proxy"), "profile", "-p", str(target.pid), "--duration", "4",
         "-q", "--top", "0", "--metrics-file", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(out.exists, 10, "the metrics file")
        text = out.read_text()
        r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        assert (r.returncode, r.stdout + r.stderr) == (0, "")
        from prometheus_client.parser import text_string_to_metric_families
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert 0 <= values["ebpf_profiler_overhead_cpu_percent"] < 100
        assert values["ebpf_profiler_overhead_memory_bytes"] > 0
        assert profiler.wait(20) == 0, profiler.stderr.read()
        assert not out.exists()
    finally:
        for proc in (profiler, target):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
