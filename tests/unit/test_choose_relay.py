"""The per-connection choice, in one function: tcp_splice, then sockmap, then user space.

The kernel sides are stand-ins that accept or refuse (their own tests prove the mechanisms);
the sockets and the user-space relay are real."""
from __future__ import annotations

import asyncio
import socket

import pytest

from sniproxy.relay.choose import RelaySettings, choose_relay
from sniproxy.relay.userspace import UserspaceRelay

SETTINGS = RelaySettings(idle_timeout_s=7, use_splice=True, buffer_bytes=65536)


class Side:
    """A kernel relay kind that takes the connection (returns `relay`) or refuses (None)."""

    def __init__(self, relay=None):
        self.relay = relay
        self.asked: list[float] = []

    def try_relay(self, client, backend, *, idle_timeout_s):
        self.asked.append(idle_timeout_s)
        return self.relay


class Kernel(Side):
    def __init__(self, relay=None, tcp_splice=None):
        super().__init__(relay)
        self.tcp_splice = tcp_splice


@pytest.fixture
def ends():
    a, b = socket.socketpair()
    a.setblocking(False)          # as the proxy hands them over
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_tcp_splice_first_when_it_takes_the_connection(ends):
    kernel = Kernel(relay="sockmap relay", tcp_splice=Side("tcp_splice relay"))
    assert choose_relay(*ends, SETTINGS, kernel=kernel) == "tcp_splice relay"
    assert kernel.tcp_splice.asked == [7] and kernel.asked == []


def test_sockmap_when_tcp_splice_refuses_or_is_off(ends):
    refused = Kernel(relay="sockmap relay", tcp_splice=Side(None))
    assert choose_relay(*ends, SETTINGS, kernel=refused) == "sockmap relay"
    assert refused.tcp_splice.asked == [7] and refused.asked == [7]
    off = Kernel(relay="sockmap relay", tcp_splice=None)
    assert choose_relay(*ends, SETTINGS, kernel=off) == "sockmap relay"


@pytest.mark.parametrize("use_splice,kind", [(True, "splice"), (False, "copy")])
def test_user_space_when_the_kernel_refuses_or_is_absent(ends, use_splice, kind):
    settings = RelaySettings(idle_timeout_s=7, use_splice=use_splice, buffer_bytes=65536)

    async def main(kernel):
        relay = choose_relay(*ends, settings, kernel=kernel)
        assert isinstance(relay, UserspaceRelay) and relay.kind == kind
        relay.abort("shutdown", "test over")           # releases its pipes
        return await asyncio.wait_for(relay.run(), 2)

    for kernel in (None, Kernel(relay=None, tcp_splice=Side(None))):
        assert asyncio.run(main(kernel)).outcome == "shutdown"
