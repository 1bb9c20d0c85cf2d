"""Overhead of the eBPF CPU profiler at 19 / 99 / 199 Hz on a busy machine.

Two views of the same cost, measured, not estimated:
  1. get_overhead() while sampling: BPF run time (BPF_ENABLE_STATS) + the profiler's own CPU,
     over wall time x CPUs; and after stop(), including the final symbolization.
  2. Throughput of a CPU-bound workload (tests/integration/burn.c `work`, one thread per CPU,
     so every CPU is busy) with the profiler on (all processes) versus off, interleaved so
     drift from other load on the machine hits every mode alike.

    sudo .venv/bin/python bench/profiler_overhead.py [--seconds 8] [--rounds 2]

Takes about rounds x 4 x seconds (~70 s by default). Prints a Markdown table for docs/profiler.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sniproxy.observe.config import EbpfConfig  # noqa: E402
from sniproxy.observe.profiler import EbpfCpuProfiler  # noqa: E402

RATES = (19, 99, 199)


def build_burn(directory: str) -> str:
    if shutil.which("clang") is None:
        sys.exit("clang is needed to build the workload: apt-get install clang")
    out = os.path.join(directory, "burn")
    subprocess.run(["clang", "-O2", "-fno-omit-frame-pointer", "-pthread", "-o", out,
                    str(ROOT / "tests/integration/burn.c")], check=True)
    return out


def run_workload(burn: str, seconds: float, threads: int) -> tuple[float, float]:
    """(units of work per wall second, units per CPU second of the workload).

    Per CPU second is the robust one on a shared machine: it does not care how much CPU other
    load took, and (without CONFIG_IRQ_TIME_ACCOUNTING, as here) the time the BPF program
    runs in the sampling interrupt is charged to the interrupted task, so it shows up in it.
    """
    out = subprocess.run([burn, "work", str(seconds), str(threads)], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"units (\d+) cpu_ns (\d+)", out)
    units, cpu_ns = int(m.group(1)), int(m.group(2))
    return units / seconds, units / (cpu_ns / 1e9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (default 2)")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    results: dict[str, list[float]] = {"off": []}
    per_cpu: dict[str, list[float]] = {"off": []}
    overheads: dict[int, list] = {r: [] for r in RATES}
    with tempfile.TemporaryDirectory() as tmp:
        burn = build_burn(tmp)
        for rnd in range(args.rounds):
            for mode in ("off", *RATES):
                if mode == "off":
                    rate_units, cpu_units = run_workload(burn, args.seconds, cpus)
                    results["off"].append(rate_units)
                    per_cpu["off"].append(cpu_units)
                else:
                    profiler = EbpfCpuProfiler(EbpfConfig().with_sample_rate(mode))
                    profiler.start()
                    try:
                        rate_units, cpu_units = run_workload(burn, args.seconds, cpus)
                        running = profiler.get_overhead()
                    finally:
                        profiler.stop()
                    final = profiler.get_overhead()
                    profile = profiler.snapshot()
                    overheads[mode].append((running, final, profile))
                    results.setdefault(str(mode), []).append(rate_units)
                    per_cpu.setdefault(str(mode), []).append(cpu_units)
                print(f"round {rnd + 1} {mode!s:>4}: {rate_units:,.0f} units/s, "
                      f"{cpu_units:,.0f} units/CPU-s", file=sys.stderr)

    base = statistics.mean(results["off"])
    spread = (max(results["off"]) - min(results["off"])) / base * 100
    base_cpu = statistics.mean(per_cpu["off"])
    spread_cpu = (max(per_cpu["off"]) - min(per_cpu["off"])) / base_cpu * 100
    print(f"\nMachine: {cpus} CPUs, kernel {os.uname().release}; workload `burn work` with "
          f"{cpus} threads, {args.seconds:g} s x {args.rounds} rounds, profiler on all processes.")
    print(f"Baseline {base:,.0f} units/s (spread between rounds {spread:.1f} %), "
          f"{base_cpu:,.0f} units/CPU-s (spread {spread_cpu:.2f} %).\n")
    print("| rate | get_overhead() while sampling | BPF per sample | after stop (with symbolization) "
          "| memory | samples | workload units/CPU-s vs off | units/s vs off |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in RATES:
        runs = overheads[rate]
        sampling = statistics.mean(r.sampling_cpu_percent for r, _, _ in runs)
        total = statistics.mean(f.cpu_percent for _, f, _ in runs)
        per_sample = statistics.mean(r.bpf_ns_per_sample for r, _, _ in runs) / 1000
        memory = max(f.memory_bytes for _, f, _ in runs) / 1e6
        samples = statistics.mean(p.stats.samples for _, _, p in runs)
        tput = (statistics.mean(results[str(rate)]) / base - 1) * 100
        tput_cpu = (statistics.mean(per_cpu[str(rate)]) / base_cpu - 1) * 100
        print(f"| {rate} Hz | {sampling:.3f} % | {per_sample:.1f} us | {total:.2f} % | "
              f"{memory:.1f} MB | {samples:,.0f} | {tput_cpu:+.2f} % | {tput:+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
