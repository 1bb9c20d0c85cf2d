"""Continuous profiling inside the proxy (issue 13): drained every interval, exported over OTLP
and written as pprof files that `go tool pprof` (Debian's golang-go) reads."""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sniproxy.telemetry.otlp_profiles import check_dictionary
from tests.ebpf_required import skip_or_fail
from tests.integration.harness import ProxyProcess, base_config, free_ports, make_pki, tls_backend, wait_until
from tests.integration.otlp_receiver import GrpcReceiver
from tests.integration.test_otlp_metrics import otlp_env, request
from tests.integration.test_profiler import burn_bin, burns, ebpf  # noqa: F401 - fixtures

NAME = "a.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), [NAME])


@pytest.fixture
def proxy(tmp_path):
    started: list[ProxyProcess] = []

    def start(profiling: dict, backend_port: int, otlp: dict | None = None, workers: int = 2) -> ProxyProcess:
        cfg = base_config(*free_ports(2), workers=workers, profiling=profiling, otlp=otlp or {},
                          routes=[{"match": NAME, "backend": f"127.0.0.1:{backend_port}"}])
        p = ProxyProcess(cfg, tmp_path, env=otlp_env())
        started.append(p)
        return p.start()

    yield start
    for p in started:
        p.stop()


def test_self_profiling_exports_every_interval_with_bounded_memory(ebpf, proxy, pki, tmp_path):
    pprof_dir = tmp_path / "profiles"
    with GrpcReceiver() as receiver, tls_backend(pki, [NAME], "A") as backend:
        p = proxy({"enabled": True, "environment": "production", "export_interval_s": 2,
                   "pprof_dir": str(pprof_dir), "retention": 2},
                  backend, otlp={"endpoint": f"http://127.0.0.1:{receiver.port}"})
        t0 = time.monotonic()
        memory = []
        stop = threading.Event()

        def load():      # keep the workers on a CPU so every interval has samples
            while not stop.is_set() and time.monotonic() - t0 < 30:
                request(p, pki)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            for n in (1, 2, 3):
                wait_until(lambda: p.status()["profiling"]["drains"] >= n, 15, f"drain {n}")
                memory.append(p.metric("ebpf_profiler_overhead_memory_bytes"))
            status = p.status()["profiling"]
            elapsed = time.monotonic() - t0
        finally:
            stop.set()
            loader.join(30)
        own = {p.status()["pid"]} | {w["pid"] for w in p.status()["workers"]}
        metrics_cpu = p.metric("ebpf_profiler_overhead_cpu_percent")
        p.stop()
        received = receiver.of("profiles")
    # One drain per 2 s interval since the start (give or take one for scheduling on busy CPUs),
    # plus the final one at stop.
    assert status["drains"] >= 3 and abs(status["drains"] - elapsed / 2) <= 1.5, (status, elapsed)
    assert status["sample_rate_hz"] == 19 and status["sinks"]["otlp"]["failed"] == 0, status
    # what /status counted, then at most one more interval before the stop and the final drain
    assert status["sinks"]["otlp"]["ok"] <= len(received) <= status["sinks"]["otlp"]["ok"] + 2, status
    assert len(received) >= 3, status
    assert max(memory) < 50e6 and max(memory) <= min(memory) * 1.5, memory   # bounded, not growing
    assert 0 < metrics_cpu < 100
    for r in received:
        check_dictionary(r.request)
        for rp in r.request.resource_profiles:
            res = {kv.key: kv.value for kv in rp.resource.attributes}
            assert res["process.pid"].int_value in own
            assert res["service.name"].string_value == "sni-proxy"
            assert rp.scope_profiles[0].profiles[0].period == round(1e9 / 19)
    files = sorted(pprof_dir.glob("cpu-*.pb.gz"))
    assert len(files) == 2, (files, status)           # retention: the oldest were deleted


def go_pprof_top(files: list[Path]) -> dict[str, float]:
    go = shutil.which("go")
    if go is None:
        skip_or_fail("go is needed to read pprof files with `go tool pprof` (apt-get install golang-go)")
    r = subprocess.run([go, "tool", "pprof", "-top", "-symbolize=none", "-sample_index=samples",
                        *map(str, files)], capture_output=True, text=True, timeout=120,
                       env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    flat = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*\S+\s+([\d.]+)%\s+[\d.]+%\s+\S+\s+[\d.]+%\s+(.+)$", line)
        if m:
            flat[m.group(2).strip()] = float(m.group(1)) / 100
    return flat


def test_pprof_files_read_by_go_tool_pprof_show_the_split(ebpf, proxy, burns, pki, tmp_path):
    pprof_dir = tmp_path / "profiles"
    with tls_backend(pki, [NAME], "A") as backend:
        b = burns("ratio", 5, threads=2)
        p = proxy({"enabled": True, "environment": "debug", "export_interval_s": 1, "targets": [b.pid],
                   "otlp": False, "pprof_dir": str(pprof_dir), "retention": 100}, backend, workers=1)
        b.wait()
        wait_until(lambda: p.status()["profiling"]["drains"] >= 1, 10, "a drain")
        assert p.status()["profiling"]["sample_rate_hz"] == 199
        p.stop()                                    # the final drain writes the last file
    files = sorted(pprof_dir.glob("cpu-*.pb.gz"))
    assert len(files) >= 3, files
    # The first interval overlaps the proxy's own start-up on these 2 CPUs (the burner's threads
    # are preempted then): `go tool pprof` merges the others.
    flat = go_pprof_top(files[1:])
    a, bb = flat.get("burn_a", 0), flat.get("burn_b", 0)
    assert a + bb > 0.9, flat
    assert abs(a / (a + bb) - 0.70) <= 0.05, flat


def test_drain_empties_the_maps_and_counts_each_sample_once(ebpf, burns):
    from sniproxy.observe.config import EbpfConfig
    from sniproxy.observe.profiler import MAP_COUNTS, MAP_STACKS, EbpfCpuProfiler

    b = burns("ratio", 10)
    with EbpfCpuProfiler(EbpfConfig().with_pids(b.pid).with_sample_rate(199)) as profiler:
        time.sleep(0.7)     # sampling time, not synchronisation
        first = profiler.drain()
        time.sleep(0.7)
        second = profiler.drain()
        left = profiler._obj.map(MAP_COUNTS).count()
        b.kill()
    final = profiler.stop()
    assert first.total_samples > 50 and second.total_samples > 50
    assert left < second.total_samples / 4             # the counts were removed (a few new ones)
    assert first.stats.samples == first.total_samples + first.stats.dropped
    assert second.start_time_ns == first.start_time_ns + first.duration_ns
    assert second.stats.samples < first.stats.samples + second.total_samples   # per interval
    # Nothing counted twice: every interval's samples match its own kernel count...
    for p in (first, second, final):
        assert p.stats.samples - 2 <= p.total_samples + p.stats.dropped <= p.stats.samples + 2, p.stats
    assert final.start_time_ns == second.start_time_ns + second.duration_ns
    # ...and no sample lost its stack to the clean-up of the stack map.
    stackless = sum(s.count for p in (first, second, final) for s in p.samples if not s.user_frames)
    assert stackless <= 2, stackless
    assert MAP_STACKS


def test_without_bpf_capabilities_the_proxy_runs_and_says_why(ebpf, pki, tmp_path):
    from tests.integration.test_degradation import drop
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is needed to drop capabilities")
    with tls_backend(pki, [NAME], "A") as backend:
        cfg = base_config(*free_ports(2), profiling={"enabled": True, "otlp": False, "pprof_dir": str(tmp_path)},
                          routes=[{"match": NAME, "backend": f"127.0.0.1:{backend}"}])
        p = ProxyProcess(cfg, tmp_path, env=otlp_env(),
                         argv_prefix=drop("CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN")).start()
        try:
            request(p, pki)
            status = p.status()["profiling"]
            assert status["enabled"] is False
            assert "CAP_BPF" in status["reason"] and "setcap" in status["reason"], status
            assert "continuous profiling disabled" in p.log()
            assert p.metric("ebpf_profiler_overhead_cpu_percent") == 0     # absent, not invented
        finally:
            p.stop()
