#!/usr/bin/env python3
"""Syscalls and CPU per new connection of one sni-proxy worker: `strace -c` while N connections open.

    .venv/bin/python bench/held_syscalls.py -n 2000 --relay sockmap     (or userspace)
    .venv/bin/python bench/held_syscalls.py -n 2000 --relay tcp_splice --netns

One worker (workers 1), the held-connection backend and client of bench/held_connections.py;
strace attaches to the worker only for the open phase (connect, ClientHello, route, connect to
the backend, hand-over to the relay, the backend's one-byte answer). Prints strace's summary,
the calls per connection, and the worker's CPU seconds per 10k connections without strace
(a second, untraced run: strace itself slows every syscall down). `tcp_splice` attaches tc
programs to every interface, so it runs with --netns (a namespace of its own, only lo).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _held():
    spec = importlib.util.spec_from_file_location("held_connections", HERE / "held_connections.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def worker_cpu(pid: int, part: str = "both") -> float:
    """utime + stime (or only "user" / "sys") of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    ticks = {"user": user, "sys": system}.get(part, user + system)
    return ticks / os.sysconf("SC_CLK_TCK")


def one_run(held, exe: Path, workdir: Path, n: int, relay: str, trace: bool,
            churn: bool = False) -> dict:
    hello = held.capture_hello("s.held.test")
    backends = held.start_backends(exe, [len(hello)], 300)
    args = argparse.Namespace(sni_workers=1, peer_workers=1)
    peer = None
    strace = None
    client = None
    try:
        peer = held.start_peer(f"sniproxy:{relay}", {"s.held.test": backends.ports[0]}, n, workdir, args)
        held.settled_memory(peer.sids)
        workers = [p for p in held.session_pids(peer.sids) if p != peer.procs[0].pid]
        (worker,) = workers
        out = workdir / "strace.txt"
        if trace:
            strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(worker)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1)         # strace attaches asynchronously and says nothing when done
        cpu0, user0 = worker_cpu(worker), worker_cpu(worker, "user")
        client = subprocess.Popen(
            [sys.executable, str(HERE / "held_connections.py"), "client", "--target",
             f"127.0.0.1:{peer.listen_port}", "--src", "127.0.0.1", "--count", str(n),
             "--hello-hex", hello.hex(), "--timeout", "120",
             *(["--churn", "--inflight", "50"] if churn else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = held._readline(client.stdout, 180)
        if churn:
            # The last connections' ends (FIN both ways, the kernel's end event) are still
            # being handled: wait until the worker's CPU stops moving (bounded).
            settle = time.monotonic() + 10
            last = -1.0
            while time.monotonic() < settle and worker_cpu(worker) != last:
                last = worker_cpu(worker)
                time.sleep(0.3)
        cpu = worker_cpu(worker) - cpu0
        user = worker_cpu(worker, "user") - user0
        result = {"relay": relay, "n": n, "opened": line.strip(), "worker_cpu_s": round(cpu, 3),
                  "cpu_s_per_10k": round(cpu * 10000 / n, 2),
                  "user_s_per_10k": round(user * 10000 / n, 2)}
        if strace is not None:
            strace.send_signal(signal.SIGINT)
            strace.wait(30)
            text = out.read_text()
            result["strace"] = text
            total = [ln for ln in text.splitlines() if ln.strip().endswith("total")]
            if total:
                calls = int(total[0].split()[3])       # % time, seconds, usecs/call, calls
                result["syscalls_per_connection"] = round(calls / n, 1)
        return result
    finally:
        if strace is not None and strace.poll() is None:
            strace.kill()
        if client is not None:
            client.stdin.close()
            client.wait(60)
        if peer is not None:
            peer.stop()
        backends.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--relay", choices=["userspace", "sockmap", "tcp_splice"], default="sockmap")
    p.add_argument("--churn", action="store_true", help="each connection closes as soon as it "
                   "is open (its whole life, as wrk's Connection: close); default: held")
    p.add_argument("--reps", type=int, default=1, help="untraced runs (the CPU figure is their median)")
    p.add_argument("--netns", action="store_true", help="run in a network namespace of its own")
    args = p.parse_args()
    held = _held()
    if args.netns:
        return held.run_in_netns(sys.argv[1:], script=__file__)
    if args.relay == "tcp_splice" and held._in_root_netns():
        raise SystemExit("tcp_splice attaches tc programs to lo: run with --netns")
    with tempfile.TemporaryDirectory(prefix="held-sys-") as tmp:
        exe = held.build_backend(Path(tmp))
        plains = [one_run(held, exe, Path(tmp), args.n, args.relay, trace=False,
                          churn=args.churn)
                  for _ in range(args.reps)]
        traced = one_run(held, exe, Path(tmp), args.n, args.relay, trace=True, churn=args.churn)
    cpus = sorted(p["cpu_s_per_10k"] for p in plains)
    users = sorted(p["user_s_per_10k"] for p in plains)
    print(traced["strace"])
    print(f"relay {args.relay}: {traced.get('syscalls_per_connection')} syscalls per connection "
          f"(worker, open phase); worker CPU {cpus[len(cpus) // 2]} s per 10k connections "
          f"(median of {len(cpus)} untraced runs: {cpus}; user part {users[len(users) // 2]}; "
          f"{plains[-1]['opened']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
