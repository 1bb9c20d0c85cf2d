"""`sni-proxy demo`: load every BPF object of the project for real, attach, count, detach.

The seed's `ebpf_demo` printed a capability line and initialised its manager; this does the same
and then proves each object works on this kernel: it lists programs and maps with their kernel
ids, attaches the probe programs and the XDP counter to traffic it generates itself (syscalls,
a context switch, CPU time, a TCP message, UDP datagrams on `lo`) and shows what they counted.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import libbpf as lb
from .objects import (
    BPF_SK_SKB_STREAM_VERDICT,
    XDP_FLAGS_SKB_MODE,
    BpfObject,
    available_objects,
    perf_event_open_cpu_clock,
)
from .layout import EnumLayout
from .support import check_system_support

SO_COOKIE = 57  # socket.SO_COOKIE is missing from Python 3.11's socket module
# Counter slots of the probe and XDP objects, checked against their BTF at open (layout.py).
PROBE_SLOTS = EnumLayout("sni_proxy_probe_slot", "SLOT_", (
    "skb_verdict", "raw_tp", "tp_btf", "perf_event", "uprobe", "tracepoint"), end="SLOT_MAX")
XDP_SLOTS = EnumLayout("sni_proxy_xdp_slot", "SLOT_", (
    "packets", "bytes", "udp_port_packets"), end="SLOT_MAX")
LAYOUTS = {"sni_proxy_probe": (PROBE_SLOTS,), "sni_proxy_xdp": (XDP_SLOTS,)}
SLOT_SKB_VERDICT, SLOT_RAW_TP, SLOT_TP_BTF, SLOT_PERF_EVENT = (
    PROBE_SLOTS.value(n) for n in ("skb_verdict", "raw_tp", "tp_btf", "perf_event"))
XDP_SLOT_PACKETS, XDP_SLOT_UDP_PORT = (
    XDP_SLOTS.value(n) for n in ("packets", "udp_port_packets"))
DEMO_DATAGRAMS = 5
PERF_DEMO_HZ = 999
PERF_DEMO_SECONDS = 0.2



# Who attaches the objects the demo only loads (for the line under each one).
_ATTACHED_BY = {
    "sni_proxy_sockmap.bpf.o": "sni-proxy run (the kernel data path)",
    "sni_proxy_profile.bpf.o": "sni-proxy profile (the CPU profiler)",
    "sni_proxy_skmsg_bench.bpf.o": "bench/sk_msg_vs_sk_skb.py (a measurement, not used by the proxy)",
    "sni_proxy_tcp_splice.bpf.o": "sni-proxy run (tc clsact on ebpf.tcp_splice.interfaces: the "
                                  "kernel TCP splice; the demo does not attach it to real interfaces)",
}

def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _show_object(obj: BpfObject, out: Callable[[str], None]) -> None:
    out("  programs:")
    for p in obj.programs.values():
        out(f"    {p.name:<16} {p.type_name:<15} id {p.id:<6} SEC(\"{p.section}\")")
    out("  maps:")
    for m in obj.maps.values():
        out(f"    {m.name:<16} {m.type_name:<15} id {m.info()['id']:<6} key {m.key_size} B, "
            f"value {m.value_size} B, max {m.max_entries}")


def _demo_probe(obj: BpfObject, out: Callable[[str], None]) -> None:
    counters = obj.map("sni_proxy_pcpu")
    with obj.program("sni_proxy_rawtp").attach():
        for _ in range(100):
            os.getppid()
    out(f"  attached sni_proxy_rawtp to raw_tp/sys_enter: {counters.percpu_sum(SLOT_RAW_TP)} "
        "syscalls of this process counted (100 getppid + the rest), detached")

    with obj.program("sni_proxy_tpbtf").attach():
        for _ in range(3):
            time.sleep(0.001)
    out(f"  attached sni_proxy_tpbtf to tp_btf/sched_switch: "
        f"{counters.percpu_sum(SLOT_TP_BTF)} context switches of this process, detached")

    perf_fd = perf_event_open_cpu_clock(-1, PERF_DEMO_HZ, pid=0)
    with obj.program("sni_proxy_perf").attach_perf_event(perf_fd):
        _busy(PERF_DEMO_SECONDS)
    out(f"  attached sni_proxy_perf to a {PERF_DEMO_HZ} Hz cpu-clock perf event: "
        f"{counters.percpu_sum(SLOT_PERF_EVENT)} samples in {PERF_DEMO_SECONDS} s of CPU, detached")

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        sockhash = obj.map("sni_proxy_sk")
        with obj.program("sni_proxy_skv").attach_to_map(sockhash, BPF_SK_SKB_STREAM_VERDICT):
            cookie = accepted.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
            sockhash.update(cookie, accepted.fileno())
            client.sendall(b"hello sockhash")
            received = accepted.recv(64)
            sockhash.delete(cookie)
        out(f"  attached sni_proxy_skv to SOCKHASH sni_proxy_sk: a TCP socket entered the map, "
            f"{counters.percpu_sum(SLOT_SKB_VERDICT)} skb verdict(s), {received!r} delivered, "
            "detached")
    finally:
        for s in (client, accepted, server):
            s.close()


def _demo_xdp(obj_path: Path, out: Callable[[str], None]) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    try:
        with BpfObject(obj_path, rodata={"sni_proxy_port": port},
                       layouts=LAYOUTS["sni_proxy_xdp"]) as obj:
            _show_object(obj, out)
            ifindex = socket.if_nametoindex("lo")
            with obj.program("sni_proxy_xdp").attach_xdp(ifindex, XDP_FLAGS_SKB_MODE):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                    for _ in range(DEMO_DATAGRAMS):
                        sender.sendto(b"sni-proxy demo", ("127.0.0.1", port))
                        receiver.recv(64)
            counters = obj.map("sni_proxy_xcnt")
            out(f"  attached sni_proxy_xdp to lo (generic XDP): sent {DEMO_DATAGRAMS} UDP "
                f"datagrams to 127.0.0.1:{port}, counted "
                f"{counters.percpu_sum(XDP_SLOT_UDP_PORT)} of them "
                f"({counters.percpu_sum(XDP_SLOT_PACKETS)} packets on lo in total), all passed, "
                "detached")
    finally:
        receiver.close()


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="sni-proxy demo",
        description="Load every BPF object of sni-proxy for real, attach it to traffic this "
                    "command generates, show what it counted and detach.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  sudo sni-proxy demo          every object: loaded, attached, counted, detached
  sni-proxy check              the same host facts without loading the proxy's programs

Needs CAP_BPF and CAP_NET_ADMIN (or root); the XDP object attaches to `lo` for a moment.""")


def cli_demo(argv: list[str]) -> int:
    build_parser().parse_args(argv)
    out = print

    out("===== sni-proxy eBPF demo =====")
    if not lb.libbpf_available():
        out("✗ libbpf.so.1 not found: install libbpf1 (`apt-get install libbpf1`)")
        return 1
    report = check_system_support()
    out(f"✓ eBPF manager initialised (libbpf {report.libbpf_version}, "
        f"probed in {report.elapsed_s:.2f} s)")
    out(report.capability_line())
    objects = available_objects()
    if not objects:
        out("✗ no BPF objects found: run `make bpf` (needs clang, libbpf-dev and bpftool)")
        return 1
    if not report.ok("cap:CAP_BPF"):
        out(f"✗ {report.reason('cap:CAP_BPF')}")
        return 1

    failures = 0
    for path in objects:
        out("")
        out(f"[{path.name}]")
        try:
            if path.name == "sni_proxy_xdp.bpf.o":
                _demo_xdp(path, out)
                continue
            rodata = {"sni_proxy_tgid": os.getpid()} if path.name == "sni_proxy_probe.bpf.o" else None
            with BpfObject(path, rodata=rodata,
                           layouts=LAYOUTS.get(path.name.removesuffix(".bpf.o"), ())) as obj:
                _show_object(obj, out)
                if path.name == "sni_proxy_probe.bpf.o":
                    _demo_probe(obj, out)
                else:
                    out(f"  loaded and verified; attached by {_ATTACHED_BY.get(path.name, 'its own module')}")
        except OSError as e:
            failures += 1
            out(f"  ✗ {e}")
    out("")
    if failures:
        out(f"✗ {failures} object(s) failed; `sni-proxy check` shows what this system lacks")
        return 1
    out(f"✓ {len(objects)} object(s) loaded, attached where shown, detached and closed")
    return 0


if __name__ == "__main__":
    sys.exit(cli_demo(sys.argv[1:]))
