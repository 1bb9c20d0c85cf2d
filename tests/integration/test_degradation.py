"""Graceful degradation for real: the proxy run without the capabilities BPF needs.

`setpriv` drops CAP_BPF / CAP_NET_ADMIN / CAP_SYS_ADMIN / CAP_PERFMON from the bounding,
inheritable and ambient sets, so even as root the kernel refuses maps and programs (EPERM).
"""
from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from tests.ebpf_required import require_ebpf, skip_or_fail
from tests.integration.harness import (
    SNI_PROXY, ProxyProcess, RawBackend, base_config, client_hello_bytes, free_port, wait_until,
)

pytestmark = pytest.mark.ebpf
CAP_BIT = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()         # the point is to prove the difference; the full run must be possible
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is needed to drop capabilities")


def drop(*caps: str) -> list[str]:
    names = ",".join(f"-{c.lower().removeprefix('cap_')}" for c in caps)
    return ["setpriv", f"--inh-caps={names}", f"--ambient-caps={names}", f"--bounding-set={names}"]


def capeff(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def ebpf_config(**over) -> dict:
    return {"enabled": True, "dns_cache": {"pin_path": None}, **over}


@pytest.fixture
def run(tmp_path):
    started: list[ProxyProcess] = []

    def start(prefix: list[str], backend_port: int, wait: bool = True, **over) -> ProxyProcess:
        cfg = base_config(free_port(), free_port(), default_backend=f"127.0.0.1:{backend_port}",
                          **over)
        d = tmp_path / f"p{len(started)}"
        d.mkdir()
        p = ProxyProcess(cfg, d, argv_prefix=prefix)
        started.append(p)
        return p.start(wait=wait)

    yield start
    for p in started:
        p.stop()


def relay_one(p: ProxyProcess) -> str:
    """One connection through the proxy; returns its access-log line."""
    hello = client_hello_bytes("x.test")
    port = int(p.config["listen_addr"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hello + b"payload")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert len(data) == 4096
    lines = wait_until(lambda: [x for x in p.log().splitlines() if "sniproxy.access" in x], 10,
                       "an access log line")
    return lines[-1]


def warnings_about(log: str, feature: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and f"eBPF {feature} " in line]


def test_without_bpf_capabilities_everything_degrades_and_traffic_flows(run):
    be = RawBackend(reply_bytes=4096)
    p = run(drop("CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON"), be.port,
            ebpf=ebpf_config())
    for pid in [p.proc.pid] + [w["pid"] for w in p.status()["workers"]]:
        eff = capeff(pid)
        assert not any(eff >> bit & 1 for bit in CAP_BIT.values()), f"pid {pid} CapEff {eff:#x}"
    e = p.status()["ebpf"]
    assert (e["enabled"], e["mode"]) == (True, "none")
    assert (e["sockmap"], e["dns_cache"], e["stats"]) == ("disabled", "disabled", "disabled")
    for feature in ("sockmap", "dns_cache", "stats"):
        assert "CAP_BPF" in e["reasons"][feature], e["reasons"]
        assert "fix" in e["reasons"][feature]
        assert len(warnings_about(p.log(), feature)) == 1, p.log()
    line = relay_one(p)
    assert "relay=splice" in line or "relay=copy" in line
    assert "outcome=ok" in line and "bytes_down=4096" in line
    assert p.metric("ebpf_feature_state", feature="sockmap", state="disabled") == 1
    assert "ebpf_sockmap_redirects" not in p.metrics()


def test_without_net_admin_sockmap_off_rest_active(run):
    be = RawBackend(reply_bytes=4096)
    p = run(drop("CAP_NET_ADMIN", "CAP_SYS_ADMIN"), be.port, ebpf=ebpf_config())
    e = p.status()["ebpf"]
    assert e["mode"] == "partial", e
    assert (e["sockmap"], e["dns_cache"], e["stats"]) == ("disabled", "active", "active")
    assert "CAP_NET_ADMIN" in e["reasons"]["sockmap"]
    assert len(warnings_about(p.log(), "sockmap")) == 1
    assert warnings_about(p.log(), "dns_cache") == [] and warnings_about(p.log(), "stats") == []
    line = relay_one(p)
    assert "relay=sockmap" not in line and "outcome=ok" in line
    assert p.metric("ebpf_feature_state", feature="dns_cache", state="active") == 1


def test_strict_mode_refuses_to_start_with_a_clear_message(tmp_path):
    cfg = base_config(free_port(), free_port(), default_backend="127.0.0.1:9",
                      ebpf=ebpf_config(), fallback_mode="strict")
    p = ProxyProcess(cfg, tmp_path)
    r = subprocess.run([*drop("CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_PERFMON"),
                        SNI_PROXY, "--config", str(p.config_path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stderr
    out = r.stdout + r.stderr
    assert "strict mode" in out and "sockmap:" in out and "CAP_BPF" in out
    assert 'fallback_mode to "auto"' in out


def test_disabled_in_config_is_reported_as_such(run):
    be = RawBackend(reply_bytes=4096)
    p = run([], be.port, ebpf=ebpf_config(sockmap={"enabled": False}))
    e = p.status()["ebpf"]
    assert e["sockmap"] == "disabled" and "ebpf.sockmap.enabled is false" in e["reasons"]["sockmap"]
    assert e["mode"] == "full"          # every *requested* feature is active
    assert warnings_about(p.log(), "sockmap") == []
    assert "relay=sockmap" not in relay_one(p)
