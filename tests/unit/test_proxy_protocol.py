"""PROXY protocol v1/v2 headers: exact bytes from haproxy's proxy-protocol.txt, and a round trip
through an independent parser written from that spec."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniproxy.proxy.proxy_protocol import encode, encode_v1, encode_v2

SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"  # spec section 2.2, spelled out


def parse_v1(data: bytes):
    """(proto, src, dst) or ("UNKNOWN", None, None), per spec section 2.1."""
    assert data.endswith(b"\r\n") and len(data) <= 107  # the spec's worst case
    parts = data[:-2].decode("ascii").split(" ")
    assert parts[0] == "PROXY"
    if parts[1] == "UNKNOWN":
        return "UNKNOWN", None, None
    proto, sip, dip, sport, dport = parts[1:]
    for ip, version in ((sip, proto[-1]), (dip, proto[-1])):
        assert str(ipaddress.ip_address(ip).version) == version
    return proto, (sip, int(sport)), (dip, int(dport))


def parse_v2(data: bytes):
    """(command, family, src, dst), per spec section 2.2."""
    assert data[:12] == SIG
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    assert ver_cmd >> 4 == 2
    assert len(data) == 16 + length
    command = {0: "LOCAL", 1: "PROXY"}[ver_cmd & 0xF]
    block = data[16:]
    if fam == 0x11:
        sip, dip, sport, dport = struct.unpack("!4s4sHH", block[:12])
    elif fam == 0x21:
        sip, dip, sport, dport = struct.unpack("!16s16sHH", block[:36])
    else:
        return command, fam, None, None
    ip = ipaddress.ip_address
    return command, fam, (str(ip(sip)), sport), (str(ip(dip)), dport)


# -- exact bytes -------------------------------------------------------------------------------

def test_v1_spec_example_tcp4():
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )


def test_v1_spec_worst_case_tcp4():
    a = ("255.255.255.255", 65535)
    assert encode_v1(a, a) == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"


def test_v1_spec_worst_case_tcp6_is_107_bytes():
    a = ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    header = encode_v1(a, a)
    assert header == (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    )
    assert len(header) == 104  # within the spec's 107-byte bound


def test_v1_ipv6_is_compressed():
    assert encode_v1(("2001:db8:0:0:0:0:0:1", 1), ("::1", 443, 0, 0)) == (
        b"PROXY TCP6 2001:db8::1 ::1 1 443\r\n"
    )


def test_v1_unknown():
    assert encode_v1(None, ("127.0.0.1", 443)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("2001:db8::1", 1), ("192.0.2.1", 443)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1("/run/sock", "/run/sock") == b"PROXY UNKNOWN\r\n"


def test_v2_tcp4_exact():
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big")
    )


def test_v2_tcp6_exact():
    header = encode_v2(("2001:db8::1", 1234, 0, 0), ("::1", 443, 0, 0))
    assert header == (
        SIG + b"\x21\x21\x00\x24"
        + bytes.fromhex("20010db8000000000000000000000001") + bytes(15) + b"\x01"
        + b"\x04\xd2\x01\xbb"
    )
    assert len(header) == 16 + 36


def test_v2_local_when_unknown():
    assert encode_v2(None, None) == SIG + b"\x20\x00\x00\x00"
    assert encode_v2(("2001:db8::1", 1), ("192.0.2.1", 443)) == SIG + b"\x20\x00\x00\x00"


# -- normalisation -----------------------------------------------------------------------------

def test_ipv4_mapped_client_becomes_ipv4_when_the_other_side_is_ipv4():
    assert encode_v1(("::ffff:192.0.2.5", 5000, 0, 0), ("192.0.2.1", 443)) == (
        b"PROXY TCP4 192.0.2.5 192.0.2.1 5000 443\r\n"
    )
    assert parse_v2(encode_v2(("::ffff:192.0.2.5", 5000), ("::ffff:192.0.2.1", 443))) == (
        "PROXY", 0x11, ("192.0.2.5", 5000), ("192.0.2.1", 443))


def test_ipv4_mapped_client_stays_ipv6_next_to_a_real_ipv6_address():
    assert encode_v1(("::ffff:192.0.2.5", 5000), ("2001:db8::1", 443)) == (
        b"PROXY TCP6 ::ffff:c000:205 2001:db8::1 5000 443\r\n"
    )


def test_zone_index_is_dropped():
    assert encode_v1(("fe80::1%eth0", 1, 0, 2), ("fe80::2%eth0", 2, 0, 2)) == (
        b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    )


def test_encode_dispatch():
    assert encode("v1", ("192.0.2.1", 1), ("192.0.2.2", 2)).startswith(b"PROXY TCP4")
    assert encode("v2", ("192.0.2.1", 1), ("192.0.2.2", 2)).startswith(SIG)
    with pytest.raises(ValueError, match="v1"):
        encode("v3", None, None)


# -- round trip --------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


def as_ipv4(ip: str):
    addr = ipaddress.ip_address(ip)
    return addr if addr.version == 4 else addr.ipv4_mapped


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), port, port)
def test_round_trip(ips, sport, dport):
    src, dst = (ips[0], sport), (ips[1], dport)
    v1 = parse_v1(encode_v1(src, dst))
    v2 = parse_v2(encode_v2(src, dst))
    if v1[0] == "TCP4":
        # Both were IPv4, or both IPv4-mapped IPv6 (normalised to IPv4).
        expected = tuple((str(as_ipv4(ip)), p) for ip, p in (src, dst))
    else:
        expected = ((str(ipaddress.ip_address(src[0])), sport), (str(ipaddress.ip_address(dst[0])), dport))
    assert v1[1:] == expected
    assert v2[0] == "PROXY" and v2[2:] == expected
