"""The supervisor process: forks workers, serves /metrics /status /healthz, reloads, drains.

Workers share the listen port with SO_REUSEPORT (the kernel spreads new connections
over them, so both cores are used). Each worker gets its own listening socket, bound
here before the fork so a busy port is reported once, at start, with a clear error.
BPF maps created here before the fork are shared by all workers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from sniproxy import __version__
from sniproxy.config import ConfigError, load_config
from sniproxy.proxy.server import create_listener
from sniproxy.proxy.worker_process import encode_control, worker_main
from sniproxy.telemetry import metrics as metrics_mod
from sniproxy.telemetry.http import StatusServer, json_body

log = logging.getLogger("sniproxy")

RESTART_BACKOFF_S = (0.1, 0.5, 1, 2, 5)   # a crash-looping worker does not spin the CPU


class StartupError(Exception):
    """The proxy cannot start; the message says why and what to do."""


@dataclass
class WorkerSlot:
    index: int
    pid: int = 0
    control: socket.socket | None = None
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)
    alive: bool = False


class Supervisor:
    def __init__(self, config_path: str, config, *, ebpf=None):
        self.config_path = config_path
        self.config = config
        self.ebpf = ebpf                      # sniproxy.relay.datapath.KernelDataPath or None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.stopping = False
        self.metrics_dir = metrics_mod.enable_multiprocess()
        self.own_metrics = metrics_mod.ProxyMetrics()
        self.status_server: StatusServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.all_stopped: asyncio.Event | None = None

    # ---------------- lifecycle ----------------
    def run(self) -> int:
        try:
            return asyncio.run(self._main())
        finally:
            metrics_mod.remove_multiprocess_dir(self.metrics_dir)

    async def _main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.all_stopped = asyncio.Event()
        # Check the listen addresses once here: a clear error beats N crashing workers.
        for addr in self.config.listen:
            try:
                create_listener(addr.host, addr.port, backlog=1, reuse_port=True).close()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {addr}: {exc.strerror}"
                    + (" (another process uses this port: stop it or change listen_addr)"
                       if exc.errno == 98 else "")
                    + (" (binding ports below 1024 needs CAP_NET_BIND_SERVICE)" if exc.errno == 13 else "")
                ) from None
        if self.config.metrics_addr:
            self.status_server = StatusServer({
                "/metrics": self._metrics, "/status": self._status, "/healthz": self._healthz})
            host, port = self.config.metrics.host, self.config.metrics.port
            try:
                await self.status_server.start(host, port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {self.config.metrics_addr}: {exc.strerror}"
                                   " (change metrics_addr, or set it to null)") from None
        for sig, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGINT, self._on_stop),
                             (signal.SIGHUP, self._on_reload), (signal.SIGCHLD, self._reap)):
            self.loop.add_signal_handler(sig, handler)
        for slot in self.slots:
            self._spawn(slot)
        listen = ", ".join(str(a) for a in self.config.listen)
        log.info("sni-proxy %s listening on %s with %d worker(s); metrics on %s",
                 __version__, listen, len(self.slots), self.config.metrics_addr or "off")
        await self.all_stopped.wait()
        if self.status_server is not None:
            await self.status_server.close()
        if self.ebpf is not None:
            self.ebpf.close()
        log.info("sni-proxy stopped")
        return 0

    def _spawn(self, slot: WorkerSlot) -> None:
        listeners = [create_listener(a.host, a.port, backlog=self.config.listen_backlog, reuse_port=True,
                                     defer_accept=self.config.listen_defer_accept)
                     for a in self.config.listen]
        parent_end, child_end = socket.socketpair()
        kernel_factory = self.ebpf.worker_factory() if self.ebpf is not None else None
        pid = os.fork()
        if pid == 0:   # child
            status = 1
            try:
                parent_end.close()
                status = worker_main(slot.index, self.config, listeners, child_end, kernel_factory)
            except BaseException:
                log.exception("worker %d crashed", slot.index)
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        for lsock in listeners:
            lsock.close()
        parent_end.setblocking(False)
        slot.pid, slot.control, slot.alive, slot.started = pid, parent_end, True, time.monotonic()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            for slot in self.slots:
                if slot.pid == pid and slot.alive:
                    self._worker_exited(slot, status)
        if self.stopping and not any(s.alive for s in self.slots):
            self.all_stopped.set()

    def _worker_exited(self, slot: WorkerSlot, status: int) -> None:
        slot.alive = False
        metrics_mod.mark_worker_dead(slot.pid)
        if slot.control is not None:
            slot.control.close()
            slot.control = None
        if self.stopping:
            return
        code = os.waitstatus_to_exitcode(status)
        why = f"signal {-code}" if code < 0 else f"exit status {code}"
        delay = RESTART_BACKOFF_S[min(slot.restarts, len(RESTART_BACKOFF_S) - 1)]
        if time.monotonic() - slot.started > 30:
            slot.restarts = 0      # it ran fine for a while: not a crash loop
            delay = RESTART_BACKOFF_S[0]
        if code == 0:
            # A stop signal sent to the whole process group (Ctrl-C, `timeout`) reaches the
            # worker before the supervisor: restart unless the supervisor's stop follows.
            log.warning("worker %d (pid %d) exited without being asked; restarting in %.1fs",
                        slot.index, slot.pid, delay)
        else:
            log.error("worker %d (pid %d) died with %s; restarting in %.1fs", slot.index, slot.pid, why, delay)
        slot.restarts += 1
        self.own_metrics.worker_restarts.inc()
        self.loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: WorkerSlot) -> None:
        if not self.stopping and not slot.alive:
            try:
                self._spawn(slot)
            except OSError as exc:
                log.error("cannot restart worker %d: %s", slot.index, exc)
                self.loop.call_later(RESTART_BACKOFF_S[-1], self._respawn, slot)

    def _on_stop(self) -> None:
        if self.stopping:
            log.warning("second stop signal: killing workers now")
            for slot in self.slots:
                if slot.alive:
                    _kill(slot.pid, signal.SIGKILL)
            return
        self.stopping = True
        grace = self.config.timeouts.shutdown_grace_s
        log.info("stopping: workers stop accepting and drain for up to %ss", grace)
        for slot in self.slots:
            if slot.alive:
                _kill(slot.pid, signal.SIGTERM)
        if not any(s.alive for s in self.slots):
            self.all_stopped.set()
        # Workers cut remaining connections at the end of the grace period; this is the backstop.
        self.loop.call_later(grace + 10, self._kill_stragglers)

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            if slot.alive:
                log.error("worker %d did not stop in time: SIGKILL", slot.index)
                _kill(slot.pid, signal.SIGKILL)

    def _on_reload(self) -> None:
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.own_metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, keeping the running config:\n%s", exc)
            return
        except OSError as exc:
            self.own_metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        fixed = [key for key in ("listen", "workers", "metrics_addr", "listen_backlog",
                                 "listen_defer_accept", "ebpf")
                 if getattr(new, key) != getattr(self.config, key)]
        if fixed:
            log.warning("reload: %s changed but only take effect after a restart", ", ".join(fixed))
        self.config = new
        message = encode_control({"cmd": "reload", "config": new})
        for slot in self.slots:
            if slot.alive and slot.control is not None:
                self.loop.create_task(self._send(slot, message))
        self.own_metrics.reloads.labels("applied").inc()
        log.info("config reloaded from %s: %d routes; applies to new connections",
                 self.config_path, len(new.routes))

    async def _send(self, slot: WorkerSlot, message: bytes) -> None:
        try:
            await self.loop.sock_sendall(slot.control, message)
        except OSError as exc:
            log.error("cannot send the new config to worker %d: %s", slot.index, exc)

    # ---------------- HTTP views ----------------
    def _metrics(self):
        registry = metrics_mod.aggregated_registry()
        if self.ebpf is not None:
            registry.register(self.ebpf.collector())
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics_mod.render(registry)

    def _active_connections(self) -> int:
        for family in metrics_mod.aggregated_registry().collect():
            if family.name == "sniproxy_active_connections":
                return int(sum(s.value for s in family.samples))
        return 0

    def _status(self):
        return json_body({
            "version": __version__,
            "pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_wall)),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "stopping": self.stopping,
            "config": self.config.summary(),
            "workers": [{"index": s.index, "pid": s.pid, "alive": s.alive, "restarts": s.restarts}
                        for s in self.slots],
            "active_connections": self._active_connections(),
            "ebpf": self.ebpf.status() if self.ebpf is not None else ebpf_off_status(self.config),
        })

    def _healthz(self):
        alive = sum(s.alive for s in self.slots)
        if self.stopping:
            return 503, "text/plain", b"stopping\n"
        if alive == 0:
            return 503, "text/plain", b"no worker alive\n"
        return 200, "text/plain", f"ok: {alive}/{len(self.slots)} workers\n".encode()


def ebpf_off_status(config) -> dict:
    """The /status `ebpf` object when the kernel data path is not in use at all."""
    reason = "ebpf.enabled is false in the config"
    return {"enabled": False, "mode": "none", "sockmap": "disabled", "dns_cache": "disabled",
            "stats": "disabled", "tcp_splice": "disabled",
            "reasons": {"sockmap": reason, "dns_cache": reason, "stats": reason,
                        "tcp_splice": reason}}


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
