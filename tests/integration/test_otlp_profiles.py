"""OTLP profiles of a known workload (tests/integration/burn.c), sent by `sni-proxy profile --otlp`
and by the library's exporter to receivers built on the official stubs."""
from __future__ import annotations

import os
import subprocess
import sys

from sniproxy.observe.config import EbpfConfig
from sniproxy.observe.profiler import EbpfCpuProfiler
from sniproxy.telemetry.folded import fold
from sniproxy.telemetry.otlp_profiles import OtlpProfileExporter, check_dictionary
from tests.integration.otlp_receiver import GrpcReceiver, HttpReceiver
from tests.integration.test_profiler import (  # noqa: F401
    Burn, assert_sample_count, assert_split, burn_bin, burns, ebpf, on_cpu_s)
from tests.unit.test_otlp_profiles import _attrs, folded_from_otlp


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def function_shares(request, pid: int, names: tuple[str, ...]) -> tuple[dict[str, float], int]:
    """Share of the samples of `pid` whose stack holds each function, from the OTLP data alone."""
    d = request.dictionary
    hits = dict.fromkeys(names, 0)
    total = 0
    for rp in request.resource_profiles:
        res = {kv.key: kv.value for kv in rp.resource.attributes}
        if res["process.pid"].int_value != pid:
            continue
        for sample in rp.scope_profiles[0].profiles[0].samples:
            n = sum(sample.values)
            total += n
            stack = {d.string_table[d.function_table[d.location_table[i].lines[0].function_index].name_strindex]
                     for i in d.stack_table[sample.stack_index].location_indices}
            for name in names:
                if name in stack:
                    hits[name] += n
    return {k: v / total for k, v in hits.items()}, total


def test_cli_otlp_grpc_known_split(ebpf, burns):
    with GrpcReceiver() as receiver:
        b = burns("ratio", 4, threads=2)
        cli = subprocess.Popen([sys.executable, "-m", "sniproxy.cli", "profile", "-p", str(b.pid), "-F", "199",
                                "--top", "0", "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean_env(OTEL_EXPORTER_OTLP_HEADERS="authorization=Bearer%20t0ken"))
        try:
            # The burner runs while the CLI starts (a second or more on a loaded machine: 196
            # samples for 289 expected, with two busy loops): only its CPU time from the
            # "Sampling" line on is sampled.
            head: list[str] = []
            while not (head and head[-1].startswith("Sampling")) and (line := cli.stderr.readline()):
                head.append(line)
            sampling = bool(head) and head[-1].startswith(f"Sampling pid {b.pid} at 199 Hz")
            cpu_before_s = on_cpu_s(b.pid) if sampling else 0.0
            _, rest = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
        stderr = "".join(head) + rest
        assert cli.returncode == 0 and sampling, stderr
        cpu_s = b.wait() - cpu_before_s     # the CLI stopped when the burner exited: reap it
        assert f"over grpc to http://127.0.0.1:{receiver.port}" in stderr
        got = receiver.wait_for(lambda items: receiver.of("profiles"), 10, "the profile")[0]
    req = got.request
    assert got.headers["authorization"] == "Bearer t0ken"
    check_dictionary(req)
    assert len(req.resource_profiles) == 1
    res = {kv.key: kv.value for kv in req.resource_profiles[0].resource.attributes}
    assert res["process.pid"].int_value == b.pid and res["process.executable.name"].string_value == "burn"
    p = req.resource_profiles[0].scope_profiles[0].profiles[0]
    assert p.period == round(1e9 / 199)
    shares, total = function_shares(req, b.pid, ("burn_a", "burn_b", "run"))
    assert_sample_count(total, 199, cpu_s, rel=0.25)   # the samples match the CPU time it got
    assert_split(shares["burn_a"], shares["burn_b"], total)
    assert shares["run"] >= 0.95
    d = req.dictionary
    per_thread: dict[int, int] = {}
    for s in p.samples:
        tid = _attrs(d, s.attribute_indices)["thread.id"]
        per_thread[tid] = per_thread.get(tid, 0) + sum(s.values)
    # The two worker threads, told apart by thread id. The main thread may catch a sample or two
    # while it starts them (its stack has no `run`, and `run` holds >= 95 % of the samples).
    workers = {t: n for t, n in per_thread.items() if t != b.pid}
    assert len(workers) == 2, per_thread
    assert per_thread.get(b.pid, 0) <= 0.05 * total, per_thread
    assert {_attrs(d, s.attribute_indices)["thread.name"] for s in p.samples} == {"burn"}


def test_library_exporter_http_agrees_with_folded(ebpf, burns):
    with EbpfCpuProfiler(EbpfConfig().with_sample_rate(99)) as profiler:
        b = burns("syscall", 1.5)
        b.wait()
    profile = profiler.snapshot()
    with HttpReceiver() as receiver:
        exporter = OtlpProfileExporter.from_env(endpoint=f"http://127.0.0.1:{receiver.port}",
                                                protocol="http/protobuf", environ=clean_env())
        assert exporter.endpoint == f"http://127.0.0.1:{receiver.port}/v1development/profiles"
        exporter.export(profile, include_pprof=True, resource_attributes={"service.name": "bench"})
        req = receiver.wait_for(lambda items: receiver.of("profiles"), 10, "the profile")[0].request
    check_dictionary(req)
    # Every process of the machine-wide profile, every stack, every count: the same as folded.
    assert folded_from_otlp(req) == fold(profile)
    kernel = [loc for loc in req.dictionary.location_table[1:]
              if _attrs(req.dictionary, loc.attribute_indices)["profile.frame.type"] == "kernel"]
    assert kernel                                   # a syscall workload has kernel frames
    mine = [rp for rp in req.resource_profiles
            if {kv.key: kv.value for kv in rp.resource.attributes}["process.pid"].int_value == b.pid]
    assert mine and mine[0].scope_profiles[0].profiles[0].original_payload_format == "pprof"
    assert {kv.key: kv.value for kv in mine[0].resource.attributes}["service.name"].string_value == "bench"


def test_cli_otlp_unreachable_collector_fails_with_the_reason(ebpf, burns):
    from tests.integration.harness import free_port
    b = burns("ratio", 0.5)
    r = subprocess.run([sys.executable, "-m", "sniproxy.cli", "profile", "-p", str(b.pid), "-q", "--top", "0",
                        "--otlp-endpoint", f"http://127.0.0.1:{free_port()}", "--otlp-protocol", "http/protobuf"],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 1 and "OTLP export failed" in r.stderr and "/v1development/profiles" in r.stderr
