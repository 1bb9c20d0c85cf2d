"""Sans-IO reader for the TLS ClientHello: bytes in, SNI / ALPN / versions out.

The proxy peeks at the first bytes a client sends, calls `parse_client_hello` on everything
seen so far (or feeds a `ClientHelloReader`), and gets exactly one of three outcomes:

* `ClientHello`  the whole hello arrived and parsed; `consumed` bytes of records carried it.
* `NeedMore`     nothing is wrong yet; read more bytes and ask again.
* `Rejected`     the bytes are not a ClientHello we can route; `reason` is a stable metric label
                 (one of `REJECT_REASONS`), `detail` a sentence for the log.

No exception escapes `parse_client_hello` for any input. The reader decides as early as the
bytes allow (an HTTP request is rejected on its first byte, an oversize hello on its 4-byte
handshake header) and is prefix-monotone: once a prefix of the stream gives a decision, every
longer prefix gives the same outcome, so re-parsing a growing peek buffer is safe.

Wire format (RFC 8446 sections 4.1.2 and 5.1, RFC 5246 section 7.4.1.2):

    record    := type(1)=22 version(2) length(2) fragment[length]
    handshake := msg_type(1)=1 length(3) body[length]     (may span several records)
    body      := legacy_version(2) random(32) session_id<0..32> cipher_suites<2..2^16-2>
                 compression_methods<1..2^8-1> [extensions<0..2^16-1>]
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, field, fields

__all__ = [
    "MAX_CLIENT_HELLO",
    "MAX_RECORD_PAYLOAD",
    "MAX_HELLO_RECORDS",
    "REJECT_REASONS",
    "ClientHello",
    "NeedMore",
    "Rejected",
    "parse_client_hello",
    "ClientHelloReader",
    "tls_alert",
    "alert_for",
    "PARSER",
    "PARSER_DETAIL",
    "PARSER_ENV",
    "select_parser",
    "DECODE_ERROR",
    "UNEXPECTED_MESSAGE",
    "HANDSHAKE_FAILURE",
    "ILLEGAL_PARAMETER",
    "INTERNAL_ERROR",
    "PROTOCOL_VERSION",
    "UNRECOGNIZED_NAME",
]

# ---------------------------------------------------------------------------------------------
# Limits, each with the reason for its number.
# ---------------------------------------------------------------------------------------------

# Largest ClientHello handshake body we wait for. nginx's ssl_preread reads the hello out of a
# `preread_buffer_size` of 16k and HAProxy's req.ssl_sni needs it inside a 16384-byte tune.bufsize,
# so a client whose hello is larger already fails behind the two most common SNI routers. Real
# hellos are far smaller: ~250-600 bytes classically, ~1.8 KB with an X25519MLKEM768 key share
# (1216 bytes), ~2.5 KB with a large PSK ticket. 16 KiB leaves room for the next post-quantum
# share sizes while bounding what one unauthenticated connection makes us buffer.
MAX_CLIENT_HELLO = 16384

# RFC 8446 section 5.1: "The length MUST NOT exceed 2^14 bytes" for a plaintext record.
MAX_RECORD_PAYLOAD = 2**14

# How many records one hello may be split over. Legitimate splitting is coarse: the smallest
# max_fragment_length (RFC 6066) is 512 bytes, i.e. 32 records for 16 KiB, and DPI-evasion
# clients split into a handful of records. Each record costs one loop step on every re-parse of
# the peek buffer, so this caps that work (and the 5-byte headers we buffer) for a client that
# dribbles out 1-byte records.
MAX_HELLO_RECORDS = 256

# RFC 1035 section 2.3.4 / RFC 6066 section 3: a host name is at most 253 characters without the
# trailing dot, each label 1-63 characters.
MAX_HOST_NAME = 253

# Smallest legal body: version(2) random(32) session_id len(1) one suite(2+2) one method(1+1).
_MIN_BODY = 2 + 32 + 1 + 4 + 2

# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------

# Every reason a `Rejected` can carry. They are Prometheus label values
# (sniproxy_client_hello_failures_total{reason=...}): add, never rename.
REJECT_REASONS: tuple[str, ...] = (
    "not_tls",  # the first bytes are not a TLS record at all (plain HTTP, PROXY header, junk)
    "sslv2",  # an SSLv2-compatible hello (no extensions, so no SNI; nothing modern sends it)
    "bad_version",  # record or hello version is not 3.x
    "bad_length",  # zero-length or oversized record, or a length that overruns its container
    "too_large",  # the handshake header announces more than the limit
    "too_fragmented",  # the hello is spread over more than MAX_HELLO_RECORDS records
    "not_client_hello",  # the first handshake message is something else
    "unexpected_record",  # a non-handshake record where the hello (or its rest) should be
    "malformed",  # an extension is inconsistent, duplicated or truncated
    "bad_sni",  # server_name is empty, too long, non-ASCII or has characters a host cannot have
)


@dataclass(frozen=True)
class ClientHello:
    """A complete, parsed ClientHello."""

    sni: str | None  # lower-cased, ASCII (IDNA A-label form), no trailing dot
    alpn: tuple[str, ...]  # protocol names in client preference order
    versions: tuple[int, ...]  # supported_versions minus GREASE, or (legacy_version,) if absent
    legacy_version: int
    consumed: int  # bytes of the TLS records that carried the whole hello
    records: int = 1  # how many records the hello was split over
    extension_types: tuple[int, ...] = ()  # in wire order, for fingerprinting and debugging


@dataclass(frozen=True)
class NeedMore:
    """Feed more bytes and parse again; `have` bytes were seen.

    `decides_at` (0: unknown) is the buffer length before which parsing again cannot change
    the outcome: the end of the record (or record header) being received. An IO layer can
    wait for that many bytes (SO_RCVLOWAT) instead of re-parsing a growing buffer on every
    segment, as h11's receive buffer remembers how far it searched.
    """

    have: int
    decides_at: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Rejected:
    """The bytes cannot be routed as a ClientHello."""

    reason: str  # one of REJECT_REASONS
    detail: str  # human text for the log

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:      # a programming error, not bad input
            raise ValueError(f"Rejected reason {self.reason!r} is not one of {REJECT_REASONS}")


Outcome = ClientHello | NeedMore | Rejected

# ---------------------------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------------------------

# Alert descriptions (RFC 8446 section 6) the proxy sends before closing.
UNEXPECTED_MESSAGE = 10
HANDSHAKE_FAILURE = 40
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
PROTOCOL_VERSION = 70
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112

# The alert for each reject reason: what OpenSSL (so nginx or HAProxy terminating TLS) sends for
# the same hello, so a client reports the same error behind the proxy as in front of a server.
# nginx's ssl_preread and HAProxy's req.ssl_sni (which do not terminate TLS either) send none.
#   malformed structure: decode_error, as OpenSSL's extension and handshake parsers;
#   another message or record type than a ClientHello: unexpected_message, as OpenSSL's state
#     machine;
#   bad_sni: unrecognized_name, as OpenSSL for an over-long name or one with a NUL, and nginx
#     (ssl_reject_handshake) for a name no server has; not illegal_parameter (47), which RFC 8446
#     keeps for fields that parse but are inconsistent, and which no peer sends here;
#   too_large: illegal_parameter, as OpenSSL's "excessive message size";
#   bad_version: protocol_version.
# Bytes that are not TLS records (plain HTTP, a PROXY header, SSLv2) get no alert: the peer
# would not understand one (an SSLv2 client cannot parse a TLS record).
_ALERTS = {
    "bad_length": DECODE_ERROR,
    "too_fragmented": DECODE_ERROR,
    "not_client_hello": UNEXPECTED_MESSAGE,
    "unexpected_record": UNEXPECTED_MESSAGE,
    "malformed": DECODE_ERROR,
    "bad_sni": UNRECOGNIZED_NAME,
    "too_large": ILLEGAL_PARAMETER,
    "bad_version": PROTOCOL_VERSION,
}


def alert_for(reason: str) -> int | None:
    """The alert description to send for a Rejected reason, or None (not TLS: send nothing)."""
    return _ALERTS.get(reason)

_ALERT = 21
_FATAL = 2


def tls_alert(description: int, version: int = 0x0303) -> bytes:
    """A fatal alert record: type 21, `version`, length 2, level 2, `description`."""
    if not 0 <= description <= 0xFF:
        raise ValueError(f"alert description {description} is not a byte (0-255)")
    if not 0 <= version <= 0xFFFF:
        raise ValueError(f"record version {version:#x} does not fit in two bytes")
    return struct.pack(">BHHBB", _ALERT, version, 2, _FATAL, description)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_HOST_NAME = 0

_RECORD_HEADER = struct.Struct(">BHH")  # type, version, length
_U16 = struct.Struct(">H")
_U16_PAIR = struct.Struct(">HH")

_CONTENT_TYPES = {
    20: "change_cipher_spec",
    21: "alert",
    22: "handshake",
    23: "application_data",
    24: "heartbeat",
}
_HANDSHAKE_TYPES = {
    0: "hello_request",
    1: "client_hello",
    2: "server_hello",
    4: "new_session_ticket",
    8: "encrypted_extensions",
    11: "certificate",
    12: "server_key_exchange",
    13: "certificate_request",
    14: "server_hello_done",
    15: "certificate_verify",
    16: "client_key_exchange",
    20: "finished",
}
# Methods of RFC 9110 plus WebDAV/HTTP2-preface ones clients send first on a wrong port.
_HTTP_PREFIXES = tuple(
    m + b" "
    for m in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT", b"PATCH",
              b"TRACE", b"PRI", b"PROPFIND")
)
_PROXY_V1 = b"PROXY "
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"

# Letters, digits, hyphen and underscore (seen in real names, e.g. _dmarc-style hosts and some
# internal zones), labels of 1-63, an optional trailing dot. Hyphens at label edges are let
# through: routing, not hostname policing, is our job, and the characters that could inject into
# logs, labels or patterns are all excluded. Unambiguous, so the match is linear.
_HOST_NAME_RE = re.compile(rb"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")


class _Reject(Exception):
    """Internal: unwinds the body parser; turned into `Rejected` before returning."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _preview(data: bytes | bytearray | memoryview, n: int = 24) -> str:
    """The first bytes as a short, log-safe repr."""
    head = bytes(data[:n])
    return repr(head) + ("..." if len(data) > n else "")


def _version_ok(version: int) -> bool:
    # SSL 3.0 (0x0300) .. TLS 1.3 (0x0304). TLS 1.3 froze every legacy version field at or
    # below 0x0303, so anything else is not a TLS peer.
    return 0x0300 <= version <= 0x0304


def _is_grease(value: int) -> bool:
    # RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA.
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


# ---------------------------------------------------------------------------------------------
# The compiled common case (issue 14)
# ---------------------------------------------------------------------------------------------

# sniproxy.proxy._clienthello (_clienthello.c) parses the hello nearly every client sends, the
# whole of it in one complete record, ~20x cheaper than the code below (0.55 us against 11). It
# answers only when the code below would return a ClientHello from its "Fast path" block, and
# then returns the same ClientHello; for anything else it returns None and the code below
# decides (so rejections keep their reasons and messages). This module stays the reference.
try:
    from sniproxy.proxy import _clienthello
    _COMPILED_MISSING = ""
except ImportError as _exc:          # not built (no compiler / python3-dev at install)
    _clienthello = None
    _COMPILED_MISSING = str(_exc)

# SNI_PROXY_CLIENTHELLO=python: the Python parser only, even where the compiled one could run
# (operators ruling it out, tests of both parsers, before/after benchmarks).
PARSER_ENV = "SNI_PROXY_CLIENTHELLO"
PARSER = "python"                    # which parser parse_client_hello runs: compiled | python
PARSER_DETAIL = ""                   # why the Python one, when it is
_fast = None                         # _clienthello.parse when PARSER is "compiled"


def select_parser(wanted: str | None = None) -> tuple[str, str]:
    """Choose the parser from `wanted` (default: $SNI_PROXY_CLIENTHELLO); sets and returns
    (PARSER, PARSER_DETAIL): ("compiled", "") or ("python", why)."""
    global PARSER, PARSER_DETAIL, _fast
    if wanted is None:
        wanted = os.environ.get(PARSER_ENV, "")
    wanted = wanted.strip().lower()
    if wanted not in ("", "compiled", "python"):
        logging.getLogger("sniproxy").warning(
            "%s=%r is not a ClientHello parser: use python or compiled (or leave it unset); "
            "the default runs", PARSER_ENV, wanted)
    if wanted == "python":
        PARSER, PARSER_DETAIL = "python", f"{PARSER_ENV}=python in the environment"
    elif _clienthello is None:
        PARSER, PARSER_DETAIL = "python", (
            f"the compiled parser sniproxy.proxy._clienthello is not built ({_COMPILED_MISSING}); "
            "fix: install gcc and python3-dev, then reinstall the package")
    else:
        try:
            # The C code fills these 7 fields in this order; a field added to ClientHello
            # without teaching _clienthello.c lands here, not in half-built objects.
            _clienthello.configure(ClientHello, tuple(f.name for f in fields(ClientHello)))
            PARSER, PARSER_DETAIL = "compiled", ""
        except (TypeError, ValueError) as exc:
            PARSER, PARSER_DETAIL = "python", (
                f"the compiled parser does not match this ClientHello ({exc}); fix: rebuild "
                "the package (pip install -e .)")
    _fast = _clienthello.parse if PARSER == "compiled" else None
    return PARSER, PARSER_DETAIL


def parse_client_hello(
    buf: bytes | bytearray | memoryview, limit: int = MAX_CLIENT_HELLO
) -> Outcome:
    """Parse the ClientHello at the start of `buf` (everything the client sent so far).

    `limit` caps the handshake body length. Never raises for any content of `buf`.
    """
    try:
        if _fast is not None:
            hello = _fast(buf, limit)
            if hello is not None:
                return hello
        return _parse(buf, limit)
    except _Reject as rej:
        return Rejected(rej.reason, rej.detail)
    except Exception as exc:  # pragma: no cover - a bug here must not kill the connection task
        return Rejected("malformed", f"internal parser error {type(exc).__name__}: {exc}")


def _parse(buf: bytes | bytearray | memoryview, limit: int) -> Outcome:
    n = len(buf)
    if n == 0:
        return NeedMore(0)
    if buf[0] != _HANDSHAKE:
        return _reject_start(buf)

    # Fast path: the whole hello in one complete record, the case for nearly every client.
    if n >= 9:
        rtype, rversion, rlength = _RECORD_HEADER.unpack_from(buf, 0)
        if (
            _version_ok(rversion)
            and 4 <= rlength <= MAX_RECORD_PAYLOAD
            and n >= 5 + rlength
            and buf[5] == _CLIENT_HELLO
        ):
            body_len = int.from_bytes(buf[6:9], "big")
            if _MIN_BODY <= body_len <= limit and 4 + body_len <= rlength:
                body = bytes(buf[9 : 9 + body_len])
                return _parse_body(body, consumed=5 + rlength, records=1)
    return _parse_records(buf, limit)


def _parse_records(buf: bytes | bytearray | memoryview, limit: int) -> Outcome:
    """General path: walk records in stream order, reassembling the handshake message.

    Checks run in the order the bytes arrive, which is what makes the parser prefix-monotone.
    """
    n = len(buf)
    pos = 0
    records = 0
    fragments: list[tuple[int, int]] = []  # (start, end) of handshake bytes in buf
    have = 0  # handshake bytes seen so far
    need = -1  # 4 + body length, once the handshake header is known
    while True:
        _check_record_start(buf, pos, have, need)
        if pos + 5 > n:
            # The next check: the record's type byte, its version, then its length.
            return NeedMore(n, pos + 1 if n <= pos else pos + 3 if n < pos + 3 else pos + 5)
        rlength = _record_length(buf, pos)
        records += 1
        if records > MAX_HELLO_RECORDS:
            raise _Reject(
                "too_fragmented",
                f"the ClientHello is still incomplete after {MAX_HELLO_RECORDS} records "
                f"({have} of {need} bytes); legitimate clients split it into a few records",
            )
        start = pos + 5
        end = start + rlength
        avail = min(end, n)
        header_at = -1
        if need < 0:
            # The handshake header, as soon as its bytes are here (it may straddle records).
            need = _handshake_length(buf, fragments, have, start, avail, limit)
            # Where its next check runs: the message type byte, then the whole header.
            header_at = start + 1 if have == 0 and avail == start else start + 4 - have
        fragments.append((start, avail))
        have += avail - start
        if avail < end:
            # The record itself is incomplete: nothing changes before its end, or before the
            # handshake header's checks if they are still to come.
            return NeedMore(n, min(end, header_at) if need < 0 else end)
        pos = end
        if need >= 0 and have >= need:
            break

    if len(fragments) == 1:
        s, _ = fragments[0]
        body = bytes(buf[s + 4 : s + need])
    else:
        body = b"".join(bytes(buf[s:e]) for s, e in fragments)[4:need]
    # Bytes after the hello inside its last record are not ours to judge: they are forwarded
    # with the rest and the backend's TLS stack will reject them.
    return _parse_body(body, consumed=pos, records=records)


def _check_record_start(buf, pos: int, have: int, need: int) -> None:
    """The type and version bytes of the record at `pos`, as far as they arrived."""
    n = len(buf)
    if pos < n and buf[pos] != _HANDSHAKE:
        ctype = buf[pos]
        name = _CONTENT_TYPES.get(ctype, f"unknown type {ctype}")
        raise _Reject(
            "unexpected_record",
            f"a {name} record arrived at byte {pos} while the ClientHello was incomplete "
            f"({have} of {need if need >= 0 else '?'} handshake bytes); RFC 8446 forbids "
            "interleaving other records with a handshake message",
        )
    if pos + 3 <= n:
        rversion = (buf[pos + 1] << 8) | buf[pos + 2]
        if not _version_ok(rversion):
            raise _Reject(
                "bad_version",
                f"record at byte {pos} has version {rversion:#06x}, TLS uses 0x0300-0x0304; "
                f"the client is not speaking TLS (first bytes {_preview(buf)})",
            )


def _record_length(buf, pos: int) -> int:
    """The payload length of the complete record header at `pos`, checked."""
    rlength = (buf[pos + 3] << 8) | buf[pos + 4]
    if rlength == 0:
        raise _Reject(
            "bad_length",
            f"zero-length handshake record at byte {pos}; RFC 8446 section 5.1 forbids them",
        )
    if rlength > MAX_RECORD_PAYLOAD:
        raise _Reject(
            "bad_length",
            f"record at byte {pos} claims {rlength} bytes, more than the TLS maximum of "
            f"{MAX_RECORD_PAYLOAD}",
        )
    return rlength


def _handshake_length(buf, fragments: list[tuple[int, int]], have: int, start: int,
                      avail: int, limit: int) -> int:
    """4 + the ClientHello body length once its 4-byte header is in, else -1."""
    if have == 0 and avail > start and buf[start] != _CLIENT_HELLO:
        mtype = buf[start]
        name = _HANDSHAKE_TYPES.get(mtype, f"unknown type {mtype}")
        hint = " (the peer is a TLS server, not a client)" if mtype == 2 else ""
        raise _Reject(
            "not_client_hello",
            f"first handshake message is {name}, expected client_hello{hint}",
        )
    if have + (avail - start) < 4:
        return -1
    header = b"".join(bytes(buf[s:e]) for s, e in fragments) + bytes(buf[start : start + 4 - have])
    body_len = int.from_bytes(header[1:4], "big")
    if body_len > limit:
        raise _Reject(
            "too_large",
            f"ClientHello announces {body_len} bytes, more than the limit of {limit}; "
            "real hellos, post-quantum key shares included, are under 3 KB",
        )
    if body_len < _MIN_BODY:
        raise _Reject(
            "bad_length",
            f"ClientHello announces {body_len} bytes, fewer than the {_MIN_BODY} its "
            "fixed fields need",
        )
    return 4 + body_len


def _reject_start(buf: bytes | bytearray | memoryview) -> Outcome:
    """The first byte is not a handshake record: classify what the client sent instead."""
    first = buf[0]
    if first & 0x80:
        # SSLv2 record header: 2 bytes with the high bit set, then msg_type 1 (CLIENT-HELLO).
        if len(buf) < 3:
            return NeedMore(len(buf))
        if buf[2] == 1:
            return Rejected(
                "sslv2",
                "SSLv2-compatible ClientHello: it has no extensions, so no SNI to route on; "
                "the client must be configured for TLS 1.0 or newer",
            )
        return Rejected("not_tls", f"not a TLS record (first bytes {_preview(buf)})")
    if first in _CONTENT_TYPES:
        # A TLS record of another type (alert, application data, ...) or junk starting with one
        # of those bytes: the version tells them apart.
        if len(buf) < 3:
            return NeedMore(len(buf))
        version = (buf[1] << 8) | buf[2]
        if _version_ok(version):
            return Rejected(
                "unexpected_record",
                f"the first record is {_CONTENT_TYPES[first]} ({first}), a connection must "
                "start with a handshake record (22) carrying the ClientHello",
            )
        return Rejected("not_tls", f"not a TLS record (first bytes {_preview(buf)})")
    head = bytes(buf[:16])
    if any(p.startswith(head) or head.startswith(p) for p in _HTTP_PREFIXES):
        why = (
            "the bytes look like a plain HTTP request: the client sent http:// to a TLS port; "
            "use https:// or point plain HTTP at an HTTP listener"
        )
    elif _PROXY_V1.startswith(head[:6]) or _PROXY_V2.startswith(head[:12]):
        why = (
            "the bytes look like a PROXY protocol header: a load balancer in front adds it; "
            "turn it off there or accept PROXY protocol on this listener"
        )
    else:
        why = "a TLS connection must start with a handshake record (byte 0x16)"
    return Rejected("not_tls", f"not TLS: first bytes {_preview(buf)}; {why}")


def _parse_body(body: bytes, consumed: int, records: int) -> Outcome:
    """Parse a complete ClientHello body (after the 4-byte handshake header)."""
    end = len(body)
    legacy_version = (body[0] << 8) | body[1]
    if not _version_ok(legacy_version):
        raise _Reject(
            "bad_version",
            f"ClientHello legacy_version is {legacy_version:#06x}, TLS uses 0x0300-0x0304",
        )
    pos = 34  # version + random
    sid_len = body[pos]
    if sid_len > 32:
        raise _Reject("malformed", f"session_id is {sid_len} bytes, at most 32 are allowed")
    pos += 1 + sid_len
    pos = _skip_vector(body, pos, 2, "cipher_suites", minimum=2, even=True)
    pos = _skip_vector(body, pos, 1, "compression_methods", minimum=1)

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] | None = None
    types: list[int] = []
    if pos < end:  # extensions are optional before TLS 1.3
        if pos + 2 > end:
            raise _Reject("bad_length", "ClientHello ends inside the extensions length")
        ext_total = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if pos + ext_total != end:
            raise _Reject(
                "bad_length",
                f"extensions block claims {ext_total} bytes but the ClientHello leaves "
                f"{end - pos}",
            )
        seen: set[int] = set()
        while pos < end:
            if pos + 4 > end:
                raise _Reject("malformed", "extensions block ends inside an extension header")
            etype, elen = _U16_PAIR.unpack_from(body, pos)
            pos += 4
            if pos + elen > end:
                raise _Reject(
                    "malformed",
                    f"extension {etype} claims {elen} bytes, only {end - pos} remain",
                )
            if etype in seen:
                raise _Reject(
                    "malformed",
                    f"extension {etype} appears twice; RFC 8446 section 4.2 forbids duplicates",
                )
            seen.add(etype)
            types.append(etype)
            # Slice only the three extensions we read: a hello carries 10-20 of them.
            if etype == _EXT_SERVER_NAME:
                sni = _parse_server_name(body[pos : pos + elen])
            elif etype == _EXT_ALPN:
                alpn = _parse_alpn(body[pos : pos + elen])
            elif etype == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(body[pos : pos + elen])
            pos += elen

    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions if versions is not None else (legacy_version,),
        legacy_version=legacy_version,
        consumed=consumed,
        records=records,
        extension_types=tuple(types),
    )


def _skip_vector(
    body: bytes, pos: int, len_size: int, name: str, minimum: int, even: bool = False
) -> int:
    """Step over a length-prefixed vector of the fixed part, checking it fits the message."""
    if pos + len_size > len(body):
        raise _Reject("bad_length", f"ClientHello ends before the {name} length")
    length = body[pos] if len_size == 1 else (body[pos] << 8) | body[pos + 1]
    pos += len_size
    if pos + length > len(body):
        raise _Reject(
            "bad_length",
            f"{name} claims {length} bytes, the ClientHello has {len(body) - pos} left",
        )
    if length < minimum or (even and length % 2):
        raise _Reject("malformed", f"{name} has an invalid length {length}")
    return pos + length


def _parse_server_name(data: bytes) -> str | None:
    """RFC 6066 section 3: ServerNameList of (name_type, opaque name<1..2^16-1>)."""
    if len(data) < 2:
        raise _Reject("malformed", "server_name extension is too short for its list length")
    list_len = _U16.unpack_from(data, 0)[0]
    if list_len + 2 != len(data) or list_len == 0:
        raise _Reject(
            "malformed",
            f"server_name list claims {list_len} bytes in a {len(data)}-byte extension",
        )
    host: bytes | None = None
    pos = 2
    while pos < len(data):
        if pos + 3 > len(data):
            raise _Reject("malformed", "server_name list ends inside an entry header")
        name_type = data[pos]
        name_len = _U16.unpack_from(data, pos + 1)[0]
        pos += 3
        if pos + name_len > len(data):
            raise _Reject("malformed", f"server name claims {name_len} bytes, past the list end")
        if name_type == _HOST_NAME:
            if host is not None:
                raise _Reject("malformed", "two host_name entries; RFC 6066 allows one")
            host = data[pos : pos + name_len]
        pos += name_len  # other name types are defined as skippable
    if host is None:
        return None
    return _validate_host_name(host)


def _validate_host_name(raw: bytes) -> str:
    """ASCII host name -> lower-case str without trailing dot, or `bad_sni`."""
    if not raw:
        raise _Reject("bad_sni", "server_name host_name is empty")
    if not raw.isascii():
        # RFC 6066 requires A-labels. Decoding UTF-8 through an IDNA mapping would make routing
        # depend on IDNA 2003 vs 2008 differences (faß.de -> fass.de or xn--fa-hia.de), so we
        # refuse and name the correct form when there is one.
        suggestion = ""
        try:
            a_label = raw.decode("utf-8").encode("idna").decode("ascii")
            suggestion = f" (the A-label form would be {a_label!r})"
        except Exception:
            pass
        raise _Reject(
            "bad_sni",
            f"server name {_preview(raw, 64)} is not ASCII; SNI must carry internationalized "
            f"names as IDNA A-labels (xn--...){suggestion}: fix the client",
        )
    if len(raw.rstrip(b".")) > MAX_HOST_NAME:
        raise _Reject(
            "bad_sni", f"server name is {len(raw)} bytes, a host name has at most {MAX_HOST_NAME}"
        )
    if _HOST_NAME_RE.fullmatch(raw) is None:
        raise _Reject(
            "bad_sni",
            f"server name {_preview(raw, 64)} is not a host name (letters, digits, '-', '_', "
            "dot-separated labels of 1-63)",
        )
    return raw.rstrip(b".").lower().decode("ascii")


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    """RFC 7301 section 3.1: ProtocolNameList of opaque ProtocolName<1..2^8-1>."""
    if len(data) < 2:
        raise _Reject("malformed", "ALPN extension is too short for its list length")
    list_len = _U16.unpack_from(data, 0)[0]
    if list_len + 2 != len(data) or list_len < 2:
        raise _Reject(
            "malformed", f"ALPN list claims {list_len} bytes in a {len(data)}-byte extension"
        )
    names: list[str] = []
    pos = 2
    while pos < len(data):
        name_len = data[pos]
        pos += 1
        if name_len == 0 or pos + name_len > len(data):
            raise _Reject("malformed", f"ALPN protocol name of {name_len} bytes does not fit")
        # Protocol ids are opaque bytes; backslashreplace keeps odd ones visible and never fails.
        names.append(data[pos : pos + name_len].decode("ascii", "backslashreplace"))
        pos += name_len
    return tuple(names)


def _parse_supported_versions(data: bytes) -> tuple[int, ...]:
    """RFC 8446 section 4.2.1, ClientHello form: ProtocolVersion versions<2..254>."""
    if not data or data[0] + 1 != len(data) or data[0] < 2 or data[0] % 2:
        raise _Reject("malformed", f"supported_versions has an invalid {len(data)}-byte body")
    count = data[0] // 2
    values = struct.unpack_from(f">{count}H", data, 1)
    return tuple(v for v in values if not _is_grease(v))


# ---------------------------------------------------------------------------------------------
# Incremental wrapper
# ---------------------------------------------------------------------------------------------


class ClientHelloReader:
    """Buffers what the client sends until the ClientHello is decided.

    `feed(data)` returns the current outcome; after a `ClientHello` or `Rejected` it keeps
    returning that same outcome. `buffered` holds every byte fed, for forwarding upstream.
    Before the decision the buffer is bounded: one always comes within limit + 4 +
    5 * MAX_HELLO_RECORDS + MAX_RECORD_PAYLOAD bytes. After it, the caller stops feeding and
    relays `buffered` plus whatever it reads next.

    Feeding stays linear in the bytes fed, however they are cut (h11's receive buffer
    remembers how far it searched the same way): the buffer is parsed again only once it
    reaches the length `NeedMore.decides_at` named, so a hello fed one byte at a time is
    parsed a few times per record, not once per byte.
    """

    def __init__(self, limit: int = MAX_CLIENT_HELLO) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._outcome: Outcome = NeedMore(0)
        self.parses = 0                 # how often the buffer was parsed (tests prove linearity)

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)

    @property
    def outcome(self) -> Outcome:
        return self._outcome

    def feed(self, data: bytes | bytearray | memoryview) -> Outcome:
        if not isinstance(self._outcome, NeedMore):
            self._buf += data
            return self._outcome
        self._buf += data
        if len(self._buf) < self._outcome.decides_at:
            self._outcome = NeedMore(len(self._buf), self._outcome.decides_at)
        elif data or not self._buf:
            self.parses += 1
            self._outcome = parse_client_hello(self._buf, self.limit)
        return self._outcome


select_parser()
