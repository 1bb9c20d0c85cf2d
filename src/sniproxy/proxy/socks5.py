"""Sans-IO SOCKS5 client: RFC 1928 CONNECT with RFC 1929 username/password auth.

No sockets here. The caller owns the IO and drives the state machine::

    client = Socks5Client("example.com", 443, username="u", password="p", upstream="corp")
    send(client.initial_bytes())
    while True:
        for event in client.receive_data(recv()):      # raises Socks5Error
            if isinstance(event, SendData):
                send(event.data)
            elif isinstance(event, Connected):
                # event.leftover: bytes the *backend* already sent after the server's reply;
                # they belong to the client and must be delivered before anything else.
                ...

`receive_data` buffers partial replies, so bytes may arrive split anywhere (one byte at a time
works). `receive_data(b"")` means the server closed the connection (EOF) and raises an error that
says at which step it happened, since many servers (pproxy) close instead of answering a failure. Every protocol failure raises `Socks5Error` whose `code` is a short stable slug (usable as a
metric label) and whose `message` tells what happened and what to do.

Domain names are sent as ATYP 3 so that the SOCKS server resolves them (remote DNS: the name may only
be resolvable from the server's side); IP literals are sent as ATYP 1 (IPv4) or ATYP 4 (IPv6).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

SOCKS_VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation version

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

# RFC 1928 encodes the domain length in one byte; RFC 1929 does the same for user and password.
MAX_FIELD_LEN = 255

# REP codes of RFC 1928 section 6: (slug, human text).
REPLY_ERRORS: dict[int, tuple[str, str]] = {
    0x01: ("general_failure", "general SOCKS server failure"),
    0x02: ("not_allowed", "connection not allowed by the SOCKS server's ruleset"),
    0x03: ("network_unreachable", "network unreachable from the SOCKS server"),
    0x04: ("host_unreachable", "host unreachable from the SOCKS server"),
    0x05: ("connection_refused", "connection refused by the destination"),
    0x06: ("ttl_expired", "TTL expired (the SOCKS server timed out reaching the destination)"),
    0x07: ("command_not_supported", "command not supported (the server does not allow CONNECT)"),
    0x08: ("address_type_not_supported", "address type not supported by the SOCKS server"),
}


class Socks5Error(Exception):
    """The SOCKS5 negotiation failed. `code` is a stable slug, `rep` the REP byte if any."""

    def __init__(self, code: str, message: str, rep: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rep = rep


@dataclass(frozen=True)
class SendData:
    """Bytes the caller must send to the SOCKS server."""

    data: bytes


@dataclass(frozen=True)
class Connected:
    """The tunnel is up. `bound_addr` is the server's BND.ADDR/BND.PORT; `leftover` is payload."""

    bound_addr: tuple[str, int]
    leftover: bytes


Event = SendData | Connected


class State(enum.Enum):
    AWAIT_METHOD = "await_method"  # greeting sent, waiting for the method selection
    AWAIT_AUTH = "await_auth"  # username/password sent, waiting for the verdict
    AWAIT_REPLY = "await_reply"  # CONNECT sent, waiting for the reply
    CONNECTED = "connected"
    FAILED = "failed"


def _field(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not 1 <= len(raw) <= MAX_FIELD_LEN:
        raise ValueError(f"SOCKS5 {what} must be 1..{MAX_FIELD_LEN} bytes, got {len(raw)}")
    return raw


def encode_address(host: str, port: int) -> bytes:
    """ATYP + DST.ADDR + DST.PORT for `host` (IP literal or domain name)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be 0..65535, got {port}")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        ip = None
    if ip is not None:
        atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
        return bytes([atyp]) + ip.packed + port.to_bytes(2, "big")
    try:
        name = host.rstrip(".").encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"SOCKS5 destination {host!r} must be an ASCII (IDNA A-label) name") from None
    if not 1 <= len(name) <= MAX_FIELD_LEN:
        raise ValueError(f"SOCKS5 destination name must be 1..{MAX_FIELD_LEN} bytes, got {len(name)}")
    return bytes([ATYP_DOMAIN, len(name)]) + name + port.to_bytes(2, "big")


class Socks5Client:
    """One CONNECT negotiation. Create one per connection; see the module docstring for the loop."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        *,
        upstream: str = "socks5",
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.upstream = upstream
        self._request = bytes([SOCKS_VERSION, CMD_CONNECT, 0]) + encode_address(host, port)
        self._auth: bytes | None = None
        if username is not None:
            user = _field(username, "username")
            pw = _field(password or "", "password")
            self._auth = bytes([AUTH_VERSION, len(user)]) + user + bytes([len(pw)]) + pw
        self._buf = bytearray()
        self.state = State.AWAIT_METHOD

    def initial_bytes(self) -> bytes:
        """The greeting: offer no-auth, plus username/password when credentials are configured."""
        methods = [METHOD_NO_AUTH] + ([METHOD_USERPASS] if self._auth is not None else [])
        return bytes([SOCKS_VERSION, len(methods), *methods])

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the server; returns what to send and, at the end, `Connected`."""
        if self.state is State.CONNECTED:
            raise RuntimeError("SOCKS5 negotiation already finished; bytes now belong to the relay")
        if self.state is State.FAILED:
            raise RuntimeError("SOCKS5 negotiation already failed")
        if not data:
            error = self._closed_error()
            self.state = State.FAILED
            raise error
        self._buf += data
        events: list[Event] = []
        try:
            # Each step either consumes a whole message and changes state, or waits for more bytes.
            while self.state is not State.CONNECTED:
                event = self._step()
                if event is None:
                    break
                events.append(event)
        except Socks5Error:
            self.state = State.FAILED
            raise
        return events

    def _closed_error(self) -> Socks5Error:
        where = f"SOCKS5 server of upstream {self.upstream!r} closed the connection"
        if self.state is State.AWAIT_METHOD:
            hint = ("before choosing an authentication method; if it requires authentication, "
                    f"configure \"username\" and \"password\" for upstream {self.upstream!r}"
                    if self._auth is None else
                    "before choosing an authentication method; check that it is a SOCKS5 server")
        elif self.state is State.AWAIT_AUTH:
            hint = (f"after receiving the username/password for user {self.username!r}: it "
                    "probably rejected them; check the credentials in the config")
        else:
            hint = (f"before answering CONNECT {self.host}:{self.port}; it may refuse this "
                    "destination or be unable to reach it (see the SOCKS server's log)")
        return Socks5Error("server_closed", f"{where} {hint}")

    # -- one reader per state, as h11 does -------------------------------------------------------

    def _step(self) -> Event | None:
        if self.state is State.AWAIT_METHOD:
            return self._read_method()
        if self.state is State.AWAIT_AUTH:
            return self._read_auth()
        return self._read_reply()

    def _check_version(self, expected: int, what: str) -> None:
        if self._buf[0] != expected:
            raise Socks5Error(
                "bad_version",
                f"upstream {self.upstream!r} is not a SOCKS5 server: its {what} starts with version "
                f"byte {self._buf[0]:#04x}, expected {expected:#04x}; check the upstream address",
            )

    def _read_method(self) -> Event | None:
        if len(self._buf) < 2:
            return None
        self._check_version(SOCKS_VERSION, "method selection")
        method = self._buf[1]
        del self._buf[:2]
        if method == METHOD_NO_AUTH:
            self.state = State.AWAIT_REPLY
            return SendData(self._request)
        if method == METHOD_USERPASS and self._auth is not None:
            self.state = State.AWAIT_AUTH
            return SendData(self._auth)
        if method in (METHOD_USERPASS, METHOD_NO_ACCEPTABLE) and self._auth is None:
            raise Socks5Error(
                "no_acceptable_method",
                f"SOCKS5 server requires authentication but no username/password configured for "
                f"upstream {self.upstream!r}; add \"username\" and \"password\" to that upstream",
            )
        if method == METHOD_NO_ACCEPTABLE:
            raise Socks5Error(
                "no_acceptable_method",
                f"SOCKS5 server of upstream {self.upstream!r} accepts neither no-auth nor "
                f"username/password (it answered 0xFF); check the server's socksmethod settings",
            )
        raise Socks5Error(
            "protocol_error",
            f"SOCKS5 server of upstream {self.upstream!r} chose method {method:#04x} that was not offered",
        )

    def _read_auth(self) -> Event | None:
        if len(self._buf) < 2:
            return None
        # RFC 1929's reply version is 0x01; a few servers echo 0x05. Accept both, as curl does.
        if self._buf[0] not in (AUTH_VERSION, SOCKS_VERSION):
            self._check_version(AUTH_VERSION, "authentication reply")
        status = self._buf[1]
        del self._buf[:2]
        if status != 0:
            raise Socks5Error(
                "auth_rejected",
                f"SOCKS5 server rejected username/password for user {self.username!r} "
                f"(upstream {self.upstream!r}); check the credentials in the config",
            )
        self.state = State.AWAIT_REPLY
        return SendData(self._request)

    def _read_reply(self) -> Event | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        self._check_version(SOCKS_VERSION, "reply")
        rep = buf[1]
        if rep != 0:
            # Fail on the REP byte alone: some servers close right after a short failure reply.
            slug, text = REPLY_ERRORS.get(rep, ("unknown_reply", f"unknown reply code {rep:#04x}"))
            raise Socks5Error(
                slug,
                f"SOCKS5 upstream {self.upstream!r} could not connect to "
                f"{self.host}:{self.port}: {text}",
                rep=rep,
            )
        if len(buf) < 5:
            return None
        atyp = buf[3]
        if atyp == ATYP_IPV4:
            addr_len, header = 4, 4
        elif atyp == ATYP_IPV6:
            addr_len, header = 16, 4
        elif atyp == ATYP_DOMAIN:
            addr_len, header = buf[4], 5
        else:
            raise Socks5Error(
                "protocol_error",
                f"SOCKS5 server of upstream {self.upstream!r} replied with unknown address type "
                f"{atyp:#04x}",
            )
        total = header + addr_len + 2
        if len(buf) < total:
            return None
        raw_addr = bytes(buf[header : header + addr_len])
        if atyp == ATYP_DOMAIN:
            bound_host = raw_addr.decode("ascii", "replace")
        else:
            bound_host = str(ipaddress.ip_address(raw_addr))
        bound_port = int.from_bytes(buf[header + addr_len : total], "big")
        leftover = bytes(buf[total:])
        buf.clear()
        self.state = State.CONNECTED
        return Connected((bound_host, bound_port), leftover)
