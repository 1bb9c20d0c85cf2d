"""A user-space netem between two network namespaces, for kernels without sch_netem.

This kernel has neither the netem nor the fq qdisc (`tc qdisc add ... netem` answers "unknown
qdisc kind"), so the tests link namespace A and namespace B with two TUN devices and this
process in between: it forwards every IP packet, A -> B after `delay` ms and dropping a
`loss` % at random (like `netem delay`/`netem loss` on A's egress), B -> A at once. The
kernels on both sides run real TCP over it; only the wire is simulated.

    ip netns exec A python3 netem_tun.py TUN_A TUN_B NETNS_B
    stdin: "delay 20" / "loss 5" lines (answered "ok"); EOF stops it.
"""
import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
BATCH = 64                  # packets per wake-up and direction: bounded work per loop
MAX_QUEUED = 10000          # delayed packets held at most (beyond: dropped, like a full qdisc)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def send(fd: int, packet: bytes) -> None:
    try:
        os.write(fd, packet)
    except OSError:     # EIO while the device is down: dropped, as a down link would
        pass


def main() -> None:
    tun_a = open_tun(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    ns = os.open(f"/var/run/netns/{sys.argv[3]}", os.O_RDONLY)
    if libc.setns(ns, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into " + sys.argv[3])
    tun_b = open_tun(sys.argv[2])
    print("ready", flush=True)
    delay = loss = 0.0
    queue: list = []
    seq = 0
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    pending = b""
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        ready, _, _ = select.select([tun_a, tun_b, stdin], [], [], timeout)
        if tun_a in ready:
            for _ in range(BATCH):
                try:
                    packet = os.read(tun_a, 65536)
                except BlockingIOError:
                    break
                if loss and random.random() < loss:
                    continue
                if delay and len(queue) < MAX_QUEUED:
                    heapq.heappush(queue, (time.monotonic() + delay, seq, packet))
                    seq += 1
                elif not delay:
                    send(tun_b, packet)
        if tun_b in ready:
            for _ in range(BATCH):
                try:
                    packet = os.read(tun_b, 65536)
                except BlockingIOError:
                    break
                send(tun_a, packet)
        if stdin in ready:
            data = os.read(stdin, 4096)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                key, value = line.split()
                if key == b"delay":
                    delay = float(value) / 1000
                elif key == b"loss":
                    loss = float(value) / 100
                print("ok", flush=True)
        while queue and queue[0][0] <= time.monotonic():
            send(tun_b, heapq.heappop(queue)[2])


if __name__ == "__main__":
    main()
