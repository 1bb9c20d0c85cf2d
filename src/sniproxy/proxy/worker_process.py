"""The body of a forked worker process: its own event loop, app, listener and control channel."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import pickle
import logging
import os
import signal
import socket
import struct
import time

from sniproxy.proxy.app import ProxyApp
from sniproxy.proxy.resolver import TwoLevelDnsCache
from sniproxy.proxy.server import Worker
from sniproxy.proxy.upstream import BACKEND_SOCKET_HOOK
from sniproxy.telemetry import metrics as metrics_mod
from sniproxy.telemetry.metrics import ProxyMetrics

log = logging.getLogger("sniproxy")

# Control messages (new config snapshots) are pickles framed by an 8-byte length: parent
# and child are the same program, and a pickled Config needs no second validation.
MAX_CONTROL_MESSAGE = 256 << 20
_FRAME = struct.Struct("!Q")
# How often a worker publishes counters kept in plain Python (HotPath, the resolver's) to /metrics.
METRICS_SYNC_S = 1.0
# The cyclic collector's thresholds in a serving worker (CPython's default: 700, 10, 10).
# Measured (bench/newconn_breakdown.py, 3,000 new tcp_splice connections): with 700 a
# young collection ran every ~90 connections and cost 100-600 us on the worker's cold caches,
# plus one full collection of the worker's start-up objects (47-63 ms): 21-27 us per
# connection. Frozen start-up objects and 10,000: 2 us. A connection's objects hold no
# cycles on the callback path, so the larger first generation only delays freeing the rare
# cyclic garbage (a coroutine path's exception) by a few thousand allocations.
WORKER_GC_THRESHOLDS = (10_000, 10, 10)


def encode_control(message: dict) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(body)) + body


def new_event_loop(preference: str = "asyncio") -> asyncio.AbstractEventLoop:
    """The worker's loop: asyncio's epoll loop.

    uvloop is not used: measured here, it is no faster for a relay on raw fds, and with
    add_reader/add_writer on sockets reset by the peer (wrk closing with RST) it never woke
    the reader, so those connections (and their pipes) leaked until EMFILE.
    SNI_PROXY_EVENT_LOOP=uvloop selects it anyway, for experiments.
    """
    if preference == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("SNI_PROXY_EVENT_LOOP=uvloop but uvloop is not installed: "
                             "pip install 'sniproxy[uvloop]'") from None
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def worker_main(index: int, config, listeners: list[socket.socket], control: socket.socket,
                kernel_relay_factory=None, socket_tagger=None, *,
                supervisor_pid: int = 0) -> int:
    """Runs in the child after fork(); returns the exit status."""
    # The fork happened inside the supervisor's running loop: forget it here.
    asyncio.events._set_running_loop(None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    # SIGTERM (a drain) the moment the supervisor dies, even by SIGKILL; before the loop's
    # handler is installed the default action ends this connection-less worker at once.
    set_parent_death_signal(signal.SIGTERM)
    if supervisor_pid and os.getppid() != supervisor_pid:
        return 0                      # it died before the line above took effect
    metrics_lock = metrics_mod.hold_multiprocess_dir()
    loop = new_event_loop(os.environ.get("SNI_PROXY_EVENT_LOOP", "asyncio"))
    asyncio.set_event_loop(loop)
    seen = {"supervisor_gone": False}
    try:
        return loop.run_until_complete(_run(index, config, listeners, control, kernel_relay_factory,
                                            seen, socket_tagger))
    finally:
        # Done serving: a late SIGTERM (the supervisor's death signal arriving after its closed
        # control channel stopped us) must not kill this process before its clean-up below.
        # Blocked, not ignored: loop.close() puts the default action back.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        loop.close()
        # When the supervisor was killed nobody else removes the metrics files: the last
        # process out does (a no-op while the supervisor lives: it holds the lock too).
        if seen["supervisor_gone"] and supervisor_pid:
            _wait_reparented(supervisor_pid)
        metrics_mod.release_multiprocess_dir(metrics_lock, remove_if_last=True)


# How long a worker that saw its control channel close waits for the supervisor's exit to finish.
SUPERVISOR_EXIT_WAIT_S = 2.0


def _wait_reparented(supervisor_pid: int) -> None:
    """The control channel closes while the dying supervisor still releases its files (and its
    lock on the metrics directory); the kernel reparents its children only after that. No event
    says so, hence a short bounded poll (only on this rare path)."""
    deadline = time.monotonic() + SUPERVISOR_EXIT_WAIT_S
    while os.getppid() == supervisor_pid and time.monotonic() < deadline:
        time.sleep(0.01)


_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


async def _run(index, config, listeners, control, kernel_relay_factory, seen: dict,
               socket_tagger=None) -> int:
    loop = asyncio.get_running_loop()
    metrics = ProxyMetrics()
    kernel_relay = kernel_relay_factory(metrics) if kernel_relay_factory else None
    shared_dns = getattr(kernel_relay, "dns_shared", None)
    dns_cache = (TwoLevelDnsCache(shared_dns, counters=kernel_relay.counters)
                 if shared_dns is not None else None)
    app = ProxyApp(config, metrics, kernel_relay=kernel_relay, dns_cache=dns_cache,
                   socket_tagger=socket_tagger)
    splice = getattr(kernel_relay, "tcp_splice", None)
    if splice is not None:
        # tcp_splice: the MSS a backend socket advertises fits every interface a flow may
        # use (the listeners were clamped by the supervisor); every connection task
        # inherits the hook.
        BACKEND_SOCKET_HOOK.set(splice.clamp_socket)
    worker = Worker(app, listeners)
    worker.start()
    tune_gc()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)   # the supervisor reloads for us
    control.setblocking(False)
    buffer = bytearray()

    def on_control() -> None:
        try:
            chunk = control.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            # The supervisor is gone: stop rather than run unsupervised.
            loop.remove_reader(control.fileno())
            seen["supervisor_gone"] = True
            stop.set()
            return
        buffer.extend(chunk)
        while len(buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer)
            if size > MAX_CONTROL_MESSAGE:
                log.error("control message of %d bytes is too large; closing the channel", size)
                loop.remove_reader(control.fileno())
                return
            if len(buffer) < _FRAME.size + size:
                break
            body = bytes(buffer[_FRAME.size:_FRAME.size + size])
            del buffer[:_FRAME.size + size]
            _handle_control(app, pickle.loads(body))

    loop.add_reader(control.fileno(), on_control)

    def sync_metrics() -> None:
        app.flush_metrics()
        app.pipes.trim()              # idle pipes of the relay pool go back after a burst
        loop.call_later(METRICS_SYNC_S, sync_metrics)

    loop.call_later(METRICS_SYNC_S, sync_metrics)
    log.debug("worker %d ready (pid %d)", index, os.getpid())
    await stop.wait()
    loop.remove_reader(control.fileno())
    await worker.drain(app.config.timeouts.shutdown_grace_s)
    app.flush_metrics()
    if kernel_relay is not None:
        kernel_relay.close()
    return 0


def tune_gc() -> None:
    """Once the worker is set up: what it allocated so far (config, routes, BPF objects, the
    loop) lives as long as the worker, so the collector stops walking it (the supervisor froze
    its own objects before fork() for the same reason), and young collections come less often
    (WORKER_GC_THRESHOLDS)."""
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)


def _handle_control(app: ProxyApp, message: dict) -> None:
    if message.get("cmd") == "reload":
        try:
            app.apply(message["config"])
        except Exception:
            log.exception("worker could not apply the new config; keeping the old one")
