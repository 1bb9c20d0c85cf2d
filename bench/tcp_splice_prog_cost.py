#!/usr/bin/env python3
"""Per-packet cost of the tc splice programs, from the kernel's own BPF run-time statistics.

    .venv/bin/python bench/tcp_splice_prog_cost.py [ROUND_TRIPS]      (root, from the repo root)

In a network namespace of its own (client, proxy and backend on its lo): one spliced flow
ping-pongs 1 byte ROUND_TRIPS times (default 20,000), then one spliced flow carries 256 MiB.
`kernel.bpf_stats_enabled` is on for the run (off again after): bpftool's run_time_ns /
run_cnt of sni_proxy_tse (egress: splices each packet in place on lo) and sni_proxy_tsi
(ingress) give nanoseconds per invocation and the invocation count. Prints one JSON line:
{"rr": {prog: [ns per run, runs]}, "bulk": {...}}. Bounded: the proxy, the namespace and the
sysctl are undone on exit.
"""
import json, os, socket, subprocess, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.integration.netns import Topology, run_in
from tests.integration.harness import client_hello_bytes
from bench.splice_backend import start_hello_backend
HELLO = client_hello_bytes("data.test")
RR = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
BULK = 256 << 20
CONFIG = f"/tmp/tcp_splice_prog_cost.{os.getpid()}.json"

def stats():
    out = {}
    for p in json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout):
        if p.get("name") in ("sni_proxy_tse", "sni_proxy_tsi"):
            o = out.setdefault(p["name"], [0, 0])
            o[0] += p.get("run_time_ns", 0); o[1] += p.get("run_cnt", 0)
    return out

t = Topology.loopback(f"p{os.getpid() % 1000}")
p = None
subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
try:
    run_in(t.backend, start_hello_backend, t.backend_ip, 9443, HELLO)
    cfg = {"listen_addr": f"{t.proxy_client_ip}:8443", "metrics_addr": None, "workers": 1,
           "default_backend": f"{t.backend_ip}:9443", "log": {"access_log": False},
           "ebpf": {"enabled": True, "dns_cache": {"pin_path": None}, "tcp_splice": {"enabled": True, "linger_s": 1.0}}}
    open(CONFIG, "w").write(json.dumps(cfg))
    p = subprocess.Popen(["ip", "netns", "exec", t.proxy, ".venv/bin/sni-proxy", "--config", CONFIG],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    def client():
        for _ in range(100):
            try:
                socket.create_connection((t.proxy_client_ip, 8443), timeout=1).close(); break
            except OSError: time.sleep(0.1)
        s = socket.create_connection((t.proxy_client_ip, 8443)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO); assert s.recv(1) == b"k"; s.sendall(b"R")
        for _ in range(200): s.sendall(b"x"); s.recv(1)      # engage
        a = stats()
        for _ in range(RR): s.sendall(b"x"); s.recv(1)
        b = stats(); s.close()
        res = {"rr": {k: (round((b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1])), b[k][1] - a[k][1]) for k in b}}
        s = socket.create_connection((t.proxy_client_ip, 8443)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO); assert s.recv(1) == b"k"; s.sendall(b"B")
        data = memoryview(bytearray(1 << 20)); sent = 0
        s.sendall(data); sent += len(data)
        a = stats()
        while sent < BULK: s.sendall(data); sent += len(data)
        s.shutdown(socket.SHUT_WR); assert s.recv(4) == b"done"
        b = stats(); s.close()
        res["bulk"] = {k: (round((b[k][0] - a[k][0]) / max(1, b[k][1] - a[k][1])), b[k][1] - a[k][1]) for k in b}
        return res
    print(json.dumps(run_in(t.client, client)))
finally:
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"])
    if p is not None:
        os.killpg(p.pid, 15); p.wait(10)
    t.close()
    if os.path.exists(CONFIG):
        os.unlink(CONFIG)
