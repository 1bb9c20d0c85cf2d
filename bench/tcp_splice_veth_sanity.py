#!/usr/bin/env python3
# One-off sanity comparison (not the project benchmark, see ../shared/bench): run as root,
#   .venv/bin/python bench/tcp_splice_veth_sanity.py {direct,tcp_splice,sockmap,userspace}
"""Three netns (client, proxy, backend) over veth: direct (routed through the proxy ns) vs
through sni-proxy with a relay kind. Bulk 1 GiB up, RR 1-byte ping-pong 3 s."""
import json, os, socket, subprocess, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tests.integration.netns import Topology, run_in, nsexec
from tests.integration.harness import client_hello_bytes
from bench.splice_backend import start_hello_backend
HELLO = client_hello_bytes("data.test")
BULK = 1 << 30
mode = sys.argv[1]
t = Topology.three(f"bv{os.getpid() % 1000}")
try:
    nsexec(t.proxy, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    run_in(t.backend, start_hello_backend, t.backend_ip, 9443, HELLO)
    target = (t.backend_ip, 9443)
    p = None
    if mode != "direct":
        cfg = {"listen_addr": f"{t.proxy_client_ip}:8443", "metrics_addr": "127.0.0.1:9100", "workers": 1,
               "default_backend": f"{t.backend_ip}:9443", "log": {"access_log": False},
               "ebpf": {"enabled": mode != "userspace", "dns_cache": {"pin_path": None},
                        "tcp_splice": {"enabled": mode == "tcp_splice", "linger_s": 1.0}}}
        open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "tcp_splice_bench.json"), "w").write(json.dumps(cfg))
        p = subprocess.Popen(["ip", "netns", "exec", t.proxy, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "sni-proxy"),
                              "--config", os.path.join(os.environ.get("TMPDIR", "/tmp"), "tcp_splice_bench.json")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(2.0)
        target = (t.proxy_client_ip, 8443)
    def cpu():
        v = list(map(int, open("/proc/stat").readline().split()[1:])); return sum(v) - v[3] - v[4]
    def client():
        s = socket.create_connection(target); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO); assert s.recv(1) == b"k"; s.sendall(b"B")
        data = memoryview(bytearray(1 << 20)); c0 = cpu(); t0 = time.perf_counter(); sent = 0
        while sent < BULK: s.sendall(data); sent += len(data)
        s.shutdown(socket.SHUT_WR); assert s.recv(4) == b"done"
        t1 = time.perf_counter(); c1 = cpu(); s.close()
        out = {"MB/s": round(BULK / (t1 - t0) / 1e6), "mach_cpu_s_per_GB": round((c1 - c0) / 100 / (BULK / 1e9), 3)}
        s = socket.create_connection(target); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO); assert s.recv(1) == b"k"; s.sendall(b"R")
        n = 0; lat = []; c0 = cpu(); t0 = time.perf_counter()
        while time.perf_counter() - t0 < 3:
            a = time.perf_counter(); s.sendall(b"x"); s.recv(1); lat.append(time.perf_counter() - a); n += 1
        t1 = time.perf_counter(); c1 = cpu(); s.close(); lat.sort()
        out.update({"rr/s": round(n / (t1 - t0)), "p99_us": round(lat[int(len(lat) * .99)] * 1e6, 1),
                    "mach_cpu_s_per_10k": round((c1 - c0) / 100 / (n / 1e4), 3)})
        return out
    print(json.dumps({"mode": mode, **run_in(t.client, client)}))
    if p is not None:
        os.killpg(p.pid, 15); p.wait(10)
finally:
    t.close()
