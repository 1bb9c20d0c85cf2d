"""Which relay a connection gets: the first kind, in order, that takes it.

Order: the packet-level splice in tc (tcp_splice), then the kernel sockmap, when the worker
has them and the pair qualifies, then the user-space splice, then the copy. A kind that refuses a connection counts why (the kernel side
counts its own fallback reasons); the chosen kind is counted by the caller's metrics.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from sniproxy.relay.base import Relay
from sniproxy.relay.userspace import PipePool, UserspaceRelay


@dataclass
class RelaySettings:
    idle_timeout_s: float
    use_splice: bool          # splice(2) works here and relay.mode allows it
    buffer_bytes: int         # the copy relay's buffer per direction


def choose_relay(client: socket.socket, backend: socket.socket, settings: RelaySettings, *,
                 kernel=None, pipes: PipePool | None = None) -> Relay:
    """The relay for this connected pair. `kernel` is the worker's relay.sockmap.WorkerKernel."""
    if kernel is not None and getattr(kernel, "tcp_splice", None) is not None:
        relay = kernel.tcp_splice.try_relay(client, backend,
                                            idle_timeout_s=settings.idle_timeout_s)
        if relay is not None:
            return relay
    if kernel is not None:
        relay = kernel.try_relay(client, backend, idle_timeout_s=settings.idle_timeout_s)
        if relay is not None:
            return relay
    return UserspaceRelay(client, backend, use_splice=settings.use_splice,
                          idle_timeout_s=settings.idle_timeout_s,
                          buffer_bytes=settings.buffer_bytes, pipes=pipes)
