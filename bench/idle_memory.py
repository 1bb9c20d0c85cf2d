#!/usr/bin/env python3
"""Idle memory of the whole sni-proxy (supervisor + workers): RSS, PSS, anonymous PSS.

    .venv/bin/python bench/idle_memory.py [--workers 2] [--ebpf] [--reps 3]
    PYTHONPATH=/path/to/other/checkout/src .venv/bin/python bench/idle_memory.py ...   (compare)

Starts the proxy (listening on a free loopback port, no routes used, metrics on), waits until
its memory stops changing, sums /proc/PID/smaps_rollup over its processes, stops it. PSS
splits each shared page between the processes mapping it: the sum is what the proxy costs.
Pss_File also shares shared libraries with unrelated processes (other Pythons on the machine),
so Pss_Anon is the steadier number. Run with compiled bytecode (the script compiles it, as pip
install does): without it every process also keeps what the compiler allocated.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Dirty", "Shared_Dirty")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:
                out.append(int(entry))
    return out


def memory(sid: int) -> dict:
    total = dict.fromkeys(FIELDS, 0)
    pids = session_pids(sid)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in total:
                        total[key] += int(value.split()[0]) * 1024
        except OSError:
            continue
    return {"processes": len(pids), **total}


def measure(workers: int, ebpf: bool, settle_timeout: float) -> dict:
    port, metrics = free_port(), free_port()
    config = {"listen_addr": f"127.0.0.1:{port}", "metrics_addr": f"127.0.0.1:{metrics}",
              "default_backend": "127.0.0.1:9", "workers": workers,
              "log": {"level": "warning"},
              "ebpf": {"enabled": ebpf, "dns_cache": {"pin_path": None}}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    proc = subprocess.Popen([sys.executable, "-m", "sniproxy.cli", "--config", f.name],
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + settle_timeout
        last = None
        while time.monotonic() < deadline:
            time.sleep(0.5)       # sampling interval: memory has no event to wait for
            now = memory(proc.pid)
            if (last is not None and now["processes"] == workers + 1
                    and abs(now["Pss"] - last["Pss"]) <= 0.005 * last["Pss"]):
                return now
            last = now
        raise SystemExit(f"the proxy's memory did not settle within {settle_timeout}s: {last}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        os.unlink(f.name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ebpf", action="store_true", help="kernel data path on (sockmap, DNS map, stats)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--settle-timeout", type=float, default=20)
    args = p.parse_args()
    import sniproxy
    compileall.compile_dir(str(Path(sniproxy.__file__).parent), quiet=1)
    mib = 1 << 20
    for _ in range(args.reps):
        m = measure(args.workers, args.ebpf, args.settle_timeout)
        print(json.dumps({"source": str(Path(sniproxy.__file__).parent), "workers": args.workers,
                          "ebpf": args.ebpf, **{k: round(v / mib, 1) if k != "processes" else v
                                                for k, v in m.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
