#!/usr/bin/env python3
"""Start sni-proxy for ../shared/bench: turn the harness's routes file into a config.json.

    --cmd '.venv/bin/python bench/run_sni_proxy.py --listen {listen} --routes {routes} --workers {workers}'
    add --ebpf for the kernel data path (the tc TCP splice on `lo` first, --no-tcp-splice for the
    sockmap relay with an 8 MiB forced send buffer: measured
    598 MB/s with the default buffer, 1.7 GB/s with 8 MiB; BPF DNS cache not pinned; per-CPU stats),
    --inflight BYTES, --[no-]backpressure to set ebpf.sockmap.max_inflight_bytes / backpressure
    (omitted: the config's defaults),
    --socks {socks} to route through the harness's SOCKS5 server,
    --metrics ADDR to move /metrics (default 127.0.0.1:19090, off the harness's ports).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--routes", required=True, help="file with lines 'SNI-NAME HOST:PORT'")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ebpf", action="store_true", help="kernel data path (sockmap, BPF DNS cache, stats)")
    p.add_argument("--socks", help="host:port of a SOCKS5 upstream for every route")
    p.add_argument("--sndbuf", type=int, default=8 << 20, help="ebpf.sockmap.sndbuf_bytes with --ebpf")
    p.add_argument("--inflight", type=int, help="ebpf.sockmap.max_inflight_bytes with --ebpf")
    bp = p.add_mutually_exclusive_group()
    bp.add_argument("--backpressure", dest="backpressure", action="store_const", const=True,
                    help="ebpf.sockmap.backpressure = true (the default)")
    bp.add_argument("--no-backpressure", dest="backpressure", action="store_const", const=False,
                    help="ebpf.sockmap.backpressure = false")
    p.add_argument("--no-tcp-splice", action="store_true",
                   help="ebpf.tcp_splice.enabled = false (the sockmap relay is then the kernel's)")
    p.add_argument("--tcp-splice-interfaces", default="lo",
                   help="comma-separated ebpf.tcp_splice.interfaces (default: lo, where the "
                        "harness's clients and backends are)")
    p.add_argument("--relay", default="auto", choices=["auto", "splice", "copy"])
    p.add_argument("--metrics", default="127.0.0.1:19090")
    args = p.parse_args()
    routes = []
    for line in Path(args.routes).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, backend = line.split()[:2]
        route = {"match": name, "backend": backend}
        if args.socks:
            route["upstream"] = "bench"
        routes.append(route)
    config = {
        "listen_addr": args.listen,
        "metrics_addr": args.metrics,
        "workers": max(1, args.workers),
        "max_connections": 4000,
        "routes": routes,
        "relay": {"mode": args.relay},
        "log": {"level": "warning", "access_log": False},
        # The harness sends SIGTERM and SIGKILLs after 10 s: drain for less, so the proxy exits
        # by itself and removes its tc filters from lo (a killed one leaves them to the next peer).
        "timeouts": {"shutdown_grace_s": 3},
        "ebpf": {"enabled": args.ebpf,
                 "sockmap": {"sndbuf_bytes": args.sndbuf,
                             **({} if args.backpressure is None else {"backpressure": args.backpressure}),
                             **({"max_inflight_bytes": args.inflight} if args.inflight else {})},
                 "dns_cache": {"pin_path": None},
                 "tcp_splice": {"enabled": not args.no_tcp_splice,
                                "interfaces": args.tcp_splice_interfaces.split(",")}},
    }
    if args.socks:
        config["upstreams"] = {"bench": {"type": "socks5", "addr": args.socks}}
    fd, path = tempfile.mkstemp(prefix="sni-proxy-bench-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    exe = str(ROOT / ".venv" / "bin" / "sni-proxy")
    os.execv(exe, [exe, "--config", path])


if __name__ == "__main__":
    sys.exit(main())
