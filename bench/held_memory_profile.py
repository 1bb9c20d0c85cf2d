#!/usr/bin/env python3
"""Where a held connection's Python memory goes: tracemalloc of one in-process sni-proxy worker.

    .venv/bin/python bench/held_memory_profile.py -n 2000 --relay sockmap   (or userspace)
    .venv/bin/python bench/held_memory_profile.py -n 2000 --relay sockmap --cprofile   (CPU)
    .venv/bin/python bench/held_memory_profile.py -n 2000 --relay tcp_splice --netns [--cprofile]

Runs the real worker (proxy.server.Worker + ProxyApp, and for `sockmap` the real kernel data
path) in this process, opens N connections through it with bench/held_connections.py's client
(a real ClientHello, replayed; a backend that holds them), and compares tracemalloc snapshots
taken before and after: bytes per connection by source line, and the process's anonymous
memory growth (what tracemalloc does not see: malloc outside Python, page granularity).
Bounded: the client has a deadline, the backend exits by itself after --max-seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _held():
    spec = importlib.util.spec_from_file_location("held_connections", HERE / "held_connections.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def anon_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


async def profile(n: int, relay: str, top: int, max_seconds: int, cpu_profile: bool = False,
                  churn: bool = False) -> dict:
    from sniproxy.config import parse_config
    from sniproxy.proxy.app import ProxyApp
    from sniproxy.proxy.server import Worker, create_listener
    from sniproxy.telemetry import metrics as metrics_mod

    held = _held()
    hello = held.capture_hello("p.held.test")
    with tempfile.TemporaryDirectory(prefix="held-prof-") as tmp:
        exe = held.build_backend(Path(tmp))
        backends = held.start_backends(exe, [len(hello)], max_seconds)
        kdp = kernel = None
        try:
            lsock = create_listener("127.0.0.1", 0, backlog=4096, reuse_port=False)
            port = lsock.getsockname()[1]
            config = parse_config({
                "listen_addr": f"127.0.0.1:{port}", "metrics_addr": None, "workers": 1,
                "max_connections": 2 * n + 200,
                "routes": [{"match": "p.held.test", "backend": f"127.0.0.1:{backends.ports[0]}"}],
                "log": {"level": "warning", "access_log": False},
                "timeouts": {"idle_s": 3600.0},
                "ebpf": held.RELAY_CONFIG[relay].get("ebpf", {"enabled": False}),
            })
            metrics_mod.enable_multiprocess(tmp)
            metrics = metrics_mod.ProxyMetrics()
            if relay in ("sockmap", "tcp_splice"):
                from sniproxy.relay.datapath import KernelDataPath
                kdp = KernelDataPath.start(config)
                kernel = kdp.worker_factory()(metrics)
            app = ProxyApp(config, metrics, kernel_relay=kernel)
            worker = Worker(app, [lsock])
            worker.start()
            loop = asyncio.get_running_loop()
            # Warm up: the first connections pay one-time costs (lazy imports, first epoll).
            warm = await _open(loop, held, port, 50, hello)
            # Phase 1, untraced: what N connections add to the process's anonymous memory.
            gc.collect()
            anon_before = anon_kib()
            untraced = await _open(loop, held, port, n, hello)
            gc.collect()
            anon_after = anon_kib()
            # Phase 2, traced: N more connections, by source line (tracemalloc's own tables
            # would inflate phase 1, hence two phases).
            if cpu_profile:
                # cProfile instead: where the worker's CPU goes while N connections open.
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                client = await _open(loop, held, port, n, hello, churn, 50 if churn else 256)
                if churn:
                    # The last connections' ends (FIN both ways, the end event) still arrive.
                    await asyncio.sleep(0.5)
                prof.disable()
                stats = pstats.Stats(prof)
                rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
                for c in (client, untraced, warm):
                    c.stdin.close()
                    c.wait(60)
                return {"relay": relay, "n": n, "churn": churn, "anon_bytes_per_conn":
                        round((anon_after - anon_before) * 1024 / n),
                        "total_us_per_conn": round(stats.total_tt * 1e6 / n, 1),
                        "top_tottime": [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})",
                                         "calls_per_conn": round(v[1] / n, 2),
                                         "self_us_per_conn": round(v[2] * 1e6 / n, 1),
                                         "cum_us_per_conn": round(v[3] * 1e6 / n, 1)}
                                        for k, v in rows]}
            tracemalloc.start(1)
            before = tracemalloc.take_snapshot()
            client = await _open(loop, held, port, n, hello)
            gc.collect()
            after = tracemalloc.take_snapshot()
            traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
            lines = [{"where": str(s.traceback[0]), "bytes_per_conn": round(s.size_diff / n, 1),
                      "objects_per_conn": round(s.count_diff / n, 2)}
                     for s in after.compare_to(before, "lineno")[:top]]
            for c in (client, untraced, warm):
                c.stdin.close()
                c.wait(60)
            return {"relay": relay, "n": n, "traced_bytes_per_conn": round(traced / n), "anon_bytes_per_conn":
                    round((anon_after - anon_before) * 1024 / n), "top": lines}
        finally:
            tracemalloc.stop()
            backends.stop()
            if kernel is not None and kernel.tcp_splice is not None:
                kernel.tcp_splice.close()       # its flows and ring reader before the maps go
            if kdp is not None:
                kdp.close()


async def _open(loop, held, port: int, count: int, hello: bytes, churn: bool = False,
                inflight: int = 256) -> subprocess.Popen:
    """Start a client of `count` connections and wait (on the event loop) until all are open
    (with churn: opened and closed again, at most `inflight` at a time)."""
    client = subprocess.Popen(
        [sys.executable, str(HERE / "held_connections.py"), "client", "--target", f"127.0.0.1:{port}",
         "--src", "127.0.0.1", "--count", str(count), "--hello-hex", hello.hex(), "--timeout", "60",
         "--inflight", str(inflight), *(["--churn"] if churn else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = await asyncio.wait_for(loop.run_in_executor(None, client.stdout.readline), 90)
    report = json.loads(line)
    if report.get("opened") != count:
        raise RuntimeError(f"only {report.get('opened')} of {count} connections opened: {report}")
    return client


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--relay", choices=["userspace", "sockmap", "tcp_splice"], default="sockmap")
    p.add_argument("--churn", action="store_true", help="with --cprofile: each connection closes "
                   "as soon as it is open (the whole life of a connection, as the newconn phase)")
    p.add_argument("--netns", action="store_true", help="run in a network namespace of its own "
                   "(needed by tcp_splice, which attaches tc programs to lo)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--max-seconds", type=int, default=300)
    p.add_argument("--cprofile", action="store_true",
                   help="profile CPU (cProfile, self time per connection) instead of memory")
    args = p.parse_args()
    if args.netns:
        return _held().run_in_netns(sys.argv[1:], script=__file__)
    if args.relay == "tcp_splice" and _held()._in_root_netns():
        raise SystemExit("tcp_splice attaches tc programs to lo: run with --netns")
    result = asyncio.run(profile(args.n, args.relay, args.top, args.max_seconds, args.cprofile,
                                 args.churn))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
