#!/usr/bin/env python3
"""Held connections: how many idle TLS connections each proxy holds, and what each one costs.

    .venv/bin/python bench/held_connections.py -n 1000 10000 \
        --peers direct nginx haproxy sniproxy:userspace sniproxy:sockmap --out held.jsonl

For each N and each peer, in one run:
  1. backends: `held_backend.c` (compiled here with gcc), one epoll process per client process,
     each on its own port and SNI name; it answers 'A' once the whole ClientHello arrived and
     'P' for every later byte;
  2. the peer under test routes name i to backend i (sni-proxy, nginx stream + ssl_preread,
     HAProxy mode tcp + req.ssl_sni; `direct` = no proxy, the baseline for kernel memory);
  3. client processes (<= --per-client connections each, its own 127.x.y.z source address so
     that neither the 20,000 fd limit nor the ~28,000 ephemeral ports of one address binds)
     open their share: connect, send a real ClientHello (captured once from OpenSSL through
     Python's ssl module and replayed), wait for the backend's 'A'; at most --inflight
     handshakes at a time per client, all bounded by --open-timeout;
  4. with all N held and idle: proxy RSS and PSS summed over its processes
     (/proc/PID/smaps_rollup), its fds, proxy CPU spent opening them, /proc/meminfo Slab,
     the active slab bytes of /proc/slabinfo, /proc/net/sockstat, `ss -tm` of the proxy's sockets;
  5. every connection sends one byte and must get one back through the proxy ('p' -> 'P');
  6. clients close, the peer and the backends stop (SIGTERM to their process group, then SIGKILL).

Per connection: user = (PSS held - PSS idle) / N; kernel = (slab growth - the same growth in
the `direct` run of the same N) / N, i.e. what the proxy's own sockets, files, epoll entries
and pipes add; skmem = the proxy's socket buffers from `ss -tm`. Results: one JSON line per
(peer, N) in --out, and a table on stdout. Everything is bounded: every wait has a deadline,
the backends kill themselves after --max-seconds, clients exit when the driver goes away.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND_SRC = Path(__file__).with_name("held_backend.c")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# A client process holds at most this many connections: the hard fd limit here is 20,000 per
# process, and one source address has ~28,000 ephemeral ports (32768-60999).
PER_CLIENT = 12_000
# The backends and the proxies get this many fds of headroom below the hard limit.
FD_HEADROOM = 1_000
PEER_NAMES = ("direct", "nginx", "haproxy", "sniproxy:userspace", "sniproxy:sockmap",
              "sniproxy:tcp_splice")


# ============================================================================ ClientHello
def capture_hello(server_name: str) -> bytes:
    """The first flight OpenSSL sends for this SNI (Python's ssl over memory BIOs: no network)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if not hello or hello[0] != 0x16:
        raise RuntimeError("OpenSSL produced no ClientHello")
    return hello


# ============================================================================ client process
def client_main(argv: list[str]) -> int:
    """One client process: open its share, report, then obey 'check' / 'close' on stdin."""
    p = argparse.ArgumentParser(prog="held_connections.py client")
    p.add_argument("--target", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--hello-hex", required=True)
    p.add_argument("--inflight", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--churn", action="store_true",
                   help="close each connection as soon as the backend answered (new-connection "
                        "cost, as wrk's Connection: close; nothing is held)")
    args = p.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    hello = bytes.fromhex(args.hello_hex)
    held: list[socket.socket] = []
    errors: dict[str, int] = {}
    started = time.monotonic()
    _open_all(target, args.src, args.count, hello, args.inflight, started + args.timeout, held, errors,
              churn=args.churn)
    _report({"opened": len(held), "failed": sum(errors.values()), "errors": errors,
             "open_s": round(time.monotonic() - started, 3)})
    for line in sys.stdin:        # EOF (the driver is gone) ends the process too
        cmd = line.strip()
        if cmd == "check":
            ok, bad = _check_all(held, time.monotonic() + args.timeout)
            _report({"check_ok": ok, "check_bad": bad})
        elif cmd == "close":
            break
    for s in held:
        s.close()
    _report({"closed": len(held)})
    return 0


def _report(data: dict) -> None:
    try:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        pass            # the driver stopped listening: nothing left to tell it


def _fail(errors: dict, why: str) -> None:
    errors[why] = errors.get(why, 0) + 1


def _open_all(target, src, count, hello, inflight, deadline, held, errors, churn=False) -> None:
    ep = select.epoll()
    pending: dict[int, list] = {}         # fd -> [socket, state]; state 0 connecting, 1 hello sent
    to_start = count
    try:
        while (to_start or pending) and time.monotonic() < deadline:
            while to_start and len(pending) < inflight:
                to_start -= 1
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                try:
                    s.bind((src, 0))
                    err = s.connect_ex(target)
                except OSError as exc:
                    err = exc.errno
                if err not in (0, 115):       # EINPROGRESS
                    _fail(errors, f"connect:{os.strerror(err)}")
                    s.close()
                    continue
                ep.register(s.fileno(), select.EPOLLOUT)
                pending[s.fileno()] = [s, 0]
            for fd, _ev in ep.poll(0.5, 1024):
                entry = pending[fd]
                s = entry[0]
                try:
                    if entry[1] == 0:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, os.strerror(err))
                        if s.send(hello) != len(hello):
                            raise OSError(0, "short send of the ClientHello")
                        entry[1] = 1
                        ep.modify(fd, select.EPOLLIN)
                        continue
                    data = s.recv(16)
                    if data != b"A":
                        raise OSError(0, "closed before the backend answered" if not data
                                      else f"unexpected answer {data[:8]!r}")
                except OSError as exc:
                    _fail(errors, f"open:{exc.strerror}")
                    ep.unregister(fd)
                    del pending[fd]
                    s.close()
                    continue
                ep.unregister(fd)
                del pending[fd]
                held.append(s)
                if churn:
                    s.close()
        if to_start or pending:
            errors["open:timeout"] = to_start + len(pending)
        for s, _ in pending.values():
            s.close()
    finally:
        ep.close()


def _check_all(held: list[socket.socket], deadline: float) -> tuple[int, int]:
    """One byte each way on every held connection; returns (ok, bad)."""
    ep = select.epoll()
    waiting: dict[int, socket.socket] = {}
    bad = 0
    try:
        for s in held:
            try:
                s.send(b"p")
            except OSError:
                bad += 1
                continue
            ep.register(s.fileno(), select.EPOLLIN)
            waiting[s.fileno()] = s
        ok = 0
        while waiting and time.monotonic() < deadline:
            for fd, _ev in ep.poll(0.5, 1024):
                s = waiting.pop(fd)
                ep.unregister(fd)
                try:
                    data = s.recv(16)
                except OSError:
                    data = b""
                if data == b"P":
                    ok += 1
                else:
                    bad += 1
        return ok, bad + len(waiting)
    finally:
        ep.close()


# ============================================================================ measurement
def _proc_field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def session_pids(sids: list[int]) -> list[int]:
    """Every process whose session is one of `sids` (each peer starts in a session of its own)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) in sids:        # field 6: session id
            out.append(int(entry))
    return out


def process_memory(pids: list[int]) -> dict:
    rss = pss = fds = cpu_ticks = 0
    for pid in pids:
        try:
            rss += _proc_field(pid, "Rss")
            pss += _proc_field(pid, "Pss")
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu_ticks += int(fields[11]) + int(fields[12])    # utime + stime
        except (OSError, ValueError):
            continue
    return {"processes": len(pids), "rss": rss, "pss": pss, "fds": fds,
            "cpu_s": cpu_ticks / os.sysconf("SC_CLK_TCK")}


def settled_memory(sids: list[int], timeout: float = 15) -> dict:
    """process_memory once it stops changing: a proxy listens before its workers finished
    starting (they fork and build their state after the port is open)."""
    deadline = time.monotonic() + timeout
    last = process_memory(session_pids(sids))
    while time.monotonic() < deadline:
        time.sleep(0.5)          # sampling interval of a measurement, not a synchronisation
        now = process_memory(session_pids(sids))
        if now["processes"] == last["processes"] and abs(now["pss"] - last["pss"]) <= 0.01 * max(last["pss"], 1):
            return now
        last = now
    return last


def kernel_memory() -> dict:
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            meminfo[key] = int(rest.split()[0]) * 1024
    active = 0
    with open("/proc/slabinfo") as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            parts = line.split()
            active += int(parts[1]) * int(parts[3])     # active_objs * objsize
    tcp = {}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                tcp = {parts[i]: int(parts[i + 1]) for i in range(0, len(parts), 2)}
    return {"slab": meminfo.get("Slab", 0), "slab_active": active,
            "tcp_inuse": tcp.get("inuse", 0), "tcp_mem": tcp.get("mem", 0) * 4096}


def ss_memory(ports_local: list[int], ports_remote: list[int]) -> dict:
    """Sum of `ss -tm` skmem (r + w + f + o + bl) over established sockets matching the ports."""
    terms = [f"sport = :{p}" for p in ports_local] + [f"dport = :{p}" for p in ports_remote]
    if not terms:
        return {"sockets": 0, "skmem": 0}
    out = subprocess.run(["ss", "-tmHn", "state", "established", "( " + " or ".join(terms) + " )"],
                         capture_output=True, text=True, timeout=120).stdout
    sockets = total = 0
    for line in out.splitlines():
        i = line.find("skmem:(")
        if i < 0:
            continue
        sockets += 1
        for item in line[i + 7:line.index(")", i)].split(","):
            key = item.rstrip("0123456789")
            if key in ("r", "w", "f", "o", "bl"):
                total += int(item[len(key):])
    return {"sockets": sockets, "skmem": total}


# ============================================================================ processes
def build_backend(workdir: Path) -> Path:
    exe = workdir / "held_backend"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(BACKEND_SRC)], check=True, timeout=120)
    return exe


@dataclass
class Backends:
    procs: list[subprocess.Popen]
    ports: list[int]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def start_backends(exe: Path, hello_sizes: list[int], max_seconds: int) -> Backends:
    procs, ports = [], []
    try:
        for size in hello_sizes:
            p = subprocess.Popen([str(exe), "0", str(size), str(max_seconds)], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True)
            procs.append(p)
            line = _readline(p.stdout, 10)
            if not line.startswith("port "):
                raise RuntimeError(f"backend did not start: {line!r}")
            ports.append(int(line.split()[1]))
    except BaseException:
        Backends(procs, ports).stop()
        raise
    return Backends(procs, ports)


def _readline(stream, timeout: float) -> str:
    """One line from a child's pipe, or '' after `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Peer:
    name: str
    listen_port: int | None                  # None: direct
    procs: list[subprocess.Popen] = field(default_factory=list)
    note: str = ""

    @property
    def sids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)


def _fd_limit() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def start_peer(name: str, routes: dict[str, int], n: int, workdir: Path, args) -> Peer:
    if name == "direct":
        return Peer(name, None, note="no proxy: clients connect to the backends")
    port = free_port()
    d = workdir / name.replace(":", "-")
    d.mkdir(parents=True, exist_ok=True)
    per_process = _fd_limit() - FD_HEADROOM
    log = open(d / "stderr.log", "w")
    if name.startswith("sniproxy:"):
        kind = name.split(":", 1)[1]
        config = sniproxy_config(kind, port, routes, n, args.sni_workers)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        exe = ROOT / ".venv" / "bin" / "sni-proxy"
        procs = [subprocess.Popen([str(exe), "--config", str(d / "config.json")], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)]
        note = f"sni-proxy relay {kind}, workers {config['workers']}"
    elif name == "nginx":
        workers = max(args.peer_workers, -(-2 * n // per_process))
        maplines = "\n".join(f"        {sni} 127.0.0.1:{p};" for sni, p in routes.items())
        conf = f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {workers};
worker_rlimit_nofile {_fd_limit()};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {per_process}; multi_accept on; }}
stream {{
    map $ssl_preread_server_name $held_upstream {{
        hostnames;
{maplines}
        default 127.0.0.1:9;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        ssl_preread on;
        proxy_pass $held_upstream;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        procs = [subprocess.Popen(["nginx", "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
                                   "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)]
        note = f"nginx {workers} workers, stream ssl_preread + map, reuseport"
    elif name == "haproxy":
        # One HAProxy process holds at most (fd limit - headroom) / 2 connections: above that,
        # several instances share the port (HAProxy binds with SO_REUSEPORT by default).
        instances = max(1, -(-2 * n // per_process))
        threads = args.peer_workers if instances == 1 else 1
        maxconn = -(-n // instances) + 500
        with open(d / "sni.map", "w") as f:
            for sni, p in routes.items():
                f.write(f"{sni} be_{p}\n")
        backends = "\n".join(f"backend be_{p}\n    server s1 127.0.0.1:{p}\n" for p in routes.values())
        conf = f"""global
    nbthread {threads}
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend sni_in
    bind 127.0.0.1:{port} backlog 4096
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend %[req.ssl_sni,lower,map({d}/sni.map,be_reject)]
{backends}
backend be_reject
    tcp-request content reject
"""
        (d / "haproxy.cfg").write_text(conf)
        procs = [subprocess.Popen(["haproxy", "-db", "-f", str(d / "haproxy.cfg")], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
                 for _ in range(instances)]
        note = f"haproxy {instances} instance(s) x nbthread {threads}, maxconn {maxconn} each"
    else:
        raise SystemExit(f"unknown peer {name!r}: expected one of {', '.join(PEER_NAMES)}")
    peer = Peer(name, port, procs, note)
    try:
        _wait_listening(port, procs, 30)
    except BaseException:
        peer.stop()
        raise
    return peer


# sni-proxy's relay kinds -> what the config asks for (a kind the build lacks fails at start
# with the config error, which the driver prints).
RELAY_CONFIG = {
    "userspace": {"relay": {"mode": "auto"}, "ebpf": {"enabled": False}},
    "copy": {"relay": {"mode": "copy"}, "ebpf": {"enabled": False}},
    "sockmap": {"ebpf": {"enabled": True, "sockmap": {"enabled": True},
                         "tcp_splice": {"enabled": False}, "dns_cache": {"enabled": False}}},
    "tcp_splice": {"ebpf": {"enabled": True, "sockmap": {"enabled": False},
                            "tcp_splice": {"enabled": True}, "dns_cache": {"enabled": False}}},
}


def sniproxy_config(kind: str, port: int, routes: dict[str, int], n: int, workers) -> dict:
    if kind not in RELAY_CONFIG:
        raise SystemExit(f"unknown sni-proxy relay kind {kind!r}: expected one of "
                         f"{', '.join(RELAY_CONFIG)}")
    config = {
        "listen_addr": f"127.0.0.1:{port}",
        "metrics_addr": None,
        "workers": workers if workers == "auto" else int(workers),
        # Room for the N held connections plus the uneven SO_REUSEPORT spread over workers.
        "max_connections": n + n // 10 + 100,
        "routes": [{"match": sni, "backend": f"127.0.0.1:{p}", "allow_private": True}
                   for sni, p in routes.items()],
        "timeouts": {"idle_s": 3600.0, "shutdown_grace_s": 1.0},
        "log": {"level": "warning", "access_log": False},
    }
    for key, value in RELAY_CONFIG[kind].items():
        config[key] = value
    return config


def _wait_listening(port: int, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"the peer exited with status {p.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)     # polling a port that is not open yet: nothing to wait on
    raise RuntimeError(f"the peer did not listen on 127.0.0.1:{port} within {timeout}s")


# ============================================================================ one run
@dataclass
class Clients:
    procs: list[subprocess.Popen]

    def command(self, cmd: str) -> None:
        for p in self.procs:
            try:
                p.stdin.write(cmd + "\n")
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def collect(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        out = []
        for p in self.procs:
            line = _readline(p.stdout, max(0.1, deadline - time.monotonic()))
            out.append(json.loads(line) if line else {"error": "no answer"})
        return out

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def run_one(peer_name: str, peer_index: int, n: int, exe: Path, workdir: Path, args) -> dict:
    nclients = max(1, -(-n // args.per_client))
    shares = [n // nclients + (1 if i < n % nclients else 0) for i in range(nclients)]
    names = [f"h{i}.held.test" for i in range(nclients)]
    hellos = [capture_hello(name) for name in names]
    backends = start_backends(exe, [len(h) for h in hellos], args.max_seconds)
    peer = None
    clients = None
    result: dict = {"peer": peer_name, "n": n, "clients": nclients}
    try:
        routes = dict(zip(names, backends.ports))
        peer = start_peer(peer_name, routes, n, workdir, args)
        result["note"] = peer.note
        idle = settled_memory(peer.sids)
        k0 = kernel_memory()
        procs = []
        t0 = time.monotonic()
        for i, (share, hello) in enumerate(zip(shares, hellos)):
            target = f"127.0.0.1:{peer.listen_port or backends.ports[i]}"
            # A fresh source address per (peer, client): no TIME_WAIT of an earlier run collides.
            src = f"127.{20 + peer_index}.{n % 250}.{i + 1}"
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "client", "--target", target, "--src", src,
                 "--count", str(share), "--hello-hex", hello.hex(), "--inflight", str(args.inflight),
                 "--timeout", str(args.open_timeout)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        clients = Clients(procs)
        opened = clients.collect(args.open_timeout + 30)
        open_s = time.monotonic() - t0
        pids = session_pids(peer.sids)
        held = process_memory(pids)
        k1 = kernel_memory()
        if peer.listen_port is None:
            ss = ss_memory(backends.ports, backends.ports)
        else:
            ss = ss_memory([peer.listen_port], backends.ports)
        clients.command("check")
        checked = clients.collect(args.open_timeout + 30)
        errors: dict[str, int] = {}
        for o in opened:
            for k, v in o.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
        result.update({
            "opened": sum(o.get("opened", 0) for o in opened),
            "failed": sum(o.get("failed", 0) for o in opened),
            "errors": errors,
            "open_s": round(open_s, 3),
            "check_ok": sum(c.get("check_ok", 0) for c in checked),
            "check_bad": sum(c.get("check_bad", 0) for c in checked),
            "proxy_processes": held["processes"],
            "proxy_rss_idle": idle["rss"], "proxy_pss_idle": idle["pss"],
            "proxy_rss": held["rss"], "proxy_pss": held["pss"], "proxy_fds": held["fds"],
            "proxy_cpu_open_s": round(held["cpu_s"] - idle["cpu_s"], 3),
            "slab_growth": k1["slab"] - k0["slab"],
            "slab_active_growth": k1["slab_active"] - k0["slab_active"],
            "tcp_inuse": k1["tcp_inuse"], "tcp_mem_growth": k1["tcp_mem"] - k0["tcp_mem"],
            "ss_sockets": ss["sockets"], "ss_skmem": ss["skmem"],
            "load1": os.getloadavg()[0],
        })
        return result
    finally:
        if clients is not None:
            clients.command("close")
            clients.stop()
        if peer is not None:
            peer.stop()
        backends.stop()


def per_connection(results: list[dict]) -> None:
    """Bytes per connection for each row, against the `direct` row of the same N for the kernel."""
    direct = {r["n"]: r for r in results if r["peer"] == "direct" and "opened" in r}
    for r in results:
        if "opened" not in r or not r["opened"]:
            continue
        n = r["opened"]
        r["user_bytes_per_conn"] = round((r["proxy_pss"] - r["proxy_pss_idle"]) / n)
        r["skmem_bytes_per_conn"] = round(r["ss_skmem"] / n)
        base = direct.get(r["n"])
        if base is not None and r["peer"] != "direct":
            r["kernel_bytes_per_conn"] = round(
                (r["slab_active_growth"] - base["slab_active_growth"]) / n)
            r["total_bytes_per_conn"] = (r["user_bytes_per_conn"] + r["kernel_bytes_per_conn"]
                                         + r["skmem_bytes_per_conn"])


def print_table(results: list[dict]) -> None:
    mib = 1 << 20
    cols = ("peer", "n", "opened", "ok", "open s", "cpu s", "procs", "PSS idle", "PSS held",
            "fds", "slab +MiB", "user B/c", "kern B/c", "total B/c")
    print(" | ".join(cols))
    for r in results:
        if "opened" not in r:
            print(f"{r['peer']} | {r['n']} | error: {r.get('error')}")
            continue
        print(" | ".join(str(x) for x in (
            r["peer"], r["n"], r["opened"], r["check_ok"], r["open_s"], r["proxy_cpu_open_s"],
            r["proxy_processes"], f"{r['proxy_pss_idle'] / mib:.1f}", f"{r['proxy_pss'] / mib:.1f}",
            r["proxy_fds"], f"{r['slab_active_growth'] / mib:.1f}", r.get("user_bytes_per_conn", "-"),
            r.get("kernel_bytes_per_conn", "-"), r.get("total_bytes_per_conn", "-"))))


def _in_root_netns() -> bool:
    try:
        return os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net")
    except OSError:
        # /proc/1 is not readable in some containers: a namespace with nothing but lo
        # (what run_in_netns makes) is not the root one.
        return [name for _, name in socket.if_nameindex()] != ["lo"]


def run_in_netns(argv: list[str], script: str = __file__) -> int:
    """Re-run `script` (this driver by default; without --netns) inside a fresh namespace with
    only lo, then delete it."""
    name = f"held-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        inner = [a for a in argv if a != "--netns"]
        # `ip netns exec` mounts a fresh /sys, hiding the host's cgroup2 mount that the
        # proxy's cgroup BPF program (tcp_splice's socket reader) attaches through: mount it
        # again in that private mount namespace, as the host has it.
        return subprocess.run(["ip", "netns", "exec", name, "sh", "-c",
                               'mount -t cgroup2 none /sys/fs/cgroup; exec "$@"', "sh",
                               sys.executable, script, *inner], timeout=None).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=30)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "client":
        return client_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, nargs="+", default=[1000, 10000], help="connections to hold")
    p.add_argument("--peers", nargs="+", default=["direct", "nginx", "haproxy", "sniproxy:userspace",
                                                  "sniproxy:sockmap"],
                   help=f"from {', '.join(PEER_NAMES)}; put direct first (the kernel baseline)")
    p.add_argument("--sni-workers", default="auto", help='sni-proxy "workers": "auto" or a number')
    p.add_argument("--peer-workers", type=int, default=2, help="nginx workers / HAProxy threads")
    p.add_argument("--per-client", type=int, default=PER_CLIENT, help="connections per client process")
    p.add_argument("--inflight", type=int, default=256, help="handshakes in flight per client")
    p.add_argument("--open-timeout", type=float, default=300, help="bound on opening (and checking)")
    p.add_argument("--max-seconds", type=int, default=1800, help="backends exit after this long")
    p.add_argument("--out", help="append one JSON line per run to this file")
    p.add_argument("--netns", action="store_true",
                   help="run everything in a network namespace of its own (created and deleted "
                        "here); needed by sniproxy:tcp_splice, which attaches tc programs to lo")
    args = p.parse_args(argv)
    if args.netns:
        return run_in_netns(argv)
    if "sniproxy:tcp_splice" in args.peers and _in_root_netns():
        raise SystemExit("sniproxy:tcp_splice attaches tc programs to every interface, lo "
                         "included: run it with --netns (never on the root namespace's lo)")
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build the backend (apt-get install gcc)")
    if any(peer.startswith("sniproxy:") for peer in args.peers):
        # Bytecode as an installed package has it (pip compiles at install): without it (e.g.
        # PYTHONDONTWRITEBYTECODE=1 with the editable install) every process of the proxy also
        # holds what the compiler allocated, ~2-3 MiB of PSS that no deployment pays.
        import compileall
        import sniproxy
        compileall.compile_dir(str(Path(sniproxy.__file__).parent), quiet=1)
    results = []
    with tempfile.TemporaryDirectory(prefix="held-") as tmp:
        workdir = Path(tmp)
        exe = build_backend(workdir)
        for n in args.n:
            for index, peer in enumerate(args.peers):
                print(f"# {peer} N={n} ...", file=sys.stderr, flush=True)
                try:
                    r = run_one(peer, index, n, exe, workdir, args)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    r = {"peer": peer, "n": n, "error": str(exc)}
                    log = workdir / peer.replace(":", "-") / "stderr.log"
                    if log.exists():
                        r["stderr"] = log.read_text()[-2000:]
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    per_connection(results)
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    print_table(results)
    return 0 if all(r.get("opened") == r["n"] and r.get("check_ok") == r["n"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
