"""One worker process: listeners, the per-connection pipeline, limits, timeouts, drain.

listener -> ClientHello (peeked) -> route -> connect (direct / SOCKS5) -> PROXY header
-> relay (kernel or user space) -> close, with one access-log line and metrics.

The ClientHello is read with MSG_PEEK and stays queued in the client socket: the
relay forwards it unchanged, and the kernel data path can take the socket over
without any write from user space (a lossless hand-over).

Two paths, one behaviour. The common connection (its ClientHello complete at accept, which
TCP_DEFER_ACCEPT makes the rule; a direct route to an IP address) is served by callbacks
on a small `__slots__` record: peek, route, connect (a wait on the loop only if the backend
does not answer inside connect()), hand-over, and the relay's run() driven without a Task.
Everything else (a hello still arriving, DNS, SOCKS5, PROXY protocol, dynamic routes,
several addresses) takes the coroutine `_serve`, in a Task. Measured in
docs/benchmarks.md (issue 14): the Task, its coroutine frames and asyncio.timeout were a
third of a connection's CPU and a fifth of a held connection's memory.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from sniproxy.proxy import clienthello
from sniproxy.proxy.resolver import ip_literal
from sniproxy.proxy.upstream import (
    BACKEND_SOCKET_HOOK, UpstreamError, _describe_oserror, _raise_connect_failure, format_addr,
)
from sniproxy.relay.base import Relay, RelayResult

log = logging.getLogger("sniproxy")

# How many bytes to peek at once: the 16 KiB hello limit plus record headers for a
# hello fragmented into many small records (5 bytes each).
PEEK_BYTES = clienthello.MAX_CLIENT_HELLO + 4096


@dataclass(slots=True)
class ConnectionInfo:
    client: str
    sni: str | None = None
    route: str = "-"
    backend: str = "-"
    upstream: str = "-"
    relay: str = "-"
    listener: str = "-"
    started: float = field(default_factory=time.monotonic)


class HelloTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


# TCP_DEFER_ACCEPT, in seconds: a client that connects and stays silent is handed over after
# about this long anyway (the kernel retransmits its SYN-ACK once), then client_hello_s applies.
DEFER_ACCEPT_S = 1
# At the end of the drain: how long aborted relays get to hand in their results before the
# connections still waiting (on a hello, a connect) are cancelled. Aborting is synchronous, so
# one loop turn is enough; the bound only guards against a relay that does not stop.
ABORT_SETTLE_S = 1.0


def create_listener(host: str, port: int, *, backlog: int, reuse_port: bool,
                    defer_accept: bool = True, tune=None) -> socket.socket:
    """A non-blocking listening socket; IPv6 wildcard listens on IPv6 only (list both if wanted).

    defer_accept (nginx's `deferred`, HAProxy's `defer-accept`): accept() returns a connection
    only once its first bytes (the ClientHello) are in, so the hello is usually read at the
    first peek, with no wait on the event loop, and silent connections never take a slot.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit it (no syscall per connection). Without it a response the
        # kernel relays in two skbs waits for the client's delayed ACK before its second part.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if defer_accept:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
        if tune is not None:          # e.g. tcp_splice's MSS clamp: before the first SYN
            tune(sock)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def configured_backend(decision) -> str:
    """The route's backend as configured: "$sni:443" for a dynamic route, never the SNI itself
    (a metric label: its values are bounded by the config)."""
    if decision.dynamic:
        return f"$sni:{decision.port}"
    host = decision.host
    return f"[{host}]:{decision.port}" if ":" in host else f"{host}:{decision.port}"


def _fmt_addr(addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


class Worker:
    """Serves connections on its listeners; owns no global state."""

    def __init__(self, app, listeners: list[socket.socket]):
        self.app = app                      # sniproxy.proxy.app.ProxyApp: config, routes, connector, metrics
        self.listeners = listeners
        # Metric label of each listener: the address as bound (bounded by listen_addr).
        self.listener_names = {lsock: _fmt_addr(lsock.getsockname()) for lsock in listeners}
        # Each listener's address family as a plain int: socket.accept() converts the
        # listener's family and type to enums for every connection (two Enum calls, a few
        # microseconds on a cold worker), which _on_acceptable spares itself.
        self._families = {lsock: int(lsock.family) for lsock in listeners}
        for name in self.listener_names.values():
            app.hot.opened(name)
            app.hot.closed(name)         # present at 0 before the first client
        self.loop = asyncio.get_running_loop()
        self.open = 0                       # connections accepted and not yet ended
        self.active: set[asyncio.Task] = set()      # connections on the coroutine path
        # Connections on the callback path (a dict: a third of a set's memory per entry).
        self.fast: dict[_Conn, None] = {}
        self.relays: set[Relay] = set()             # relays of the coroutine path
        self._ip_of: dict[str, str | None] = {}     # route host -> IP literal or None
        self.accepting = False
        self.draining = False
        self.drained = asyncio.Event()
        self._last_accept_error_log = 0.0

    # ---------------- accept ----------------
    def start(self) -> None:
        self._resume_accept()

    def _resume_accept(self) -> None:
        if self.accepting or self.draining:
            return
        for lsock in self.listeners:
            self.loop.add_reader(lsock.fileno(), self._on_acceptable, lsock)
        self.accepting = True

    def _pause_accept(self) -> None:
        if not self.accepting:
            return
        for lsock in self.listeners:
            self.loop.remove_reader(lsock.fileno())
        self.accepting = False

    def _on_acceptable(self, lsock: socket.socket) -> None:
        limit = self.app.connection_limit
        # Accept in a burst: one wake-up can serve many waiting clients.
        for _ in range(64):
            if self.open >= limit:
                # At the limit: stop accepting; clients wait in the listen backlog and
                # are served as slots free up (like HAProxy's maxconn).
                self.app.metrics.limit_reached.inc()
                log.warning("max_connections reached (%d in this worker, %d over %d workers): new "
                            "connections wait in the listen backlog", limit,
                            self.app.config.max_connections, self.app.config.workers)
                self._pause_accept()
                return
            try:
                fd, addr = lsock._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.app.metrics.accept_errors.labels(errno.errorcode.get(exc.errno, "?")).inc()
                    now = time.monotonic()
                    if now - self._last_accept_error_log >= 1.0:    # one line a second, not a flood
                        self._last_accept_error_log = now
                        log.error("accept failed: %s with %d connections open; pausing accept for "
                                  "100 ms (raise the fd limit: ulimit -n / LimitNOFILE=, or lower "
                                  "max_connections)", exc.strerror, self.open)
                    self._pause_accept()
                    self.loop.call_later(0.1, self._resume_accept)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            # socket.accept() without its enum conversions (see __init__), non-blocking as
            # every socket of the worker is.
            conn = socket.socket(self._families[lsock], socket.SOCK_STREAM, 0, fd)
            conn.setblocking(False)
            listener = self.listener_names[lsock]
            self.open += 1
            self.app.hot.opened(listener)
            try:
                self._begin(conn, addr, listener)
            except Exception as exc:     # a bug must cost one connection, not the accept loop
                log.error("internal error in a connection handler: %r", exc, exc_info=exc)
                conn.close()
                self._closed_one(listener)

    def _spawn(self, coro, listener: str) -> None:
        task = self.loop.create_task(coro)
        self.active.add(task)
        task.add_done_callback(functools.partial(self._connection_done, listener))

    def _connection_done(self, listener: str, task: asyncio.Task) -> None:
        self.active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal error in a connection handler: %r", task.exception(),
                      exc_info=task.exception())
        self._closed_one(listener)

    def _closed_one(self, listener: str) -> None:
        self.open -= 1
        self.app.hot.closed(listener)
        if self.draining:
            if not self.open:
                self.drained.set()
        elif not self.accepting and self.open < self.app.connection_limit:
            self._resume_accept()

    # ---------------- drain ----------------
    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let connections finish for grace_s, then cut the rest."""
        self._pause_accept()
        self.draining = True
        for lsock in self.listeners:
            lsock.close()
        if self.open:
            log.info("draining %d connections (grace %ss)", self.open, grace_s)
            try:
                await asyncio.wait_for(self.drained.wait(), grace_s)
            except asyncio.TimeoutError:
                log.warning("shutdown grace over: closing %d connections", self.open)
                relays = list(self.relays) + [c.relay for c in self.fast if c.relay is not None]
                for relay in relays:
                    relay.abort("shutdown", "shutdown grace period over")
                # An aborted relay has its result (with the bytes it moved) ready: let its
                # connection account for it. Cancelling at once threw CancelledError into the
                # task instead, and the connection was counted with 0 bytes.
                await self._until_drained(ABORT_SETTLE_S)
                for task in list(self.active):
                    task.cancel()
                for conn in list(self.fast):
                    self._cancel(conn)
                await asyncio.gather(*self.active, return_exceptions=True)
                await self._until_drained(ABORT_SETTLE_S)

    async def _until_drained(self, timeout_s: float) -> None:
        if self.open:
            try:
                await asyncio.wait_for(self.drained.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass

    # ---------------- one connection ----------------
    def _route(self, client: socket.socket, hello, info: ConnectionInfo, result: RelayResult):
        """The route of a complete hello (or the reply to a hello that has none): the decision,
        or None with `result` saying why the connection ends."""
        app = self.app
        if isinstance(hello, clienthello.Rejected):
            app.metrics.hello_failures.labels(hello.reason).inc()
            result.outcome = "bad_hello"
            result.detail = f"{hello.reason}: {hello.detail}"
            alert = clienthello.alert_for(hello.reason)
            if alert is not None:
                _discard_queued(client)      # FIN after the alert, not RST
                _send_quietly(client, clienthello.tls_alert(alert))
                info.relay = "none"
            return None
        info.sni = hello.sni
        routes = app.routes          # a reload swaps the table; this connection keeps its own
        decision = routes.match(hello.sni)
        if decision is None:
            if hello.sni is None:
                app.metrics.hello_failures.labels("no_sni").inc()
            result.outcome = "no_route"
            result.detail = ("no route for this name and no default_backend"
                             if hello.sni else "ClientHello without SNI and no default_backend")
            _discard_queued(client)
            _send_quietly(client, clienthello.tls_alert(clienthello.UNRECOGNIZED_NAME))
            info.relay = "none"
            return None
        info.route = decision.route_name
        tagger = app.socket_tagger       # ebpf.tracing.network: kernel figures per route
        if tagger is not None:
            tagger(client, decision.route_name, "client")
        info.upstream = decision.upstream
        info.backend = f"{decision.host}:{decision.port}"
        return decision

    async def _serve(self, client: socket.socket, addr, info: ConnectionInfo | None = None,
                     decision=None, listener: str = "-") -> None:
        """The coroutine path: everything the callback path does not take (see the module doc).
        `decision`: routed already by the callback path (with `info` filled in)."""
        app = self.app
        if info is None:
            info = ConnectionInfo(client=_fmt_addr(addr), listener=listener)
        backend: socket.socket | None = None
        result = RelayResult(0, 0, "error")
        try:
            if decision is None:
                try:
                    hello = await self._read_hello(client, app.config.timeouts.client_hello_s)
                except HelloTimeout:
                    result.outcome = "hello_timeout"
                    result.detail = f"no complete ClientHello within {app.config.timeouts.client_hello_s}s"
                    return
                except ClientGone as exc:
                    result.outcome = "client_closed"
                    result.detail = str(exc)
                    return
                decision = self._route(client, hello, info, result)
                if decision is None:
                    return
            tagger = app.socket_tagger
            if tagger is not None:
                outer = BACKEND_SOCKET_HOOK.get()      # tcp_splice's MSS clamp, if any
                BACKEND_SOCKET_HOOK.set(lambda sock: (outer and outer(sock),
                                                      tagger(sock, decision.route_name, "backend")))
            try:
                connected = await app.connector.connect(
                    decision, addr, client.getsockname() if decision.proxy_protocol else None)
            except Exception as exc:  # UpstreamError and anything the OS says
                kind = getattr(exc, "kind", "error")
                result.outcome = "forbidden" if kind == "forbidden" else "connect_failed"
                result.detail = str(exc)
                app.metrics.connect_failures.labels(decision.upstream, configured_backend(decision),
                                                    kind).inc()
                return
            backend = connected.sock
            info.backend = connected.backend_addr
            app.hot.connect_time(decision.upstream, configured_backend(decision),
                                 connected.connect_seconds)
            if connected.leftover:
                # Bytes the backend sent right after the SOCKS reply: they come first.
                await self.loop.sock_sendall(client, connected.leftover)
            relay = app.relay_factory(client, backend)
            info.relay = relay.kind
            self.relays.add(relay)
            try:
                result = await relay.run()
            finally:
                self.relays.discard(relay)
            result.bytes_down += len(connected.leftover)
        except asyncio.CancelledError:
            result.outcome = "shutdown"
            raise
        except OSError as exc:
            _os_outcome(exc, result)
        finally:
            self._close(client, backend, info, result)

    def _close(self, client: socket.socket, backend: socket.socket | None, info: ConnectionInfo,
               result: RelayResult) -> None:
        if info.relay == "-":
            # Never relayed: consume the peeked bytes so close() sends FIN, not RST.
            _discard_queued(client)
        client.close()
        if backend is not None:
            backend.close()
        self._account(info, result)

    # ---------------- the callback path ----------------
    def _begin(self, client: socket.socket, addr, listener: str) -> None:
        """Serve a new connection by callbacks if it qualifies, else in a Task (`_serve`)."""
        try:
            data = client.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:
            data = None                  # not there yet (or an error: _serve says which)
        hello = clienthello.parse_client_hello(data) if data else None
        if hello is None or isinstance(hello, clienthello.NeedMore) or len(data) >= PEEK_BYTES:
            self._spawn(self._serve(client, addr, listener=listener), listener)
            return
        info = ConnectionInfo(client=_fmt_addr(addr), listener=listener)
        result = RelayResult(0, 0, "error")
        decision = self._route(client, hello, info, result)
        if decision is None:
            self._close(client, None, info, result)
            self._closed_one(listener)
            return
        ip = None
        if decision.upstream == "direct" and not decision.proxy_protocol and not decision.dynamic:
            ip = self._ip_of.get(decision.host, "")
            if ip == "":
                ip = ip_literal(decision.host)
                if len(self._ip_of) >= IP_CACHE_MAX:
                    self._ip_of.clear()
                self._ip_of[decision.host] = ip
        if ip is None:               # a name to resolve, SOCKS5, PROXY header, $sni
            self._spawn(self._serve(client, addr, info, decision), listener)
            return
        conn = _Conn(self, client, info)
        self.fast[conn] = None
        try:
            self._connect(conn, ip, decision)
        except Exception as exc:     # a bug (the OS's errors are handled inside): this one ends
            log.error("internal error in a connection handler: %r", exc, exc_info=exc)
            self._end(conn, RelayResult(0, 0, "error", repr(exc)))

    def _connect(self, conn: "_Conn", ip: str, decision) -> None:
        """open_direct for one address, without a coroutine: most loopback and LAN backends
        are connected when connect() returns."""
        conn.target = (ip, decision.port, decision.upstream, configured_backend(decision))
        conn.t0 = time.monotonic()
        try:
            # Non-blocking from socket() on: one system call fewer than setblocking(False).
            sock = conn.backend = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET,
                                                socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            hook = BACKEND_SOCKET_HOOK.get()     # tcp_splice's MSS clamp, if any
            if hook is not None:
                hook(sock)
            tagger = self.app.socket_tagger
            if tagger is not None:
                tagger(sock, decision.route_name, "backend")
            # Before connect(): the same one syscall, and the socket never sends without it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((ip, decision.port, 0, 0) if ":" in ip else (ip, decision.port))
            if err == errno.EINPROGRESS:
                if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED:
                    err = 0                       # ESTABLISHED: no error to ask SO_ERROR for
                else:
                    self.loop.add_writer(sock.fileno(), self._on_connect_ready, conn)
                    conn.timer = self.loop.call_later(self.app.connector.connect_timeout_s,
                                                      self._on_connect_timeout, conn)
                    return
        except OSError as exc:
            self._connect_failed(conn, exc)
            return
        if err:
            self._connect_failed(conn, OSError(err, os.strerror(err)))
        else:
            self._connected(conn)

    def _on_connect_ready(self, conn: "_Conn") -> None:
        self._stop_waiting(conn)
        err = conn.backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(conn, OSError(err, os.strerror(err)))
        else:
            self._connected(conn)

    def _on_connect_timeout(self, conn: "_Conn") -> None:
        conn.timer = None
        self._stop_waiting(conn)
        self._connect_failed(conn, None)

    def _stop_waiting(self, conn: "_Conn") -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self.loop.remove_writer(conn.backend.fileno())

    def _connect_failed(self, conn: "_Conn", exc: OSError | None) -> None:
        """The same UpstreamError (kind, message) as Connector.connect gives."""
        ip, port, upstream, backend = conn.target
        errors, fd_limited = {}, []
        if exc is not None:
            errors[ip] = _describe_oserror(exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                fd_limited.append(ip)
        try:
            _raise_connect_failure([ip], port, self.app.connector.connect_timeout_s, errors, {ip},
                                   exc is None, fd_limited)
        except UpstreamError as failure:
            result = RelayResult(0, 0, "connect_failed", str(failure))
            self.app.metrics.connect_failures.labels(upstream, backend, failure.kind).inc()
        self._end(conn, result)

    def _connected(self, conn: "_Conn") -> None:
        app = self.app
        ip, port, upstream, backend = conn.target
        conn.info.backend = format_addr(ip, port)
        app.hot.connect_time(upstream, backend, time.monotonic() - conn.t0)
        conn.target = None
        try:
            relay = app.relay_factory(conn.client, conn.backend)
        except OSError as exc:
            self._end(conn, _os_outcome(exc, RelayResult(0, 0, "error")))
            return
        except Exception as exc:
            log.error("internal error in a connection handler: %r", exc, exc_info=exc)
            self._end(conn, RelayResult(0, 0, "error", repr(exc)))
            return
        conn.info.relay = relay.kind
        conn.relay = relay
        start = getattr(relay, "start", None)
        # A relay that can call back when it ends (tcp_splice) needs no coroutine: no Task,
        # no future, no loop turn between its end and the connection's.
        if start is not None and start(conn.ended):
            return
        conn.coro = relay.run()
        self._step(conn)

    def _step(self, conn: "_Conn", _fut=None) -> None:
        """Drive the relay's run() as a Task would, without one: resume it when the future
        it awaits is done; its return value (or exception) ends the connection."""
        conn.waiting = None
        try:
            awaited = conn.coro.send(None)
        except StopIteration as stop:
            self._end(conn, stop.value)
            return
        except asyncio.CancelledError:
            self._end(conn, RelayResult(0, 0, "shutdown"))
            return
        except OSError as exc:
            self._end(conn, _os_outcome(exc, RelayResult(0, 0, "error")))
            return
        except Exception as exc:
            log.error("internal error in a connection handler: %r", exc, exc_info=exc)
            self._end(conn, RelayResult(0, 0, "error", repr(exc)))
            return
        if getattr(awaited, "_asyncio_future_blocking", False):
            awaited._asyncio_future_blocking = False
            conn.waiting = awaited
            awaited.add_done_callback(conn.wake)
        elif awaited is None:        # a bare yield (asyncio.sleep(0)): next loop turn
            self.loop.call_soon(self._step, conn)
        else:                        # not an asyncio future: a bug in the relay
            conn.coro.close()
            log.error("internal error in a connection handler: the %s relay awaited %r, not an "
                      "asyncio future", conn.relay.kind, awaited)
            self._end(conn, RelayResult(0, 0, "error", "relay awaited a non-future"))

    def _cancel(self, conn: "_Conn") -> None:
        """End of the drain: as Task.cancel() (the relay's coroutine sees CancelledError)."""
        if conn.waiting is not None:
            conn.waiting.cancel()
        elif conn.relay is not None and conn.coro is None:      # started with a callback
            conn.relay.abort("shutdown", "drain timeout")
        elif conn.relay is None and conn.timer is not None:       # still connecting
            self._stop_waiting(conn)
            self._end(conn, RelayResult(0, 0, "shutdown"))

    def _end(self, conn: "_Conn", result: RelayResult) -> None:
        self.fast.pop(conn, None)
        conn.coro = conn.relay = None
        self._close(conn.client, conn.backend, conn.info, result)
        self._closed_one(conn.info.listener)

    async def _read_hello(self, client: socket.socket, timeout_s: float):
        """Peek until the ClientHello is complete; the bytes stay queued in the socket."""
        deadline = self.loop.time() + timeout_s
        fd = client.fileno()
        have = 0
        while True:
            try:
                data = client.recv(PEEK_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise ClientGone(f"client error before ClientHello: {exc.strerror}") from None
            if data is not None:
                if not data:
                    raise ClientGone("client closed before sending a complete ClientHello"
                                     if have else "client closed without sending anything")
                outcome = clienthello.parse_client_hello(data)
                if not isinstance(outcome, clienthello.NeedMore):
                    if have:
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    return outcome
                if len(data) >= PEEK_BYTES:
                    return clienthello.Rejected("too_large", f"no complete ClientHello in {len(data)} bytes")
                if len(data) == have and _peer_finished(client):
                    # At EOF a MSG_PEEK recv returns the queued bytes again, never b"", and the
                    # socket stays readable whatever SO_RCVLOWAT says: without this check a
                    # partial hello + FIN spun this loop until client_hello_s (a DoS).
                    raise ClientGone(f"client closed after {have} bytes of an incomplete "
                                     "ClientHello")
                have = len(data)
                # Wake only when more than what we already peeked is queued (or at EOF):
                # without this the still-queued bytes would make the socket readable forever.
                # Better, wait for the end of the record being received: re-parsing before it
                # cannot change the outcome (a hello in 1-byte segments costs one parse per
                # record, not one per segment).
                lowat = min(max(have + 1, outcome.decides_at), PEEK_BYTES)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise HelloTimeout()
            readable = self.loop.create_future()
            self.loop.add_reader(fd, _set_done, readable)
            try:
                # asyncio.timeout, not wait_for: wait_for wraps the future in a Task, a cost
                # paid by most connections (accept usually runs before the hello arrives).
                async with asyncio.timeout(remaining):
                    await readable
            except TimeoutError:
                raise HelloTimeout() from None
            finally:
                self.loop.remove_reader(fd)

    def _account(self, info: ConnectionInfo, result: RelayResult) -> None:
        app = self.app
        duration = time.monotonic() - info.started
        app.hot.connection_done(info.route, result.outcome, result.bytes_up, result.bytes_down,
                                info.listener)
        if app.config.log.access_log:
            app.access_logger(info, result, duration)


class _Conn:
    """A connection on the callback path. While it is relayed, only this record, its
    ConnectionInfo, the relay and the relay's suspended run() are left of it."""

    __slots__ = ("worker", "client", "backend", "info", "relay", "coro", "waiting", "timer",
                 "target", "t0")

    def __init__(self, worker: Worker, client: socket.socket, info: ConnectionInfo):
        self.worker = worker
        self.client = client
        self.info = info
        self.backend: socket.socket | None = None
        self.relay: Relay | None = None
        self.coro = None                 # the relay's run() coroutine
        self.waiting: asyncio.Future | None = None     # the future run() awaits
        self.timer: asyncio.TimerHandle | None = None  # the connect timeout
        self.target: tuple | None = None               # (ip, port, upstream, backend label) while connecting
        self.t0 = 0.0

    def wake(self, _fut) -> None:
        self.worker._step(self)

    def ended(self, result: RelayResult) -> None:
        """A relay started with a callback has ended."""
        self.worker._end(self, result)


def _os_outcome(exc: OSError, result: RelayResult) -> RelayResult:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        # Most often the relay's pipes (the sockets were open already).
        result.outcome = "fd_limit"
        result.detail = (f"{exc.strerror}: out of file descriptors (raise the fd limit: "
                         "LimitNOFILE= / ulimit -n, add workers, or lower max_connections)")
    else:
        result.outcome = "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else "error"
        result.detail = str(exc)
    return result


_TCP_ESTABLISHED = 1
# Route hosts whose IP-literal test is remembered (a reload can bring new ones: bounded).
IP_CACHE_MAX = 1024

# tcp_info.tcpi_state values in which the client can send nothing more (it sent its FIN).
_TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSE, _TCP_CLOSING = 8, 9, 7, 11


def _peer_finished(sock: socket.socket) -> bool:
    """The client sent FIN (or the socket is dead): no more hello bytes can ever arrive.

    Asked only when a wake-up brought no new byte, so it costs nothing on the common path.
    """
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in (_TCP_CLOSE_WAIT, _TCP_LAST_ACK, _TCP_CLOSE, _TCP_CLOSING)


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _discard_queued(sock: socket.socket) -> None:
    """Read the peeked hello off the socket so close() sends FIN after our alert, not RST."""
    try:
        for _ in range(8):
            if not sock.recv(PEEK_BYTES):
                return
    except OSError:
        pass


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass

