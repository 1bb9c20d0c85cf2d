"""The tcp_splice ingress/egress programs on crafted packets (BPF_PROG_TEST_RUN): option
layouts real Linux peers do not send (timestamps at an odd offset, SACK blocks, EOL), window
rescaling, IPv6, and every checksum verified from scratch. No interface is touched."""
from __future__ import annotations

import socket
import struct
import time

import pytest

from sniproxy.ebpf import libbpf as lb
from sniproxy.ebpf import tcpsplice as ts
from tests.ebpf_required import require_ebpf

pytestmark = pytest.mark.ebpf
TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT = 0xFFFFFFFF, 2, 7


@pytest.fixture(scope="module")
def dp():
    require_ebpf()
    d = ts.TcpSpliceDataPath.load(16)
    yield d
    d.close()


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_header(sport, dport, seq, ack, flags, win, options: bytes) -> bytes:
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, win, 0, 0) + options


def packet(src, dst, tcp: bytes, payload: bytes = b"") -> bytes:
    """Ethernet + IPv4/IPv6 + TCP with correct checksums."""
    seg = tcp + payload
    if ":" in src:
        s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
        pseudo = s + d + struct.pack("!IxxxB", len(seg), 6)
        seg = seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]
        ip = struct.pack("!IHBB", 6 << 28, len(seg), 6, 64) + s + d
        return b"\0" * 12 + b"\x86\xdd" + ip + seg
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    pseudo = s + d + struct.pack("!xBH", 6, len(seg))
    seg = seg[:16] + struct.pack("!H", csum(pseudo + seg)) + seg[18:]
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, 6, 0) + s + d
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return b"\0" * 12 + b"\x08\x00" + ip + seg


def parse(pkt: bytes):
    eth = pkt[12:14]
    if eth == b"\x86\xdd":
        ip, l4 = pkt[14:54], pkt[54:]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
        pseudo = ip[8:40] + struct.pack("!IxxxB", len(l4), 6)
    else:
        ip, l4 = pkt[14:34], pkt[34:]
        assert csum(ip) == 0, "IPv4 header checksum"
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        pseudo = ip[12:20] + struct.pack("!xBH", 6, len(l4))
    assert csum(pseudo + l4) == 0, "TCP checksum"
    sport, dport, seq, ack, doff, flags, win = struct.unpack("!HHIIBBH", l4[:16])
    return src, dst, sport, dport, seq, ack, flags, win, l4[20:(doff >> 4) * 4]


def entry(c2b: bool, src, dst, nsrc, ndst, *, seq_delta=0, ack_delta=0, ts_base=0,
          flags=ts.F_TSTAMP, shift_in=7, shift_out=7, handover_end=0):
    return ts.DirEntry(key=ts.pack_key(src, dst), src=nsrc, dst=ndst, seq_delta=seq_delta,
                       ack_delta=ack_delta, handover_end=handover_end, ifindex=1,
                       ts_base=ts_base, direction=ts.C2B if c2b else ts.B2C, flags=flags,
                       win_shift_in=shift_in, win_shift_out=shift_out)


def test_rewrite_odd_timestamp_offset_sack_and_window(dp):
    cl, lst = ("10.0.0.2", 40000), ("10.0.0.1", 443)
    bl, bk = ("10.0.1.1", 50000), ("10.0.1.2", 8443)
    c2b = entry(True, cl, lst, bl, bk, seq_delta=1000, ack_delta=-500 & 0xFFFFFFFF,
                ts_base=123456, shift_in=7, shift_out=5)
    b2c = entry(False, bk, bl, lst, cl, seq_delta=7, ack_delta=-1000 & 0xFFFFFFFF,
                ts_base=999, shift_in=5, shift_out=7)
    dp.insert(3, 42, 0, (c2b, b2c))
    b2c_state = dp.flow(3)
    assert b2c_state.gen == 42
    # NOP, SACK with 2 blocks (18 bytes), NOP, TS (its values at header offset 42, not
    # 4-aligned), EOL padding.
    sack = bytes([5, 18]) + struct.pack("!IIII", 5000, 6000, 7000, 8000)
    tsopt = bytes([8, 10]) + struct.pack("!II", 777, 555)
    opts = b"\x01" + sack + b"\x01" + tsopt
    opts += b"\0" * (-len(opts) % 4)
    before_ms = time.monotonic_ns() // 1_000_000
    pkt = packet("10.0.0.2", "10.0.0.1",
                 tcp_header(40000, 443, 100, 2000, 0x18, 1000, opts), b"payload!")
    ret, out = lb.prog_test_run(dp.obj.program("sni_proxy_tsi").fd, pkt)
    after_ms = time.monotonic_ns() // 1_000_000
    assert ret == TC_ACT_REDIRECT
    src, dst, sport, dport, seq, ack, flags, win, o = parse(out)
    assert (src, dst, sport, dport) == ("10.0.1.1", "10.0.1.2", 50000, 8443)
    assert (seq, ack, flags) == (1100, 1500, 0x18)
    assert win == (1000 << 7) >> 5
    assert struct.unpack("!IIII", o[3:19]) == (4500, 5500, 6500, 7500)
    tsval, tsecr = struct.unpack("!II", o[22:30])
    assert 123456 + before_ms <= tsval <= 123456 + after_ms + 1
    assert tsecr == 0            # the other direction's offset is not known yet
    assert out[-8:] == b"payload!"
    # The reverse direction: TSecr undoes the first direction's offset.
    off_c2b = (tsval - 777) & 0xFFFFFFFF
    pkt = packet("10.0.1.2", "10.0.1.1",
                 tcp_header(8443, 50000, 300, 1108, 0x10, 0xFFFF,
                            # TS at an odd byte offset of the header (23), EOL after it
                            b"\x01" + bytes([8, 10]) + struct.pack("!II", 9, tsval) + b"\0"),
                 b"x" * 100)
    ret, out = lb.prog_test_run(dp.obj.program("sni_proxy_tsi").fd, pkt)
    assert ret == TC_ACT_REDIRECT
    src, dst, sport, dport, seq, ack, flags, win, o = parse(out)
    assert (src, dst, sport, dport, seq, ack) == ("10.0.0.1", "10.0.0.2", 443, 40000, 307, 108)
    assert win == (0xFFFF << 5) >> 7
    assert struct.unpack("!II", o[3:11])[1] == (tsval - off_c2b) & 0xFFFFFFFF == 777
    st = dp.flow(3)
    assert st.packets == (1, 1) and st.bytes == (8, 100)
    dp.remove((c2b, b2c))


def test_fin_both_ways_and_their_acks_report_once(dp):
    ring = dp.new_ring(0)
    events = ts.EventRing(ring)
    cl, lst, bl, bk = ("10.0.0.2", 1), ("10.0.0.1", 2), ("10.0.1.1", 3), ("10.0.1.2", 4)
    c2b = entry(True, cl, lst, bl, bk, flags=0)
    b2c = entry(False, bk, bl, lst, cl, flags=0, handover_end=0)
    dp.insert(5, 7, 0, (c2b, b2c))
    prog = dp.obj.program("sni_proxy_tsi").fd
    send = lambda s, d, seq, ack, fl: lb.prog_test_run(prog, packet(s[0], d[0], tcp_header(s[1], d[1], seq, ack, fl, 100, b"")))
    send(bk, bl, 10, 20, 0x11)        # backend FIN (engages)
    send(cl, lst, 20, 11, 0x11)       # client FIN + ACK of the backend's FIN
    assert events.drain() == []
    send(bk, bl, 11, 21, 0x10)        # ACK of the client's FIN
    (event,) = events.drain()
    assert event[:3] == (5, 7, ts.EV_FIN)
    # the event carries the final state the relay needs (no map read at the end)
    end = event[3]
    assert (end.gen, end.fin, end.fin_acked, end.rst_from) == (7, (1, 1), (1, 1), None)
    assert end.fin_seq == tuple(dp.flow(5).fin_seq) and end.nxt == tuple(dp.flow(5).nxt)
    send(bk, bl, 11, 21, 0x10)        # a duplicate: no second event
    assert events.drain() == []
    st = dp.flow(5)
    assert st.fin == (1, 1) and st.fin_acked == (1, 1) and st.reported
    dp.remove((c2b, b2c))
    events.close()


def test_egress_freezes_the_proxy_sockets_but_lets_the_hand_over_out(dp):
    cl, lst, bl, bk = ("10.0.0.2", 11), ("10.0.0.1", 12), ("10.0.1.1", 13), ("10.0.1.2", 14)
    c2b = entry(True, cl, lst, bl, bk)
    b2c = entry(False, bk, bl, lst, cl, handover_end=5000)
    dp.insert(6, 1, 0, (c2b, b2c))
    prog = dp.obj.program("sni_proxy_tse").fd
    run = lambda s, d, seq, payload: lb.prog_test_run(prog, packet(s[0], d[0], tcp_header(s[1], d[1], seq, 1, 0x10, 100, b""), payload))[0]
    assert run(lst, cl, 1, b"") == TC_ACT_SHOT             # the client-side socket: frozen
    assert run(bl, bk, 4000, b"hello") == TC_ACT_UNSPEC    # hand-over bytes: out
    assert run(bl, bk, 5000, b"") == TC_ACT_SHOT           # its ACK / window update: frozen
    assert run(bl, bk, 5000, b"more") == TC_ACT_SHOT       # past the hand-over: frozen
    assert run(bk, bl, 1, b"") == TC_ACT_UNSPEC            # not a proxy socket's tuple
    assert dp.flow(6).frozen == 3
    dp.remove((c2b, b2c))


def test_ipv6_addresses_and_checksum(dp):
    cl, lst = ("fd00::2", 40000), ("fd00::1", 443)
    bl, bk = ("fd01::1", 50000), ("fd01::2", 8443)
    c2b = entry(True, cl, lst, bl, bk, seq_delta=5, flags=0)
    b2c = entry(False, bk, bl, lst, cl, flags=0)
    dp.insert(7, 1, 0, (c2b, b2c))
    pkt = packet("fd00::2", "fd00::1", tcp_header(40000, 443, 1, 1, 0x18, 10, b""), b"v6 data")
    ret, out = lb.prog_test_run(dp.obj.program("sni_proxy_tsi").fd, pkt)
    assert ret == TC_ACT_REDIRECT
    src, dst, sport, dport, seq, *_ = parse(out)
    assert (src, dst, sport, dport, seq) == ("fd01::1", "fd01::2", 50000, 8443, 6)
    dp.remove((c2b, b2c))


def test_syn_and_unknown_tuples_pass(dp):
    cl, lst, bl, bk = ("10.0.0.2", 21), ("10.0.0.1", 22), ("10.0.1.1", 23), ("10.0.1.2", 24)
    c2b = entry(True, cl, lst, bl, bk)
    b2c = entry(False, bk, bl, lst, cl)
    dp.insert(8, 1, 0, (c2b, b2c))
    prog = dp.obj.program("sni_proxy_tsi").fd
    syn = packet(cl[0], lst[0], tcp_header(21, 22, 1, 0, 0x02, 100, b""))
    assert lb.prog_test_run(prog, syn)[0] == TC_ACT_UNSPEC
    other = packet("10.9.9.9", lst[0], tcp_header(21, 22, 1, 0, 0x10, 100, b""))
    assert lb.prog_test_run(prog, other)[0] == TC_ACT_UNSPEC
    dp.remove((c2b, b2c))


def test_python_structs_match_the_btf_of_the_object():
    """The struct layouts packed in ebpf/tcpsplice.py have the sizes the compiler gave the C
    structs (read from the object's BTF with bpftool)."""
    import re
    import shutil
    import subprocess
    require_ebpf()
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    obj = ts.BpfObject(ts.OBJECT).path
    raw = subprocess.run([bpftool, "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    sizes = dict(re.findall(r"STRUCT '(sni_proxy_ts_\w+)' size=(\d+)", raw))
    assert int(sizes["sni_proxy_ts_key"]) == ts._KEY.size
    assert int(sizes["sni_proxy_ts_dir"]) == ts._DIR.size
    assert int(sizes["sni_proxy_ts_flow"]) == ts._FLOW.size


def test_a_syn_on_a_lingering_flow_removes_its_entries(dp):
    """A client reusing the 4-tuple of a finished (lingering) flow: the entries go at its
    SYN, so the new connection is the stack's."""
    cl, lst, bl, bk = ("10.0.0.2", 31), ("10.0.0.1", 32), ("10.0.1.1", 33), ("10.0.1.2", 34)
    c2b = entry(True, cl, lst, bl, bk, flags=0)
    b2c = entry(False, bk, bl, lst, cl, flags=0)
    dp.insert(9, 1, 0, (c2b, b2c))
    prog = dp.obj.program("sni_proxy_tsi").fd
    syn = packet(cl[0], lst[0], tcp_header(31, 32, 1, 0, 0x02, 100, b""))
    assert lb.prog_test_run(prog, syn)[0] == TC_ACT_UNSPEC
    assert dp.flows.lookup(c2b.key) is not None          # live flow: kept
    send = lambda s, d, seq, ack, fl: lb.prog_test_run(prog, packet(s[0], d[0], tcp_header(s[1], d[1], seq, ack, fl, 100, b"")))
    send(cl, lst, 1, 1, 0x14)                             # RST: the flow is over
    assert dp.flow(9).reported
    assert lb.prog_test_run(prog, syn)[0] == TC_ACT_UNSPEC
    assert dp.flows.lookup(c2b.key) is None and dp.flows.lookup(b2c.key) is None
