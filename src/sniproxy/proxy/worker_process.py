"""The body of a forked worker process: its own event loop, app, listener and control channel."""
from __future__ import annotations

import asyncio
import pickle
import logging
import os
import signal
import socket
import struct

from sniproxy.proxy.app import ProxyApp
from sniproxy.proxy.server import Worker
from sniproxy.telemetry.metrics import ProxyMetrics

log = logging.getLogger("sniproxy")

# Control messages (new config snapshots) are pickles framed by an 8-byte length: parent
# and child are the same program, and a pickled Config needs no second validation.
MAX_CONTROL_MESSAGE = 256 << 20
_FRAME = struct.Struct("!Q")
# How often a worker publishes counters kept in plain Python (HotPath, the resolver's) to /metrics.
METRICS_SYNC_S = 1.0


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
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def worker_main(index: int, config, listeners: list[socket.socket], control: socket.socket,
                kernel_relay_factory=None, socket_tagger=None) -> int:
    """Runs in the child after fork(); returns the exit status."""
    # The fork happened inside the supervisor's running loop: forget it here.
    asyncio.events._set_running_loop(None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    loop = new_event_loop(os.environ.get("SNI_PROXY_EVENT_LOOP", "asyncio"))
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_run(index, config, listeners, control, kernel_relay_factory,
                                            socket_tagger))
    finally:
        loop.close()


async def _run(index, config, listeners, control, kernel_relay_factory, socket_tagger=None) -> int:
    loop = asyncio.get_running_loop()
    metrics = ProxyMetrics()
    kernel_relay = kernel_relay_factory(metrics) if kernel_relay_factory else None
    app = ProxyApp(config, metrics, kernel_relay=kernel_relay,
                   dns_cache=getattr(kernel_relay, "dns_cache", None), socket_tagger=socket_tagger)
    worker = Worker(app, listeners)
    worker.start()
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


def _handle_control(app: ProxyApp, message: dict) -> None:
    if message.get("cmd") == "reload":
        try:
            app.apply(message["config"])
        except Exception:
            log.exception("worker could not apply the new config; keeping the old one")
