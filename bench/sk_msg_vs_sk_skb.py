#!/usr/bin/env python3
"""Relay one bulk TCP transfer on 127.0.0.1 four ways and measure throughput and CPU.

    .venv/bin/python bench/sk_msg_vs_sk_skb.py [--size-mib 1024] [--reps 3]

Designs (sender -> [relay] -> receiver, each a process of its own):
  direct  no relay: the reference.
  sk_skb  the production kernel data path: the relay puts both sockets into the proxy's
          SOCKHASH (sniproxy.ebpf.sockmap.SockmapDataPath / SockPair, program sni_proxy_skv);
          every skb arriving on the sender-facing socket is redirected to the egress of the
          receiver-facing one. The relay only waits for EOF, then propagates it.
  sk_msg  bpf/sni_proxy_skmsg_bench.bpf.c: an sk_msg program runs on sendmsg() only, so the
          relay recv()s every byte from the sender-facing socket and send()s it back on that
          same socket; the program redirects each message to the receiver-facing socket's
          egress (bpf_msg_redirect_hash).
  copy    the same recv/send loop without BPF: recv from the sender, send to the receiver.

Every relay socket gets an 8 MiB SO_SNDBUFFORCE, as the proxy does in sockmap mode
(ebpf.sockmap.sndbuf_bytes in bench/run_sni_proxy.py), so only the mechanism differs. The
user-space loops use a 64 KiB buffer like the proxy's CopyPump. All sockets are blocking,
bounded by SO_RCVTIMEO/SO_SNDTIMEO (see blocking_with_timeout). Nothing is pinned: the
scheduler places the three processes and the kworkers on the machine's CPUs.

Verification: the sender sends a seeded random pattern with a prime period; the receiver
compares every received byte with the expected one (a memcmp per recv) and counts them, so a
lost, duplicated or reordered byte is caught (a transfer is "exact" only if all N bytes match).

CPU: relay CPU = utime+stime of the relay process (getrusage in the relay, from "ready" to the
end); machine CPU = busy time of all CPUs from /proc/stat over the transfer (kworkers, softirq
and the sender and receiver included). Both per GB (1e9 bytes) transferred.

Before the runs, one check of the claim that sk_msg cannot relay what arrives from the network:
with only the sk_msg program attached, 1 MiB arrives on the sender-facing socket and the
program's counters stay 0 until the relay itself send()s the bytes.

Output: a table, then one JSON line per design and one for the check.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import select
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sniproxy.ebpf.layout import EnumLayout, StructLayout  # noqa: E402
from sniproxy.ebpf.objects import BPF_SK_MSG_VERDICT, BpfObject  # noqa: E402
from sniproxy.ebpf.sockmap import (  # noqa: E402
    SockmapDataPath, SockPair, socket_cookie, tcp_bytes_received, tcp_written,
)

DESIGNS = ("direct", "sk_skb", "sk_msg", "copy")
MiB = 1 << 20
GB = 1e9

# The stream repeats a random block of a prime length, so any shift of the stream (a lost or
# duplicated chunk: chunks are multiples of pages) misaligns it against the expected bytes.
PATTERN_PERIOD = 1_048_573
PATTERN_SEED = 20261122
SEND_CHUNK = PATTERN_PERIOD          # at most one period, so a slice of the doubled pattern
RECV_CHUNK = 512 * 1024              # <= PATTERN_PERIOD, for the same reason
RELAY_BUFFER = 64 * 1024             # the proxy's CopyPump buffer
RELAY_SNDBUF = 8 * MiB               # ebpf.sockmap.sndbuf_bytes of bench/run_sni_proxy.py
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

CHECK_BYTES = 1 * MiB                # what arrives, unread, before the sk_msg relay sends
CHECK_RCVBUF = 8 * MiB               # so all of it fits in the socket's receive buffer
IDLE_BASELINE_S = 1.0
TRANSFER_TIMEOUT_S = 120.0
SETUP_TIMEOUT_S = 20.0

# sk_msg bench object (sni_proxy_skmsg_bench.bpf.c)
SKMSG_OBJECT = "sni_proxy_skmsg_bench"
SKMSG_PROGRAM = "sni_proxy_msg"
# Checked against the object's BTF at open (src/sniproxy/ebpf/layout.py).
MSTAT_LAYOUT = EnumLayout("sni_proxy_mstat_slot", "MSTAT_",
                          ("msgs", "bytes", "no_peer", "redirect_fail"), end="MSTAT_MAX")
MSTAT_NAMES = MSTAT_LAYOUT.names
# struct sni_proxy_flow: ips as on the wire, ports host order
FLOW_LAYOUT = StructLayout("sni_proxy_flow", (
    ("local_ip4", "4s"), ("remote_ip4", "4s"), ("local_port", "I"), ("remote_port", "I")))
LAYOUTS = (MSTAT_LAYOUT, FLOW_LAYOUT)
_FLOW = FLOW_LAYOUT.struct


def doubled_pattern() -> bytes:
    """The pattern twice in a row: any window of <= one period is one slice (no wrap)."""
    block = random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD)
    return block + block


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """Busy time of all CPUs since boot (everything but idle and iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def listener(rcvbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf:
        # Before listen(): accepted sockets inherit it and the window scale fits it.
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


def blocking_with_timeout(sock: socket.socket, timeout: float = TRANSFER_TIMEOUT_S) -> None:
    """Blocking socket bounded by SO_RCVTIMEO/SO_SNDTIMEO instead of Python's settimeout().

    settimeout() makes the file O_NONBLOCK, so each send() carries MSG_DONTWAIT; then a
    redirect that finds the target's send buffer full hands part of the message back to
    user space, which sends it again and the sk_msg program sees (and counts) it twice
    (measured: 2-11 % more bytes than relayed). Blocking sockets wait in the kernel instead.
    """
    sock.settimeout(None)
    limit = struct.pack("ll", int(timeout), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)


def wait_readable(sock: socket.socket, timeout: float, what: str) -> None:
    if not select.select([sock], [], [], timeout)[0]:
        raise TimeoutError(f"{what}: nothing within {timeout:.0f}s")


# ----------------------------------------------------------------------------- endpoints
def run_receiver(conn, lsock: socket.socket, pattern: bytes) -> None:
    """Accept one connection, compare every byte with the pattern until EOF, report."""
    try:
        wait_readable(lsock, SETUP_TIMEOUT_S, "receiver accept")
        sock, _ = lsock.accept()
        lsock.close()
        blocking_with_timeout(sock)
        buf = bytearray(RECV_CHUNK)
        view = memoryview(buf)
        total = 0
        mismatch_at = None
        cpu0 = cpu_seconds()
        while True:
            n = sock.recv_into(view)
            if not n:
                break
            if mismatch_at is None:
                off = total % PATTERN_PERIOD
                if buf[:n] != pattern[off:off + n]:
                    got, want = buf[:n], pattern[off:off + n]
                    mismatch_at = total + next(i for i in range(n) if got[i] != want[i])
            total += n
        done = time.monotonic()
        cpu = cpu_seconds() - cpu0
        sock.close()            # the relay (or the sender) sees EOF and finishes
        conn.send({"bytes": total, "mismatch_at": mismatch_at, "cpu_s": cpu, "done": done})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send({"error": f"receiver: {exc!r}"})


def run_sender(conn, addr: tuple[str, int], pattern: bytes, size: int) -> None:
    """Connect, wait for "go", send `size` bytes of the pattern, half-close, wait for EOF."""
    try:
        sock = socket.create_connection(addr, timeout=SETUP_TIMEOUT_S)
        blocking_with_timeout(sock)
        conn.send({"connected": True})
        if conn.recv() != "go":
            return
        view = memoryview(pattern)
        cpu0 = cpu_seconds()
        sent = 0
        while sent < size:
            off = sent % PATTERN_PERIOD
            n = min(SEND_CHUNK, size - sent)
            sock.sendall(view[off:off + n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
        cpu = cpu_seconds() - cpu0
        sock.recv(1)            # EOF once the other side closed: nothing is left in flight
        sock.close()
        conn.send({"sent": sent, "cpu_s": cpu})
    except Exception as exc:  # noqa: BLE001
        conn.send({"error": f"sender: {exc!r}"})


# ----------------------------------------------------------------------------- relays
def accept_and_connect(lsock: socket.socket, receiver: tuple[str, int]
                       ) -> tuple[socket.socket, socket.socket]:
    wait_readable(lsock, SETUP_TIMEOUT_S, "relay accept")
    src, _ = lsock.accept()
    lsock.close()
    dst = socket.create_connection(receiver, timeout=SETUP_TIMEOUT_S)
    for sock in (src, dst):
        blocking_with_timeout(sock)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, RELAY_SNDBUF)
    return src, dst


def recv_into(sock: socket.socket, view: memoryview) -> int:
    """recv_into on a blocking socket, retried when it fails with EAGAIN before its timeout.

    A blocking recv() on a socket in a sockmap (tcp_bpf_recvmsg) sometimes failed with EAGAIN
    when woken by the peer's FIN (measured: 1 of 3 runs of the sk_msg check); poll() then
    tells whether the socket is really readable.
    """
    while True:
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            if not select.select([sock], [], [], TRANSFER_TIMEOUT_S)[0]:
                raise TimeoutError(f"nothing to read for {TRANSFER_TIMEOUT_S:.0f}s") from None


def copy_loop(src: socket.socket, send_on: socket.socket) -> int:
    """recv from `src`, send on `send_on` until EOF; returns the bytes moved."""
    buf = bytearray(RELAY_BUFFER)
    view = memoryview(buf)
    moved = 0
    while True:
        n = recv_into(src, view)
        if not n:
            return moved
        send_on.sendall(view[:n])
        moved += n


def wait_eof(sock: socket.socket) -> None:
    """Block until the peer closed (the receiver closes once it has read everything)."""
    view = memoryview(bytearray(65536))
    while recv_into(sock, view):
        pass


def relay_copy(src: socket.socket, dst: socket.socket, conn) -> dict:
    conn.send({"ready": True})
    cpu0 = cpu_seconds()
    moved = copy_loop(src, dst)
    dst.shutdown(socket.SHUT_WR)
    wait_eof(dst)
    return {"relayed": moved, "cpu_s": cpu_seconds() - cpu0}


def flow_key(sock: socket.socket) -> bytes:
    """The sni_proxy_flow key the sk_msg program builds for a message sent on `sock`."""
    local_ip, local_port = sock.getsockname()
    remote_ip, remote_port = sock.getpeername()
    return _FLOW.pack(socket.inet_aton(local_ip), socket.inet_aton(remote_ip),
                      local_port, remote_port)


class SkMsgRelay:
    """The sk_msg bench object loaded, its program attached to sni_proxy_msks."""

    def __init__(self) -> None:
        self.obj = BpfObject(SKMSG_OBJECT, layouts=LAYOUTS).load()
        self.socks_map = self.obj.map("sni_proxy_msks")
        self.peer_map = self.obj.map("sni_proxy_mpeer")
        self.stat_map = self.obj.map("sni_proxy_mstat")
        self.obj.program(SKMSG_PROGRAM).attach_to_map(self.socks_map, BPF_SK_MSG_VERDICT)

    def insert(self, src: socket.socket, dst: socket.socket) -> None:
        # Peer entries first, then the target, then the source: the first message sent on
        # the source then always finds where to go.
        self.peer_map.update(flow_key(src), socket_cookie(dst))
        self.peer_map.update(flow_key(dst), socket_cookie(src))
        for sock in (dst, src):
            self.socks_map.update(socket_cookie(sock), sock.fileno())

    def stats(self) -> dict[str, int]:
        return {name: self.stat_map.percpu_sum(i) for i, name in enumerate(MSTAT_NAMES)}

    def close(self) -> None:
        self.obj.close()


def wait_landed(dst: socket.socket, nbytes: int) -> None:
    """Until `nbytes` are queued on `dst` (acked + SIOCOUTQ): only then may its FIN follow."""
    deadline = time.monotonic() + TRANSFER_TIMEOUT_S
    delay = 0.0005
    while tcp_written(dst)[0] < nbytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {tcp_written(dst)[0]} of {nbytes} bytes reached the peer")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def relay_sk_msg(src: socket.socket, dst: socket.socket, conn) -> dict:
    relay = SkMsgRelay()
    try:
        relay.insert(src, dst)
        conn.send({"ready": True})
        cpu0 = cpu_seconds()
        # Sent back on the socket it came from: the program sends it out of `dst` instead.
        moved = copy_loop(src, src)
        wait_landed(dst, moved)
        dst.shutdown(socket.SHUT_WR)
        wait_eof(dst)
        return {"relayed": moved, "cpu_s": cpu_seconds() - cpu0, "program": relay.stats()}
    finally:
        relay.close()


def relay_sk_msg_check(src: socket.socket, dst: socket.socket, conn) -> dict:
    """The claim: bytes arriving from the network do not pass the sk_msg program."""
    relay = SkMsgRelay()
    try:
        relay.insert(src, dst)
        conn.send({"ready": True})
        # Let the whole transfer (and its FIN: +1) arrive on `src` without reading it.
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while tcp_bytes_received(src) < CHECK_BYTES + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        arrived = tcp_bytes_received(src)
        arrived -= arrived > CHECK_BYTES             # the FIN's sequence number
        before = relay.stats()
        moved = copy_loop(src, src)
        wait_landed(dst, moved)
        dst.shutdown(socket.SHUT_WR)
        wait_eof(dst)
        return {"relayed": moved, "arrived_unread": arrived, "program_before_send": before,
                "program_after_send": relay.stats()}
    finally:
        relay.close()


def relay_sk_skb(src: socket.socket, dst: socket.socket, conn) -> dict:
    """The production data path: SockmapDataPath + SockPair, then wait for EOF like the proxy."""
    datapath = SockmapDataPath.load(64, rings=1)
    try:
        # A credit no transfer reaches: the backpressure ring is never used here.
        pair = SockPair(datapath.maps, src, dst, ring_index=0, credit_bytes=1 << 62)
        pair.insert()
        pair.trigger()
        conn.send({"ready": True})
        cpu0 = cpu_seconds()
        watch = select.epoll()
        watch.register(src.fileno(), select.EPOLLRDHUP)
        if not watch.poll(TRANSFER_TIMEOUT_S):
            raise TimeoutError("no EOF from the sender")
        # As SockmapRelay._finish_direction: the program has seen every byte (+1: the FIN)
        # and all of them are queued on the receiver-facing socket; then half-close it.
        deadline = time.monotonic() + TRANSFER_TIMEOUT_S
        delay = 0.0005
        while True:
            state = pair.state(0)
            taken = state.fin or state.redirected >= pair.received_since_insert(0) - 1
            if taken and pair.written_since_insert(1)[0] >= state.redirected:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"redirect stuck at {state.redirected} bytes")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        dst.shutdown(socket.SHUT_WR)
        watch.unregister(src.fileno())
        watch.register(dst.fileno(), select.EPOLLRDHUP)
        watch.poll(TRANSFER_TIMEOUT_S)
        watch.close()
        relayed = pair.redirected(0)
        pair.remove()
        return {"relayed": relayed, "cpu_s": cpu_seconds() - cpu0, "program": datapath.stats()}
    finally:
        datapath.close()


RELAYS = {"sk_skb": relay_sk_skb, "sk_msg": relay_sk_msg, "copy": relay_copy,
          "sk_msg_check": relay_sk_msg_check}


def run_relay(conn, design: str, lsock: socket.socket, receiver: tuple[str, int]) -> None:
    try:
        src, dst = accept_and_connect(lsock, receiver)
        result = RELAYS[design](src, dst, conn)
        src.close()
        dst.close()
        conn.send(result)
    except Exception as exc:  # noqa: BLE001
        conn.send({"error": f"relay {design}: {exc!r}"})


# ----------------------------------------------------------------------------- one transfer
def receive(conn, timeout: float, what: str) -> dict:
    if not conn.poll(timeout):
        raise TimeoutError(f"{what}: no answer within {timeout:.0f}s")
    msg = conn.recv()
    if "error" in msg:
        raise RuntimeError(msg["error"])
    return msg


def transfer(design: str, size: int, pattern: bytes) -> dict:
    """One transfer of `size` bytes through `design`; returns its measurements."""
    ctx = multiprocessing.get_context("fork")
    children = []
    pipes = {}

    def start(name: str, target, *args) -> None:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child_end, *args), name=f"bench-{name}",
                           daemon=True)
        proc.start()
        child_end.close()
        children.append(proc)
        pipes[name] = parent_end

    receiver_lsock = listener()
    receiver_addr = receiver_lsock.getsockname()
    try:
        start("receiver", run_receiver, receiver_lsock, pattern)
        receiver_lsock.close()
        target = receiver_addr
        if design != "direct":
            relay_lsock = listener(CHECK_RCVBUF if design == "sk_msg_check" else 0)
            target = relay_lsock.getsockname()
            start("relay", run_relay, design, relay_lsock, receiver_addr)
            relay_lsock.close()
        start("sender", run_sender, target, pattern, size)
        receive(pipes["sender"], SETUP_TIMEOUT_S, "sender connect")
        if design != "direct":
            receive(pipes["relay"], SETUP_TIMEOUT_S, "relay setup")
        busy0 = machine_busy_seconds()
        t0 = time.monotonic()
        pipes["sender"].send("go")
        got = receive(pipes["receiver"], TRANSFER_TIMEOUT_S, "receiver")
        busy1 = machine_busy_seconds()
        sent = receive(pipes["sender"], SETUP_TIMEOUT_S, "sender")
        relay = receive(pipes["relay"], SETUP_TIMEOUT_S, "relay") if design != "direct" else {}
    finally:
        for proc in children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    seconds = got["done"] - t0
    exact = got["bytes"] == size and sent["sent"] == size and got["mismatch_at"] is None
    return {"design": design, "bytes": got["bytes"], "exact": exact,
            "mismatch_at": got["mismatch_at"], "seconds": seconds,
            "mb_s": got["bytes"] / seconds / 1e6,
            "relay_cpu_s": relay.get("cpu_s", 0.0), "machine_cpu_s": busy1 - busy0,
            "sender_cpu_s": sent["cpu_s"], "receiver_cpu_s": got["cpu_s"],
            **{k: v for k, v in relay.items() if k not in ("cpu_s", "ready")}}


# ----------------------------------------------------------------------------- report
def summarize(design: str, runs: list[dict], size: int) -> dict:
    gigabytes = size / GB
    med = statistics.median
    return {
        "design": design, "size_bytes": size, "reps": len(runs),
        "exact": all(r["exact"] for r in runs),
        "mb_s": med(r["mb_s"] for r in runs),
        "relay_cpu_s_per_gb": med(r["relay_cpu_s"] for r in runs) / gigabytes,
        "machine_cpu_s_per_gb": med(r["machine_cpu_s"] for r in runs) / gigabytes,
        "runs": runs,
    }


def print_table(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["design"] == "direct"), None)

    def ratio(value: float, reference: float) -> str:
        # /proc/stat counts in ticks (10 ms): a tiny transfer can show 0 machine CPU.
        return f"{value / reference:.2f}" if ref and reference else "-"

    print(f"{'design':<8} {'MB/s':>7} {'x direct':>8} {'relay s/GB':>10} "
          f"{'machine s/GB':>12} {'x direct':>8}  exact")
    for r in rows:
        speed = ratio(r["mb_s"], ref["mb_s"] if ref else 0)
        cpu = ratio(r["machine_cpu_s_per_gb"], ref["machine_cpu_s_per_gb"] if ref else 0)
        relay = "-" if r["design"] == "direct" else f"{r['relay_cpu_s_per_gb']:.3f}"
        print(f"{r['design']:<8} {r['mb_s']:>7.0f} {speed:>8} {relay:>10} "
              f"{r['machine_cpu_s_per_gb']:>12.2f} {cpu:>8}  {r['exact']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="bytes per transfer, in MiB")
    p.add_argument("--reps", type=int, default=3, help="transfers per design (median reported)")
    p.add_argument("--designs", default=",".join(DESIGNS),
                   help=f"comma-separated subset of {','.join(DESIGNS)}")
    args = p.parse_args()
    designs = [d for d in args.designs.split(",") if d]
    unknown = set(designs) - set(DESIGNS)
    if unknown:
        p.error(f"unknown design(s): {', '.join(sorted(unknown))}")
    size = args.size_mib * MiB
    pattern = doubled_pattern()
    # What else runs: machine CPU counts every process, so an idle baseline says how quiet.
    busy0 = machine_busy_seconds()
    time.sleep(IDLE_BASELINE_S)
    idle_busy = (machine_busy_seconds() - busy0) / IDLE_BASELINE_S
    print(f"machine busy while idle: {idle_busy:.3f} CPU-s per s ({os.cpu_count()} CPUs)")

    check = transfer("sk_msg_check", CHECK_BYTES, pattern)
    before, after = check["program_before_send"], check["program_after_send"]
    check_line = {"check": "sk_msg_sees_network_bytes", "idle_machine_cpu_s_per_s": idle_busy,
                  "exact": check["exact"],
                  "arrived_unread_bytes": check["arrived_unread"],
                  "program_bytes_before_send": before["bytes"],
                  "program_msgs_before_send": before["msgs"],
                  "program_bytes_after_send": after["bytes"],
                  "relayed_bytes": check["relayed"]}
    print(f"sk_msg check: {check['arrived_unread']} bytes arrived on the sender-facing socket, "
          f"the sk_msg program saw {before['bytes']} bytes ({before['msgs']} msgs); after the "
          f"relay send()s them: {after['bytes']} bytes ({after['msgs']} msgs)")

    runs: dict[str, list[dict]] = {d: [] for d in designs}
    for rep in range(args.reps):
        for design in designs:        # interleaved, so drift of the machine hits every design
            result = transfer(design, size, pattern)
            runs[design].append(result)
            print(f"  rep {rep + 1} {design:<7} {result['mb_s']:7.0f} MB/s  relay cpu "
                  f"{result['relay_cpu_s']:.3f}s  machine cpu {result['machine_cpu_s']:.2f}s  "
                  f"exact={result['exact']}", flush=True)
    rows = [summarize(d, runs[d], size) for d in designs]
    print(f"\n{args.size_mib} MiB x {args.reps} reps, medians; CPU seconds per GB (1e9 bytes)")
    print_table(rows)
    print(json.dumps(check_line))
    for row in rows:
        print(json.dumps(row))
    ok = check["exact"] and before["bytes"] == 0 and all(r["exact"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
