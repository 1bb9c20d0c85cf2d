"""`sni-proxy check --config` reports capacity for real, and `"workers": "auto"` starts (or refuses)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf

pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


def sni_proxy_cmd() -> list[str]:
    script = Path(sys.executable).with_name("sni-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sniproxy.cli"]


def write(tmp_path: Path, **config) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"listen_addr": "127.0.0.1:0", "default_backend": "127.0.0.1:9",
                                "metrics_addr": None, **config}))
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def hard_fd_limit() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_a_config_that_fits_this_host(tmp_path):
    path = write(tmp_path, workers="auto", max_connections=10_000, ebpf={"enabled": True})
    proc = run(sni_proxy_cmd() + ["check", "--config", str(path), "--json"])
    data = json.loads(proc.stdout)
    cap = data["capacity"]
    assert cap["evaluated"] and cap["relay"] == "tcp_splice" and cap["fds_per_connection"] == 2
    assert cap["sockmap_entries"] == 65536                       # auto, never below the default
    assert cap["tcp_splice_flows"] == 16384                      # auto, never below the default
    assert cap["fds_per_worker"] <= cap["fd_limit"] == hard_fd_limit()
    assert cap["ok"], [i for i in cap["items"] if not i["ok"]]
    assert proc.returncode == 0, proc.stdout


def test_a_config_that_cannot_reach_max_connections(tmp_path):
    # 100,000 connections to one backend: one source address has too few ephemeral ports.
    path = write(tmp_path, workers=2, max_connections=100_000, listen_backlog=65535)
    proc = run(sni_proxy_cmd() + ["check", "--config", str(path)])
    assert proc.returncode == 1, proc.stdout
    out = proc.stdout
    assert "Capacity: can" in out and "max_connections=100000" in out
    assert "✗ fds per worker: 2 worker(s): 50000 connections x 6 fds (splice relay)" in out
    assert 'set workers to' in out and 'or "auto"' in out
    assert "✗ ephemeral ports to 127.0.0.1:9" in out
    assert "net.ipv4.ip_local_port_range = 1024 65535" in out
    assert "net.core.somaxconn = 65535" in out
    assert "Capacity: ✗ not reachable as configured" in out


def test_an_invalid_config_is_not_evaluated(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"listen_addr": "127.0.0.1:0", "ebpf": {"enabled": False}}))
    proc = run(sni_proxy_cmd() + ["check", "--config", str(path)])
    assert proc.returncode == 0, proc.stdout           # the eBPF part alone decides, as before
    assert "Capacity: not evaluated, the config does not validate" in proc.stdout


def test_check_config_prints_the_auto_workers(tmp_path):
    path = write(tmp_path, workers="auto", max_connections=100_000, ebpf={"enabled": True})
    proc = run(sni_proxy_cmd() + ["--config", str(path), "--check-config"])
    assert proc.returncode == 0, proc.stderr
    limit = hard_fd_limit()
    expected = max(2, -(-100_000 // ((limit - 640) // 2)))
    assert f"{expected} worker(s)" in proc.stdout


def test_auto_refuses_to_start_when_the_fd_limit_cannot_hold_max_connections(tmp_path):
    path = write(tmp_path, workers="auto", max_connections=100_000)
    # A really lower fd limit (700: 60 connections per worker at most), not a mocked one.
    proc = run(["prlimit", "--nofile=700:700"] + sni_proxy_cmd() + ["--config", str(path)])
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach max_connections with workers \"auto\"" in proc.stderr
    assert "the fd limit is 700" in proc.stderr and "lower max_connections to" in proc.stderr


def _auto_workers(tmp_path: Path, prefix: list[str]) -> tuple[int, str]:
    from tests.integration.harness import ProxyProcess, base_config, free_port
    cfg = base_config(free_port(), free_port(), default_backend="127.0.0.1:9", workers="auto",
                      max_connections=12_000,
                      ebpf={"enabled": True, "dns_cache": {"pin_path": None}})
    d = tmp_path / f"p{len(prefix)}"
    d.mkdir()
    p = ProxyProcess(cfg, d, argv_prefix=prefix)
    try:
        p.start()
        return len(p.status()["workers"]), p.log()
    finally:
        p.stop()


def test_auto_workers_follow_the_relay_the_kernel_allows(tmp_path):
    import shutil
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to drop capabilities")
    limit = hard_fd_limit()
    # With the sockmap: 2 fds per connection; at least one worker per CPU.
    workers, log = _auto_workers(tmp_path, [])
    cpus = len(__import__("os").sched_getaffinity(0))
    assert workers == max(cpus, -(-12_000 // ((limit - 640) // 2))), log
    assert "(sockmap)" in log
    # Without CAP_BPF / CAP_NET_ADMIN (really dropped): the splice relay's 6 fds per connection.
    caps = "-bpf,-net_admin,-sys_admin,-perfmon"
    drop = ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}"]
    workers, log = _auto_workers(tmp_path, drop)
    assert workers == max(cpus, -(-12_000 // ((limit - 640) // 6))), log
    assert "(splice)" in log


def test_reload_keeps_auto_workers_and_map_size(tmp_path):
    import signal
    from tests.integration.harness import ProxyProcess, base_config, free_port, wait_until
    cfg = base_config(free_port(), free_port(), default_backend="127.0.0.1:9", workers="auto",
                      max_connections=40_000,
                      ebpf={"enabled": True, "dns_cache": {"pin_path": None}})
    p = ProxyProcess(cfg, tmp_path)
    try:
        p.start()
        status = p.status()
        assert status["config"]["workers"] == len(status["workers"]) >= 2
        assert status["config"]["ebpf"]["sockmap"]["max_entries"] == 80_000    # 2 x max_connections
        cfg = p.config        # as the harness wrote it (tcp_splice off outside a netns)
        p.config_path.write_text(json.dumps({**cfg, "timeouts": {**cfg["timeouts"], "idle_s": 30}}))
        p.signal(signal.SIGHUP)
        wait_until(lambda: p.metric("sniproxy_config_reloads_total", result="applied") == 1, 10,
                   "reload")
        # "auto" resolved to the same numbers: nothing reported as needing a restart.
        assert "only take effect after a restart" not in p.log(), p.log()
        assert p.status()["config"]["timeouts"]["idle_s"] == 30
    finally:
        p.stop()
