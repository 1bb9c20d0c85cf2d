"""How the proxy reaches a backend: direct (Happy Eyeballs) or through a SOCKS5 upstream.

The results are connected, NON-BLOCKING raw `socket.socket`s with TCP_NODELAY, never asyncio
streams: the relay later works on raw file descriptors (splice, sockmap). All IO goes through
`loop.sock_connect / sock_recv / sock_sendall`, which asyncio and uvloop both provide.

`Connector.connect` is the one entry point for the server: it resolves (direct) or delegates the
resolution (SOCKS5), refuses internal destinations of dynamic routes, connects, and writes the
PROXY protocol header so that the returned socket is ready for the client's bytes.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from sniproxy.proxy import proxy_protocol, socks5
from sniproxy.proxy.resolver import ResolveError, Resolver, ip_literal
from sniproxy.proxy.routes import is_forbidden_destination

UPSTREAM_ERROR_KINDS = ("refused", "timeout", "unreachable", "dns", "socks", "forbidden", "fd_limit")
# socket() failing with these says the proxy, not the backend, is out of resources.
_FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)

# SOCKS5 handshake replies are at most 262 bytes; a bigger read may also bring early backend bytes,
# which are returned as leftover.
SOCKS_RECV_SIZE = 16384


class UpstreamError(Exception):
    """Could not reach the backend. `kind` is one of UPSTREAM_ERROR_KINDS (a metric label);
    `attempts` lists (address, error) for every address tried."""

    def __init__(self, kind: str, message: str, attempts: Sequence[tuple[str, str]] = ()) -> None:
        assert kind in UPSTREAM_ERROR_KINDS, kind
        self.kind = kind
        self.message = message
        self.attempts = list(attempts)
        detail = "; ".join(f"{a}: {e}" for a, e in self.attempts)
        super().__init__(f"{message} (tried {detail})" if detail else message)


# -- destination safety for dynamic routes ---------------------------------------------------------

def forbidden_reason(ip: str) -> str | None:
    """Why a dynamic ($sni) route must not reach `ip` ("loopback", "private", ...), or None."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    return is_forbidden_destination(addr)


# -- direct connection: Happy Eyeballs (RFC 8305) --------------------------------------------------

def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def interleave_families(addresses: Sequence[str]) -> list[str]:
    """RFC 8305 section 4: alternate families, starting with the family of the first address."""
    if not addresses:
        return []
    first = _family(addresses[0])
    primary = [a for a in addresses if _family(a) == first]
    secondary = [a for a in addresses if _family(a) != first]
    out: list[str] = []
    for i in range(max(len(primary), len(secondary))):
        out += primary[i : i + 1] + secondary[i : i + 1]
    return out


def format_addr(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _describe_oserror(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


_TCP_ESTABLISHED = 1

#: Called with every backend socket before its connect(): the server sets it per connection
#: (a task's context) when ebpf.tracing.network is on, so the kernel counts that socket's
#: connect latency, failures and retransmits under the route.
BACKEND_SOCKET_HOOK: contextvars.ContextVar[Callable[[socket.socket], None] | None] = (
    contextvars.ContextVar("backend_socket_hook", default=None))


async def _connect_one(ip: str, port: int, local_addr: tuple[str, int] | None) -> socket.socket:
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        hook = BACKEND_SOCKET_HOOK.get()
        if hook is not None:
            hook(sock)
        sock.setblocking(False)
        if local_addr is not None:
            sock.bind(local_addr)
        target = (ip, port, 0, 0) if ":" in ip else (ip, port)
        err = sock.connect_ex(target)
        if err == errno.EINPROGRESS:
            # A backend on this host or a near one has often answered by the time connect()
            # returns (loopback runs the handshake inside the call): then no wait on the loop.
            if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != _TCP_ESTABLISHED:
                await _writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except BaseException:
        sock.close()
        raise


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _set_result, ready)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def open_direct(
    addresses: list[str],
    port: int,
    *,
    timeout_s: float,
    happy_eyeballs_delay_s: float = 0.25,
    local_addr: tuple[str, int] | None = None,
) -> socket.socket:
    """Connect to the first of `addresses` that answers, racing them as RFC 8305 says.

    Attempts start in interleaved family order, each `happy_eyeballs_delay_s` after the previous
    one or as soon as the previous one fails; the first success wins and every other attempt is
    cancelled and closed. Raises UpstreamError("refused" | "timeout" | "unreachable" | "dns").
    """
    literals = [ip_literal(a) for a in addresses]
    bad = [a for a, lit in zip(addresses, literals) if lit is None]
    if bad:
        raise ValueError(f"open_direct needs IP addresses, got {bad!r}: resolve names first")
    order = interleave_families(list(dict.fromkeys(lit for lit in literals if lit)))
    if not order:
        raise UpstreamError("dns", f"no addresses to connect to for port {port}")
    tasks: dict[asyncio.Task[socket.socket], str] = {}
    errors: dict[str, str] = {}
    fd_limited: list[str] = []
    winner: socket.socket | None = None
    timed_out = False
    next_index = 0
    if len(order) == 1:
        # The common case (a fixed backend): no race to run, so no tasks to create and reap.
        try:
            async with asyncio.timeout(timeout_s):
                return await _connect_one(order[0], port, local_addr)
        except TimeoutError:
            timed_out = True
        except OSError as exc:
            errors[order[0]] = _describe_oserror(exc)
            if exc.errno in _FD_LIMIT_ERRNOS:
                fd_limited.append(order[0])
        return _raise_connect_failure(order, port, timeout_s, errors, {order[0]}, timed_out,
                                      fd_limited)
    try:
        async with asyncio.timeout(timeout_s):
            while winner is None:
                if next_index < len(order):
                    ip = order[next_index]
                    next_index += 1
                    tasks[asyncio.ensure_future(_connect_one(ip, port, local_addr))] = ip
                pending = [t for t in tasks if not t.done()]
                if not pending:
                    break  # every address failed
                # Wait for a result, or for the moment to start the next attempt.
                more_to_start = next_index < len(order)
                done, _ = await asyncio.wait(
                    pending,
                    timeout=happy_eyeballs_delay_s if more_to_start else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        if winner is None:
                            winner = task.result()
                    else:
                        errors[tasks[task]] = _describe_oserror(exc)
                        if getattr(exc, "errno", None) in _FD_LIMIT_ERRNOS:
                            fd_limited.append(tasks[task])
    except TimeoutError:
        timed_out = True
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        # Collect losers; one may have connected in the same instant as the winner.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, socket.socket) and res is not winner:
                res.close()
    if winner is not None:
        return winner
    return _raise_connect_failure(order, port, timeout_s, errors, set(tasks.values()), timed_out,
                                  fd_limited)


def _raise_connect_failure(order: list[str], port: int, timeout_s: float, errors: dict[str, str],
                           tried: set[str], timed_out: bool,
                           fd_limited: Sequence[str] = ()) -> NoReturn:
    attempts = []
    for ip in order:
        target = format_addr(ip, port)
        if ip in errors:
            attempts.append((target, errors[ip]))
        elif ip in tried:
            attempts.append((target, f"no answer within {timeout_s:g}s"))
    targets = ", ".join(format_addr(ip, port) for ip in order)
    if fd_limited:
        raise UpstreamError(
            "fd_limit",
            f"cannot open a socket to {targets}: this process is out of file descriptors "
            f"(raise the fd limit: LimitNOFILE= / ulimit -n, add workers, or lower max_connections)",
            attempts,
        )
    if timed_out:
        raise UpstreamError(
            "timeout",
            f"connecting to {targets} timed out after {timeout_s:g}s; the backend may be down or "
            f"filtered, or raise connect_timeout",
            attempts,
        )
    if any(e == "connection refused" for e in errors.values()):
        raise UpstreamError(
            "refused",
            f"backend refused the connection at {targets}; is the service listening on port {port}?",
            attempts,
        )
    raise UpstreamError("unreachable", f"backend {targets} is unreachable from this host", attempts)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of `data` to a non-blocking socket."""
    if data:
        await asyncio.get_running_loop().sock_sendall(sock, data)


# -- SOCKS5 ----------------------------------------------------------------------------------------

_SOCKS_KIND = {
    "connection_refused": "refused",
    "host_unreachable": "unreachable",
    "network_unreachable": "unreachable",
    "ttl_expired": "timeout",
}


def parse_host_port(addr: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port)."""
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        port_s = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port_s = addr.rpartition(":")
    if not host or not port_s.isdigit() or not 0 < int(port_s) <= 0xFFFF:
        raise ValueError(f"expected \"host:port\", got {addr!r}")
    return host, int(port_s)


async def open_socks5(
    server: tuple[str, int],
    target_host: str,
    target_port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    timeout_s: float,
    upstream_name: str = "socks5",
    resolver: Resolver | None = None,
    happy_eyeballs_delay_s: float = 0.25,
) -> tuple[socket.socket, bytes]:
    """Connect to `server` and CONNECT to target_host:target_port through it.

    Names are sent to the server unresolved (it resolves them). Returns the socket and the leftover
    bytes the backend sent right after the server's reply: deliver those to the client first.
    The whole thing (connect + handshake) is bounded by `timeout_s`.
    """
    server_host, server_port = server
    label = f"SOCKS5 upstream {upstream_name!r} ({format_addr(server_host, server_port)})"
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            if ip_literal(server_host) is not None:
                server_ips = [ip_literal(server_host) or server_host]
            elif resolver is not None:
                server_ips = await resolver.resolve(server_host)
            else:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    server_host, server_port, type=socket.SOCK_STREAM)
                server_ips = list(dict.fromkeys(info[4][0] for info in infos))
    except ResolveError as exc:
        raise UpstreamError("dns", f"{label}: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        raise UpstreamError("dns", f"{label}: cannot resolve its host name: {exc}") from exc
    remaining = max(0.001, timeout_s - (time.monotonic() - start))
    try:
        sock = await open_direct(server_ips, server_port, timeout_s=remaining,
                                 happy_eyeballs_delay_s=happy_eyeballs_delay_s)
    except UpstreamError as exc:
        kind = "fd_limit" if exc.kind == "fd_limit" else "socks"
        raise UpstreamError(kind, f"{label} is not reachable: {exc.message}", exc.attempts) from exc
    loop = asyncio.get_running_loop()
    try:
        client = socks5.Socks5Client(target_host, target_port, username, password,
                                     upstream=upstream_name)
        remaining = max(0.001, timeout_s - (time.monotonic() - start))
        async with asyncio.timeout(remaining):
            await loop.sock_sendall(sock, client.initial_bytes())
            # Bounded: each read either ends the handshake, advances it, or hits EOF / the deadline.
            while True:
                data = await loop.sock_recv(sock, SOCKS_RECV_SIZE)
                # b"" (EOF) makes the client raise an error naming the step that failed.
                for event in client.receive_data(data):
                    if isinstance(event, socks5.SendData):
                        await loop.sock_sendall(sock, event.data)
                    else:
                        return sock, event.leftover
    except socks5.Socks5Error as exc:
        sock.close()
        raise UpstreamError(_SOCKS_KIND.get(exc.code, "socks"), f"{label}: {exc.message}") from exc
    except TimeoutError:
        sock.close()
        raise UpstreamError(
            "timeout",
            f"{label} did not finish the SOCKS5 handshake for {target_host}:{target_port} within "
            f"{timeout_s:g}s (state {client.state.value})",
        ) from None
    except OSError as exc:
        sock.close()
        raise UpstreamError("socks", f"{label}: {_describe_oserror(exc)} during the handshake") from exc
    except BaseException:
        sock.close()
        raise


# -- Connector -------------------------------------------------------------------------------------

class ConnectDecision(Protocol):
    """What the route table decided; routes.RouteDecision satisfies it."""

    host: str
    port: int
    upstream: str  # "direct" or the name of a configured upstream
    proxy_protocol: str | None  # None, "v1" or "v2"
    dynamic: bool  # the backend host came from the client's SNI ("$sni")
    allow_private: bool


@dataclass
class Connected:
    sock: socket.socket  # connected, non-blocking, TCP_NODELAY; the PROXY header already sent
    leftover: bytes  # backend bytes that arrived with the SOCKS5 reply: send to the client first
    backend_addr: str  # "ip:port" for direct, "host:port" as asked of the SOCKS5 server
    connect_seconds: float  # resolution + connect + handshake + PROXY header
    upstream: str = "direct"
    attempts: list[tuple[str, str]] = field(default_factory=list)


class Connector:
    """Connects route decisions to backends. `upstreams` maps names to objects with `addr`
    ("host:port"), `username` and `password` attributes (SOCKS5 upstreams of the config)."""

    def __init__(
        self,
        resolver: Resolver,
        upstreams: dict[str, Any],
        connect_timeout_s: float,
        *,
        happy_eyeballs_delay_s: float = 0.25,
    ) -> None:
        self.resolver = resolver
        self.upstreams = dict(upstreams)
        self.connect_timeout_s = connect_timeout_s
        self.happy_eyeballs_delay_s = happy_eyeballs_delay_s

    async def connect(
        self,
        decision: ConnectDecision,
        client_addr: Sequence | None,
        server_addr: Sequence | None,
    ) -> Connected:
        start = time.monotonic()
        if decision.upstream == "direct":
            sock, backend = await self._direct(decision)
            leftover = b""
        else:
            sock, leftover, backend = await self._socks(decision)
        try:
            if decision.proxy_protocol:
                header = proxy_protocol.encode(decision.proxy_protocol, client_addr, server_addr)
                async with asyncio.timeout(self.connect_timeout_s):
                    await send_all(sock, header)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, (TimeoutError, OSError)):
                raise UpstreamError(
                    "unreachable", f"sending the PROXY header to {backend} failed: "
                    f"{_describe_oserror(exc)}") from exc
            raise
        return Connected(sock, leftover, backend, time.monotonic() - start, decision.upstream)

    def _check_destination(self, decision: ConnectDecision, ip: str) -> str | None:
        if not decision.dynamic or decision.allow_private:
            return None
        return forbidden_reason(ip)

    def _forbidden(self, decision: ConnectDecision, refused: list[tuple[str, str]]) -> UpstreamError:
        listing = ", ".join(f"{ip} ({why})" for ip, why in refused)
        return UpstreamError(
            "forbidden",
            f"refusing dynamic destination {decision.host}:{decision.port}: it resolves to {listing}; "
            f"a route that takes its backend from the SNI must not reach internal addresses. "
            f"If this is intended, set \"allow_private\": true on the route",
        )

    async def _check_socks_name(self, decision: ConnectDecision) -> None:
        """A dynamic route through SOCKS5 sends the SNI unresolved: the SOCKS server resolves
        it, so `localhost` reached its loopback. Refuse *.localhost (RFC 6761: always loopback)
        and names that resolve here to an internal address. A name that does not resolve here
        goes on: only the SOCKS side knows it (split DNS), and it cannot be checked.
        """
        name = decision.host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            raise self._forbidden(decision, [(name, "loopback by definition, RFC 6761")])
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                addresses = await self.resolver.resolve(decision.host)
        except (ResolveError, TimeoutError, OSError):
            return
        refused = [(ip, why) for ip in addresses if (why := forbidden_reason(ip))]
        if refused:
            # Unlike the direct path we cannot keep only the public addresses: the SOCKS
            # server picks one itself.
            raise self._forbidden(decision, refused)

    async def _direct(self, decision: ConnectDecision) -> tuple[socket.socket, str]:
        try:
            addresses = await self.resolver.resolve(decision.host)
        except ResolveError as exc:
            raise UpstreamError("dns", str(exc)) from exc
        allowed, refused = [], []
        for ip in addresses:
            why = self._check_destination(decision, ip)
            if why:
                refused.append((ip, why))
            else:
                allowed.append(ip)
        if not allowed:
            raise self._forbidden(decision, refused)
        # A name resolving to public and internal addresses (DNS rebinding) only gets the public ones.
        sock = await open_direct(
            allowed, decision.port, timeout_s=self.connect_timeout_s,
            happy_eyeballs_delay_s=self.happy_eyeballs_delay_s,
        )
        peer = sock.getpeername()
        return sock, format_addr(peer[0], peer[1])

    async def _socks(self, decision: ConnectDecision) -> tuple[socket.socket, bytes, str]:
        cfg = self.upstreams.get(decision.upstream)
        if cfg is None:
            known = ", ".join(sorted(self.upstreams)) or "none"
            raise UpstreamError(
                "socks", f"route uses upstream {decision.upstream!r} which is not configured "
                f"(configured: {known}); add it under \"upstreams\"")
        literal = ip_literal(decision.host)
        if literal is not None:
            why = self._check_destination(decision, literal)
            if why:
                raise self._forbidden(decision, [(literal, why)])
        elif decision.dynamic and not decision.allow_private:
            await self._check_socks_name(decision)
        try:
            server = parse_host_port(cfg.addr)
        except ValueError as exc:
            raise UpstreamError("socks", f"upstream {decision.upstream!r}: addr {exc}") from exc
        sock, leftover = await open_socks5(
            server, decision.host, decision.port,
            username=getattr(cfg, "username", None), password=getattr(cfg, "password", None),
            timeout_s=self.connect_timeout_s, upstream_name=decision.upstream,
            resolver=self.resolver, happy_eyeballs_delay_s=self.happy_eyeballs_delay_s,
        )
        return sock, leftover, format_addr(literal or decision.host, decision.port)
