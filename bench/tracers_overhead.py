"""Cost of each tracer on a syscall-heavy, a connection-heavy and an allocation-heavy workload.

Two views of the same cost, both measured:
  1. throughput of bench/tracer_workloads/bench_load.c with no tracer, then with each tracer
     attached (modes interleaved over rounds so drift on a shared machine hits every mode
     alike; the best round of each mode is kept: other jobs only ever add time): the extra
     time per operation;
  2. get_overhead() of the tracer during that run: BPF run time / runs (bpf_stats), i.e. the
     in-kernel part of the same extra time.

    sudo .venv/bin/python bench/tracers_overhead.py [--rounds 5] [--workloads syscalls,connect,malloc]

Prints a Markdown table for docs/tracing.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sniproxy.observe.tracing import (EbpfMemoryTracer, EbpfNetworkTracer,  # noqa: E402
                                      EbpfSyscallTracer)
from sniproxy.observe.tracing.route_metrics import RouteNetworkTracer  # noqa: E402

WORKLOADS = {"syscalls": 1_000_000, "connect": 10_000, "malloc": 200_000}


def build(directory: str) -> str:
    out = os.path.join(directory, "bench_load")
    subprocess.run(["gcc", "-O2", "-o", out, str(ROOT / "bench/tracer_workloads/bench_load.c")],
                   check=True)
    return out


def run(exe: str, workload: str, tracer_factory) -> tuple[float, object]:
    """Seconds per operation, and the tracer's overhead report (None without tracer)."""
    proc = subprocess.Popen([exe, workload, str(WORKLOADS[workload])], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "w\n"      # loaded, waiting for us
    tracer = tracer_factory(proc.pid) if tracer_factory else None
    try:
        if tracer is not None:
            tracer.start()
        out, _ = proc.communicate(input="g", timeout=600)
        overhead = tracer.get_overhead() if tracer is not None else None
    finally:
        if tracer is not None:
            tracer.stop()
    ops, seconds = out.split()
    return float(seconds) / int(ops), (overhead, int(ops))


MODES = {
    "none": None,
    "syscalls, other pid": lambda pid: EbpfSyscallTracer(pid=1),
    "syscalls, this pid": lambda pid: EbpfSyscallTracer(pid=pid),
    "syscalls -L, this pid": lambda pid: EbpfSyscallTracer(pid=pid, latency=True),
    "syscalls, all": lambda pid: EbpfSyscallTracer(),
    "tcp (close+connect+retrans), all": lambda pid: EbpfNetworkTracer(),
    "memory, this pid": lambda pid: EbpfMemoryTracer(pid=pid),
    "proxy per-route mode (sockets not tagged)": lambda pid: RouteNetworkTracer(),
}
APPLIES = {"syscalls": list(MODES)[:5] + ["tcp (close+connect+retrans), all"],
           "connect": ["none", "syscalls, other pid", "syscalls, all",
                       "tcp (close+connect+retrans), all",
                       "proxy per-route mode (sockets not tagged)"],
           "malloc": ["none", "memory, this pid"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", help="comma list of " + ",".join(WORKLOADS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        print("| workload | tracer | ns/op | extra ns/op | throughput | BPF ns/run | "
              "BPF ns/op | tracer CPU % |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        only = args.workloads.split(",") if args.workloads else list(APPLIES)
        for workload, modes in ((w, APPLIES[w]) for w in only):
            samples: dict[str, list[float]] = {m: [] for m in modes}
            bpf: dict[str, list[float]] = {m: [] for m in modes}
            bpf_op: dict[str, list[float]] = {m: [] for m in modes}
            cpu: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    per_op, (ov, ops) = run(exe, workload, MODES[mode])
                    samples[mode].append(per_op)
                    if ov is not None and ov.bpf_run_count:
                        bpf[mode].append(ov.bpf_ns_per_run)
                        bpf_op[mode].append(ov.bpf_run_time_ns / ops)
                        cpu[mode].append(ov.cpu_percent)
            base = min(samples["none"])
            for mode in modes:
                med = min(samples[mode])
                rel = base / med
                def m(values: list[float], spec: str) -> str:
                    return format(statistics.median(values), spec) if values else "-"
                print(f"| {workload} | {mode} | {med * 1e9:.0f} | {(med - base) * 1e9:+.0f} | "
                      f"{rel * 100:.0f} % | {m(bpf[mode], '.0f')} | {m(bpf_op[mode], '.0f')} | "
                      f"{m(cpu[mode], '.1f')} |")


if __name__ == "__main__":
    main()
