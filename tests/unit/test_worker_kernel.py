"""The worker's kernel side (`relay.sockmap.WorkerKernel`) without root: what it does when the
sockmap is off or full, and how its one epoll fd routes socket events to the right relay.

The owner (the supervisor's KernelDataPath) is a stand-in with the attributes WorkerKernel
reads; the counters are the real shared-memory rows and the sockets and epoll are real."""
from __future__ import annotations

import asyncio
import logging
import select
import socket
from types import SimpleNamespace

import pytest

from sniproxy.config import parse_config
from sniproxy.ebpf.stats import SharedCounters
from sniproxy.relay.sockmap import _WATCH, WorkerKernel


class Modes:
    def __init__(self, running: bool):
        self._running = running

    def running(self, name: str) -> bool:
        return self._running

    def state(self, name: str) -> str:
        return "active" if self._running else "disabled"


def _owner(*, sockmap_on: bool, max_entries: int = 8):
    config = parse_config({"listen_addr": "127.0.0.1:8443", "default_backend": "127.0.0.1:9443",
                           "ebpf": {"enabled": True}})
    return SimpleNamespace(
        config=config, modes=Modes(sockmap_on), dns_map=None, sndbuf_force_ok=False,
        sockmap=SimpleNamespace(maps=SimpleNamespace(max_entries=max_entries)) if sockmap_on else None,
        counters=SharedCounters(2))


class RecordingRelay:
    def __init__(self):
        self.events: list[tuple[int, int]] = []
        self.credits: list[int] = []
        self.aborted: list[str] = []
        self.got_event = asyncio.Event()

    def on_socket_event(self, side: int, events: int) -> None:
        self.events.append((side, events))
        self.got_event.set()

    def on_credit(self, side: int) -> None:
        self.credits.append(side)

    def abort(self, outcome: str, detail: str = "") -> None:
        self.aborted.append(outcome)


def test_with_the_sockmap_off_every_connection_goes_to_user_space():
    owner = _owner(sockmap_on=False)
    kernel = WorkerKernel(owner, None, None, 0, owner.counters.row(0))
    a, b = socket.socketpair()
    with a, b:
        assert kernel.try_relay(a, b, idle_timeout_s=5) is None
    assert owner.counters.totals()["fallback_map_full"] == 0       # off is not a fallback
    kernel.close()


def test_a_full_sockmap_falls_back_counted_and_warns_once_per_reason(caplog):
    owner = _owner(sockmap_on=True, max_entries=8)
    row = owner.counters.row(0)
    row.add("inserted", 4)                     # 4 pairs = 8 entries: the map is full
    kernel = WorkerKernel(owner, None, None, 0, row)

    async def main():
        with caplog.at_level(logging.DEBUG, logger="sniproxy"):
            for _ in range(3):
                a, b = socket.socketpair()
                with a, b:
                    assert kernel.try_relay(a, b, idle_timeout_s=5) is None
        kernel.close()
    asyncio.run(main())
    assert row.get("fallback_map_full") == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Map capacity full: 4 connections use the 8-entry" in \
        warnings[0].getMessage() and "raise ebpf.sockmap.max_entries" in warnings[0].getMessage()


def test_socket_events_reach_the_relay_and_side_they_belong_to():
    owner = _owner(sockmap_on=True)
    kernel = WorkerKernel(owner, None, None, 0, owner.counters.row(0))
    pairs = [socket.socketpair() for _ in range(2)]        # (relay end, far end) x 2 relays
    relays = [RecordingRelay(), RecordingRelay()]

    async def main():
        kernel._ensure_loop()
        for i, (relay_end, _) in enumerate(pairs):
            relay_end.setblocking(False)
            kernel._by_fd[relay_end.fileno()] = (relays[i], i)     # relay i, side i
            kernel._epoll.register(relay_end.fileno(), _WATCH)
        pairs[1][1].shutdown(socket.SHUT_WR)                       # the far end of relay 1: FIN
        await asyncio.wait_for(relays[1].got_event.wait(), 2)
        assert relays[0].events == []
        side, events = relays[1].events[0]
        assert side == 1 and events & select.EPOLLRDHUP
        kernel.close()                                              # worker exit
    try:
        asyncio.run(main())
    finally:
        for a, b in pairs:
            a.close()
            b.close()
    assert relays[0].aborted == ["shutdown"] and relays[1].aborted == ["shutdown"]
