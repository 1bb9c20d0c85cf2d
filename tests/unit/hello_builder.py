"""Build TLS ClientHellos byte by byte, and capture real ones from Python's ssl module.

The synthetic builder makes hellos of any size and shape (huge key shares, odd SNI, duplicate
or truncated extensions) and re-fragments the handshake message over records of chosen sizes.
"""

from __future__ import annotations

import os
import ssl
import struct
from collections.abc import Iterable, Sequence

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_PADDING = 21
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51

X25519MLKEM768 = 0x11EC
X25519MLKEM768_SHARE = 1216  # ML-KEM-768 encapsulation key (1184) + X25519 share (32)
X25519 = 0x001D


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def vec8(data: bytes) -> bytes:
    return u8(len(data)) + data


def vec16(data: bytes) -> bytes:
    return u16(len(data)) + data


def extension(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + vec16(data)


def server_name_ext(*names: bytes | str, name_type: int = 0) -> bytes:
    """server_name extension with one entry per name (normally exactly one host_name)."""
    entries = b"".join(
        u8(name_type) + vec16(n.encode() if isinstance(n, str) else n) for n in names
    )
    return extension(EXT_SERVER_NAME, vec16(entries))


def alpn_ext(protocols: Iterable[bytes | str]) -> bytes:
    names = b"".join(vec8(p.encode() if isinstance(p, str) else p) for p in protocols)
    return extension(EXT_ALPN, vec16(names))


def supported_versions_ext(versions: Iterable[int]) -> bytes:
    return extension(EXT_SUPPORTED_VERSIONS, vec8(b"".join(u16(v) for v in versions)))


def key_share_ext(shares: Sequence[tuple[int, int]]) -> bytes:
    """key_share with (group, share length) entries; share bytes are random, as on the wire."""
    entries = b"".join(u16(group) + vec16(os.urandom(size)) for group, size in shares)
    return extension(EXT_KEY_SHARE, vec16(entries))


def padding_ext(size: int) -> bytes:
    return extension(EXT_PADDING, bytes(size))


def client_hello_body(
    extensions: Sequence[bytes] | None = (),
    legacy_version: int = 0x0303,
    session_id: bytes = bytes(32),
    cipher_suites: Sequence[int] = (0x1301, 0x1302, 0xC02F),
    compression: bytes = b"\x00",
) -> bytes:
    """The ClientHello body; `extensions=None` omits the extensions block (pre-TLS-1.3 style)."""
    body = (
        u16(legacy_version)
        + bytes(range(32))  # random
        + vec8(session_id)
        + vec16(b"".join(u16(c) for c in cipher_suites))
        + vec8(compression)
    )
    if extensions is not None:
        body += vec16(b"".join(extensions))
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + u24(len(body)) + body


def build_hello(
    sni: bytes | str | None = "example.com",
    alpn: Sequence[bytes | str] = (),
    versions: Sequence[int] | None = (0x0304, 0x0303),
    key_shares: Sequence[tuple[int, int]] = ((X25519, 32),),
    padding: int | None = None,
    extra: Sequence[bytes] = (),
    legacy_version: int = 0x0303,
) -> bytes:
    """A ClientHello handshake message (4-byte header included) shaped like a modern client's."""
    exts: list[bytes] = []
    if sni is not None:
        exts.append(server_name_ext(sni))
    if alpn:
        exts.append(alpn_ext(alpn))
    if versions is not None:
        exts.append(supported_versions_ext(versions))
    if key_shares:
        exts.append(key_share_ext(key_shares))
    exts.extend(extra)
    if padding is not None:
        exts.append(padding_ext(padding))
    return handshake(client_hello_body(exts, legacy_version=legacy_version))


def records(
    message: bytes,
    sizes: Sequence[int] | None = None,
    version: int = 0x0301,
    content_type: int = 22,
) -> bytes:
    """Wrap `message` in records. `sizes` gives fragment sizes in turn; the last one repeats,
    and whatever is left goes into a final record. None: one record (or 2^14-byte records)."""
    if sizes is None:
        sizes = [2**14]
    out = bytearray()
    pos = 0
    i = 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        assert size > 0, "records of zero length are what the reader must reject, build by hand"
        chunk = message[pos : pos + size]
        out += u8(content_type) + u16(version) + vec16(chunk)
        pos += len(chunk)
        i += 1
    return bytes(out)


def record(payload: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    """One record around `payload`, whatever its length (including zero)."""
    return u8(content_type) + u16(version) + vec16(payload)


def real_hello(
    server_hostname: str | None = "example.com",
    alpn: Sequence[str] = (),
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The bytes OpenSSL (via Python's ssl) sends first for these settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    else:  # pragma: no cover - cannot complete without a server
        raise AssertionError("handshake completed without a server")
    data = outgoing.read()
    assert data, "OpenSSL produced no ClientHello"
    return data
