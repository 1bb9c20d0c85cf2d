"""What every relay kind shares: the `Relay` protocol, its result, and the reset-on-close helper.

A relay moves the bytes of one connected (client, backend) pair until both directions ended,
one side reset, the idle timeout fired or it was aborted. The proxy only sees this protocol:

    relay = choose_relay(...)           # relay.choose
    result = await relay.run()          # RelayResult
    relay.abort("shutdown", "...")      # from outside: ends run() with a reset of both sides
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol

# SO_LINGER {on, 0 s}: close() then sends RST instead of FIN, so a reset on one side reaches
# the other side as a reset (never as a clean end of stream).
_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


@dataclass
class RelayResult:
    bytes_up: int          # client -> backend
    bytes_down: int        # backend -> client
    outcome: str           # "ok", "reset", "idle_timeout", "shutdown"
    detail: str = ""


class Relay(Protocol):
    kind: str              # "splice", "copy", "sockmap", "tcp_splice": the relay label in metrics

    async def run(self) -> RelayResult: ...

    def abort(self, outcome: str, detail: str = "") -> None: ...


def reset_on_close(*socks: socket.socket) -> None:
    """Make close() of each socket send RST; errors (already closed) are ignored."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass


def fin_on_close(*socks: socket.socket) -> None:
    """Undo reset_on_close: close() sends FIN again (errors are ignored)."""
    for sock in socks:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
        except OSError:
            pass
