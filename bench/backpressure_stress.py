#!/usr/bin/env python3
"""Stress the sockmap pause with the case the "other direction idle" rule leaves open.

    .venv/bin/python bench/backpressure_stress.py [--conns 20] [--down-mib 32] [--up-mib 16]
                                                  [--limit 262144] [--seed 1]

The proxy (kernel data path, `ebpf.sockmap.backpressure: true`) relays, per connection:
* down: the backend writes --down-mib as fast as it can; the client reads it with random
  stalls, so the down direction pauses often (its source, the backend socket, keeps its
  bytes while the client drains);
* up: the client writes --up-mib in bursts (256 KiB to 1 MiB) separated by 2-40 ms of
  silence, so up is often idle when a pause starts (a pause is allowed) and then gets busy
  during it: up's skbs are redirected into the paused backend socket, whose psock queue then
  mixes them with the kept ones. That mix duplicated segments in session 2 (docs/kernel-datapath.md).

Every 8-byte word of a stream is (tag << 56) | byte offset (tag 1 down, 2 up), and each
reader compares every received byte with the expected one. A bad stream is reported with the
first bad offset and what the word there says it is: a duplicate of this stream (its own tag,
an earlier offset), or bytes of the other direction (the other tag).

Prints one line per connection that was not exact, then a summary with the proxy's pause,
resume and over-limit counters. Exit status 1 if any stream was not exact. Needs root and eBPF.
"""
from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tests.integration.harness import ProxyProcess, base_config, client_hello_bytes, free_port  # noqa: E402

MiB = 1 << 20
HELLO = client_hello_bytes("stress.test")
DOWN, UP = 1, 2


def expected(tag: int, start: int, n: int) -> bytes:
    """Bytes [start, start+n) of stream `tag`: 8-byte words (tag << 56) | offset, little-endian."""
    first = start - start % 8
    words = array("Q", range((tag << 56) | first, (tag << 56) | (start + n + 7) // 8 * 8, 8))
    if sys.byteorder != "little":
        words.byteswap()
    raw = words.tobytes()
    return raw[start - first:start - first + n]


def describe(tag: int, offset: int, got: bytes) -> str:
    aligned = got[(8 - offset % 8) % 8:][:8]
    if len(aligned) < 8:
        return f"first bad byte at {offset}"
    word = struct.unpack("<Q", aligned)[0]
    wtag, woff = word >> 56, word & ((1 << 56) - 1)
    at = offset + (8 - offset % 8) % 8
    if wtag == tag:
        return f"at {at}: bytes of offset {woff} of this stream ({'duplicate' if woff < at else 'skipped ahead'}, {at - woff:+d})"
    if wtag in (DOWN, UP):
        return f"at {at}: bytes of offset {woff} of the other direction"
    return f"at {at}: unknown bytes {aligned.hex()}"


class Checker:
    def __init__(self, tag: int):
        self.tag, self.n, self.bad = tag, 0, ""

    def feed(self, chunk: bytes) -> None:
        if not self.bad and chunk != expected(self.tag, self.n, len(chunk)):
            want = expected(self.tag, self.n, len(chunk))
            i = next(k for k in range(len(chunk)) if chunk[k] != want[k])
            self.bad = describe(self.tag, self.n + i, chunk[i:i + 16])
        self.n += len(chunk)


def send_stream(sock: socket.socket, tag: int, total: int, rnd: random.Random | None) -> None:
    """The whole stream in 1 MiB writes, or in bursts with silences when `rnd` is given."""
    sent = 0
    while sent < total:
        if rnd is None:
            n = min(MiB, total - sent)
            sock.sendall(expected(tag, sent, n))
        else:
            time.sleep(rnd.uniform(0.002, 0.04))
            burst = min(rnd.choice([256 * 1024, 512 * 1024, MiB]), total - sent)
            for off in range(0, burst, 256 * 1024):
                n = min(256 * 1024, burst - off)
                sock.sendall(expected(tag, sent + off, n))
        sent += n if rnd is None else burst


def read_stream(sock: socket.socket, tag: int, rnd: random.Random | None) -> Checker:
    """Read to EOF; with `rnd`, in random sizes with random stalls (to make the proxy pause)."""
    check = Checker(tag)
    while True:
        chunk = sock.recv(rnd.choice([4096, 65536, MiB]) if rnd else MiB)
        if not chunk:
            return check
        check.feed(chunk)
        if rnd is not None and rnd.random() < 0.3:
            time.sleep(rnd.choice([0, 0.001, 0.01, 0.03]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--down-mib", type=int, default=32)
    ap.add_argument("--up-mib", type=int, default=16)
    ap.add_argument("--limit", type=int, default=256 * 1024, help="ebpf.sockmap.max_inflight_bytes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-stalls", action="store_true",
                    help="the client reads down at full speed (pauses only when the kernel lags)")
    ap.add_argument("--pin", action="store_true",
                    help="the proxy on CPU 1, this script (client and backend) on CPU 0")
    ap.add_argument("--poll-status", action="store_true",
                    help="poll /status and /metrics all along and report any answer that is not 200")
    ap.add_argument("--up-continuous", action="store_true",
                    help="the client writes up without silences (both directions bulk at once)")
    ap.add_argument("--backend-stalls", action="store_true",
                    help="the backend reads up with random stalls too, so both directions pause")
    args = ap.parse_args()
    down, up = args.down_mib * MiB, args.up_mib * MiB
    ups: dict[int, Checker] = {}
    lock = threading.Lock()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            got = b""
            while len(got) < len(HELLO) + 4:
                got += conn.recv(len(HELLO) + 4 - len(got))
            index = struct.unpack("!I", got[len(HELLO):])[0]
            result: dict[str, Checker] = {}
            rnd = random.Random(args.seed * 7919 + index) if args.backend_stalls else None
            reader = threading.Thread(target=lambda: result.update(r=read_stream(conn, UP, rnd)))
            reader.start()
            send_stream(conn, DOWN, down, None)
            conn.shutdown(socket.SHUT_WR)
            reader.join()
            with lock:
                ups[index] = result["r"]

    def accept_loop() -> None:
        for _ in range(args.conns):
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    workdir = Path(tempfile.mkdtemp(prefix="bp-stress-"))
    cfg = base_config(free_port(), free_port(), workers=1,
                      default_backend=f"127.0.0.1:{listener.getsockname()[1]}",
                      ebpf={"enabled": True, "dns_cache": {"pin_path": None},
                            "sockmap": {"backpressure": True, "max_inflight_bytes": args.limit,
                                        "sndbuf_bytes": 8 * MiB}})
    cfg["timeouts"]["idle_s"] = 120
    proxy = ProxyProcess(cfg, workdir)
    proxy.start()
    if args.pin:
        import os
        for pid in [proxy.proc.pid] + [w["pid"] for w in proxy.status()["workers"]]:
            os.sched_setaffinity(pid, {1})
        os.sched_setaffinity(0, {0})
    port = int(proxy.config["listen_addr"].rsplit(":", 1)[1])

    def one(i: int) -> Checker:
        rnd = random.Random(args.seed * 1000 + i)
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            s.sendall(HELLO + struct.pack("!I", i))
            bursts = None if args.up_continuous else random.Random(rnd.random())
            sender = threading.Thread(target=send_stream, args=(s, UP, up, bursts))
            sender.start()
            got = read_stream(s, DOWN, None if args.no_stalls else rnd)
            sender.join()
            s.shutdown(socket.SHUT_WR)
            return got

    polled = {"ok": 0, "bad": []}
    polling = threading.Event()

    def poll() -> None:
        import urllib.error
        import urllib.request
        while not polling.is_set():
            for path in ("/status", "/metrics"):
                try:
                    with urllib.request.urlopen(proxy.metrics_url + path, timeout=10) as r:
                        r.read()
                    polled["ok"] += 1
                except urllib.error.HTTPError as exc:
                    polled["bad"].append(f"{path} {exc.code}: {exc.read()[:300]!r}")
                except OSError as exc:
                    polled["bad"].append(f"{path} {exc}")

    poller = threading.Thread(target=poll, daemon=True)
    if args.poll_status:
        poller.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(args.parallel) as ex:
            downs = list(ex.map(one, range(args.conns)))
        deadline = time.monotonic() + 60
        while len(ups) < args.conns and time.monotonic() < deadline:
            time.sleep(0.05)
        counters = {name: proxy.metric(f"ebpf_sockmap_{name}_total")
                    for name in ("pauses", "inflight_over_limit")}
    finally:
        polling.set()
        if args.poll_status:
            poller.join()
        proxy.stop()
        listener.close()
    bad = 0
    for i, d in enumerate(downs):
        u = ups.get(i)
        problems = []
        if d.n != down or d.bad:
            problems.append(f"down {d.n}/{down} bytes {d.bad}")
        if u is None or u.n != up or u.bad:
            problems.append("up missing" if u is None else f"up {u.n}/{up} bytes {u.bad}")
        if problems:
            bad += 1
            print(f"connection {i}: " + "; ".join(problems))
    print(f"{args.conns - bad} of {args.conns} connections exact both ways "
          f"({args.down_mib} MiB down{'' if args.no_stalls else ' read with stalls'}, {args.up_mib} MiB up "
          f"{'continuously' if args.up_continuous else 'in bursts'}"
          f"{' read with stalls' if args.backend_stalls else ''}, limit "
          f"{args.limit} B) in {time.monotonic() - t0:.0f} s; proxy counters {counters}")
    if args.poll_status:
        print(f"/status and /metrics: {polled['ok']} answers 200, {len(polled['bad'])} not")
        for line in polled["bad"][:10]:
            print("  " + line)
    return 1 if bad or polled["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
