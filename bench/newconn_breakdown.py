#!/usr/bin/env python3
"""Where a new tcp_splice connection's time goes, unprofiled: wall time of the worker's steps.

    .venv/bin/python bench/newconn_breakdown.py -n 3000        (re-runs itself in a netns)

One in-process worker (the real Worker, ProxyApp and kernel data path, tcp_splice on the
namespace's lo), N connections opened and closed by bench/held_connections.py's client
(`--churn`, 50 at a time). The steps are wrapped with perf_counter_ns (not cProfile: its
per-call cost distorts the many small calls) and reported in us per connection; a step's
figure includes the steps it calls. The first line is the process's CPU per connection. Wall
time includes being descheduled (the client and the backend share the 2 CPUs): compare steps
within one run, on a quiet machine.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_spent: dict[str, list[int]] = {}     # step -> [ns, calls]
_timing = [False]


def _held():
    spec = importlib.util.spec_from_file_location("held_connections", HERE / "held_connections.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _time_calls(owner, name: str) -> None:
    """Replace owner.name by a wrapper that adds its wall time to _spent while _timing."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if not _timing[0]:
            return inner(*args, **kwargs)
        start = time.perf_counter_ns()
        try:
            return inner(*args, **kwargs)
        finally:
            entry = _spent.setdefault(name, [0, 0])
            entry[0] += time.perf_counter_ns() - start
            entry[1] += 1

    setattr(owner, name, wrapper)


async def breakdown(n: int, steps: bool = True) -> None:
    from sniproxy.config import parse_config
    from sniproxy.ebpf import tcpsplice as ets
    from sniproxy.ebpf.sockstate import SocketStateReader
    from sniproxy.proxy import clienthello
    from sniproxy.proxy import server
    from sniproxy.proxy.app import ProxyApp
    from sniproxy.relay import tcpsplice as rts
    from sniproxy.relay.datapath import KernelDataPath
    from sniproxy.proxy.worker_process import tune_gc
    from sniproxy.telemetry import metrics as metrics_mod

    for owner, names in ((server.Worker, ("_on_acceptable", "_connect", "_connected", "_step")),
                         (rts.WorkerSplice, ("try_relay", "_on_events", "_read_sides",
                                             "_check_pair", "_oif", "_try_relay_compiled",
                                             "_try_relay_python")),
                         (rts, ("_read_queued",)),
                         (SocketStateReader, ("read",)),
                         (ets, ("repair_snapshot", "tcp_facts", "flow_entries", "close_silently",
                                "facts_of", "snapshot_of", "pack_key")),
                         (ets.TcpSpliceDataPath, ("insert", "claim_slot", "update")),
                         (clienthello, ("parse_client_hello",))):
        for name in names if steps else ():
            _time_calls(owner, name)
    held = _held()
    hello = held.capture_hello("p.held.test")
    with tempfile.TemporaryDirectory(prefix="newconn-") as tmp:
        backends = held.start_backends(held.build_backend(Path(tmp)), [len(hello)], 300)
        kdp = kernel = None
        try:
            lsock = server.create_listener("127.0.0.1", 0, backlog=4096, reuse_port=False)
            port = lsock.getsockname()[1]
            config = parse_config({
                "listen_addr": f"127.0.0.1:{port}", "metrics_addr": None, "workers": 1,
                "max_connections": 2 * n + 200,
                "routes": [{"match": "p.held.test", "backend": f"127.0.0.1:{backends.ports[0]}"}],
                "log": {"level": "warning", "access_log": False},
                "ebpf": held.RELAY_CONFIG["tcp_splice"]["ebpf"]})
            metrics_mod.enable_multiprocess(tmp)
            metrics = metrics_mod.ProxyMetrics()
            kdp = KernelDataPath.start(config)
            kernel = kdp.worker_factory()(metrics)
            worker = server.Worker(ProxyApp(config, metrics, kernel_relay=kernel), [lsock])
            worker.start()
            tune_gc()                                     # as worker_main does
            await _churn(held, port, hello, 200)          # warm-up: lazy imports, first epoll
            _timing[0] = True
            t0 = os.times()
            await _churn(held, port, hello, n)
            t1 = os.times()
            user, system = t1.user - t0.user, t1.system - t0.system
            cpu = user + system
            _timing[0] = False
        finally:
            if kernel is not None and kernel.tcp_splice is not None:
                kernel.tcp_splice.close()
            if kdp is not None:
                kdp.close()
            backends.stop()
    print(f"process CPU per connection: {cpu / n * 1e6:.1f} us (user {user / n * 1e6:.1f}, "
          f"system {system / n * 1e6:.1f})")
    for name, (ns, calls) in sorted(_spent.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:20s} {ns / n / 1000:7.1f} us/conn   {calls / n:5.2f} calls/conn")


async def _churn(held, port: int, hello: bytes, count: int) -> None:
    loop = asyncio.get_running_loop()
    client = subprocess.Popen(
        [sys.executable, str(HERE / "held_connections.py"), "client", "--target", f"127.0.0.1:{port}",
         "--src", "127.0.0.1", "--count", str(count), "--hello-hex", hello.hex(), "--churn",
         "--inflight", "50", "--timeout", "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        await asyncio.wait_for(loop.run_in_executor(None, client.stdout.readline), 90)
        # The last connections' ends (FIN both ways, the kernel's end event) still arrive.
        await asyncio.sleep(0.5)
    finally:
        client.stdin.close()
        client.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=3000)
    p.add_argument("--no-steps", action="store_true",
                   help="wrap nothing: the process CPU line alone, without the wrappers' cost")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.in_netns:
        return _held().run_in_netns([*sys.argv[1:], "--in-netns"], script=__file__)
    asyncio.run(breakdown(args.n, steps=not args.no_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
