"""Sans-IO PROXY protocol header encoder, versions 1 (text) and 2 (binary).

Reference: haproxy's doc/proxy-protocol.txt. The header is the first thing the backend reads, before
the client's ClientHello, and tells it who the real client was.

`src` is the client's address (the peer of the accepted socket), `dst` the address the client
connected to (the proxy's local address). Both are `(ip, port)` tuples; longer socket-address
tuples such as IPv6 `(ip, port, flowinfo, scope_id)` are accepted and trimmed. When an address is
missing, or the two are of different families, the header says so instead of lying: v1 sends
`PROXY UNKNOWN\\r\\n`, v2 sends the LOCAL command with no address block (the backend then uses the
connection's own addresses).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_VERSION = 0x20
V2_CMD_LOCAL = 0x00
V2_CMD_PROXY = 0x01
V2_FAM_UNSPEC = 0x00
V2_FAM_TCP4 = 0x11
V2_FAM_TCP6 = 0x21

V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

SockAddr = Sequence  # (ip: str, port: int, ...) as returned by getpeername()
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(addr: SockAddr | None) -> tuple[IPAddr, int] | None:
    if addr is None or len(addr) < 2:
        return None
    host, port = addr[0], addr[1]
    if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        return None
    try:
        # Drop a zone index ("fe80::1%eth0"): the header has no room for it.
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # e.g. a unix socket path: unknown to the protocol
    return ip, port


def normalize(
    src: SockAddr | None, dst: SockAddr | None
) -> tuple[tuple[IPAddr, int], tuple[IPAddr, int]] | None:
    """Both addresses of one family, or None when that is impossible.

    A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 (::ffff:a.b.c.d); such an address is
    turned back into IPv4 when the other side is IPv4 (or mapped too), so the backend sees TCP4.
    """
    s, d = _parse(src), _parse(dst)
    if s is None or d is None:
        return None
    (sip, sport), (dip, dport) = s, d
    s4 = sip.ipv4_mapped if sip.version == 6 else sip
    d4 = dip.ipv4_mapped if dip.version == 6 else dip
    if s4 is not None and d4 is not None:
        return (s4, sport), (d4, dport)
    if sip.version != dip.version:
        return None
    return (sip, sport), (dip, dport)


def encode_v1(src: SockAddr | None, dst: SockAddr | None) -> bytes:
    """`PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\\r\\n`, or `PROXY UNKNOWN\\r\\n`."""
    pair = normalize(src, dst)
    if pair is None:
        return V1_UNKNOWN
    (sip, sport), (dip, dport) = pair
    proto = "TCP4" if sip.version == 4 else "TCP6"
    # ipaddress prints the compressed RFC 5952 form, as haproxy does.
    return f"PROXY {proto} {sip} {dip} {sport} {dport}\r\n".encode("ascii")


def encode_v2(src: SockAddr | None, dst: SockAddr | None) -> bytes:
    """Binary header: PROXY command with a TCP4/TCP6 address block, or the LOCAL command."""
    pair = normalize(src, dst)
    if pair is None:
        return V2_SIGNATURE + bytes([V2_VERSION | V2_CMD_LOCAL, V2_FAM_UNSPEC]) + b"\x00\x00"
    (sip, sport), (dip, dport) = pair
    family = V2_FAM_TCP4 if sip.version == 4 else V2_FAM_TCP6
    block = sip.packed + dip.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return (
        V2_SIGNATURE
        + bytes([V2_VERSION | V2_CMD_PROXY, family])
        + len(block).to_bytes(2, "big")
        + block
    )


def encode(version: str, src: SockAddr | None, dst: SockAddr | None) -> bytes:
    """Dispatch on the config value: "v1" or "v2"."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ValueError(f"unknown PROXY protocol version {version!r}: expected \"v1\" or \"v2\"")
