"""The supervisor process: forks workers, serves /metrics /status /healthz, reloads, drains.

Workers share the listen port with SO_REUSEPORT (the kernel spreads new connections
over them, so both cores are used). Each worker gets its own listening socket, bound
here before the fork so a busy port is reported once, at start, with a clear error.
BPF maps created here before the fork are shared by all workers.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

from sniproxy import __version__
from sniproxy.config import ConfigError, config_file_warnings, load_config
from sniproxy.proxy.portowner import port_in_use_hint
from sniproxy.proxy import capacity, clienthello
from sniproxy.proxy.server import create_listener
from sniproxy.proxy.worker_process import encode_control, worker_main
from sniproxy.telemetry import metrics as metrics_mod
from sniproxy.telemetry.http import StatusServer, json_body
from sniproxy.telemetry.kernel_metrics import KernelCollector

log = logging.getLogger("sniproxy")

RESTART_BACKOFF_S = (0.1, 0.5, 1, 2, 5)   # a crash-looping worker does not spin the CPU
# Config keys a reload cannot change (sockets, processes, BPF objects made at start).
RESTART_ONLY_KEYS = ("listen_addr", "listen_backlog", "listen_defer_accept",
                     "listen_reuse_port_shared", "workers", "metrics_addr", "ebpf", "otlp",
                     "profiling")


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
    kernel_row: int | None = None      # its counter row / ring in the kernel data path


class Supervisor:
    def __init__(self, config_path: str, config, *, ebpf=None, route_tcp=None):
        self.config_path = config_path
        self.config = config
        self.ebpf = ebpf                      # sniproxy.relay.datapath.KernelDataPath or None
        self.route_tcp = route_tcp            # telemetry.route_tcp.RouteTcpTelemetry or None
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.stopping = False
        self.metrics_dir = metrics_mod.enable_multiprocess()
        # Held while the supervisor lives: a worker then never removes the directory (see
        # hold_multiprocess_dir and worker_process._wait_reparented).
        self.metrics_lock = metrics_mod.hold_multiprocess_dir()
        self.own_metrics = metrics_mod.ProxyMetrics()
        self.status_server: StatusServer | None = None
        self.otlp = None                      # telemetry.otlp_metrics.OtlpMetricsExporter
        self.otlp_error: str | None = None
        self.profiling = None                 # observe.continuous.ContinuousProfiler
        self.profiling_error: str | None = None
        self.export_states: list = []         # OTLP export results, one per signal
        self.extra_collectors: list = []      # more /metrics (and OTLP) families
        self.loop: asyncio.AbstractEventLoop | None = None
        self.all_stopped: asyncio.Event | None = None

    # ---------------- lifecycle ----------------
    def run(self) -> int:
        try:
            return asyncio.run(self._main())
        finally:
            metrics_mod.release_multiprocess_dir(self.metrics_lock, remove_if_last=False)
            metrics_mod.remove_multiprocess_dir(self.metrics_dir)

    async def _main(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.all_stopped = asyncio.Event()
        # Check the listen addresses once here: a clear error beats N crashing workers.
        # Without SO_REUSEPORT unless sharing is asked for: the workers' listeners set it, and a
        # check that set it too let a second instance start and silently take half the traffic.
        shared = self.config.listen_reuse_port_shared
        for addr in self.config.listen:
            try:
                create_listener(addr.host, addr.port, backlog=1, reuse_port=shared).close()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {addr}: {exc.strerror}"
                    + (f" ({port_in_use_hint(addr.port, shared)})" if exc.errno == errno.EADDRINUSE else "")
                    + (" (binding ports below 1024 needs CAP_NET_BIND_SERVICE)" if exc.errno == errno.EACCES else "")
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
        self._start_otlp()     # after the first fork: the workers never inherit its thread
        self._start_profiling()
        listen = ", ".join(str(a) for a in self.config.listen)
        log.info("sni-proxy %s listening on %s with %d worker(s); metrics on %s",
                 __version__, listen, len(self.slots), self.config.metrics_addr or "off")
        await self.all_stopped.wait()
        if self.profiling is not None:
            await asyncio.to_thread(self.profiling.stop)     # drains the last interval
        if self.otlp is not None:
            await asyncio.to_thread(self.otlp.stop)
        if self.status_server is not None:
            await self.status_server.close()
        if self.ebpf is not None:
            self.ebpf.close()
        if self.route_tcp is not None:
            self.route_tcp.close()
        log.info("sni-proxy stopped")
        return 0

    def _start_otlp(self) -> None:
        """OTLP metrics (issue 13): one exporter here, reading what /metrics reads."""
        from sniproxy.telemetry.otlp_common import ExportStateCollector, OtlpSetupError
        from sniproxy.telemetry.otlp_metrics import OtlpMetricsExporter
        self.extra_collectors.append(ExportStateCollector(self.export_states))
        try:
            self.otlp = OtlpMetricsExporter.from_config(self.config, self._registry,
                                                        start_time_ns=int(self.started_wall * 1e9))
        except (OtlpSetupError, ValueError) as exc:   # a bad OTEL_* variable: proxy anyway
            self.otlp_error = f"OTLP metrics disabled: {exc}"
            log.error("%s", self.otlp_error)
            return
        if self.otlp is not None:
            self.export_states.append(self.otlp.state)
            self.otlp.start()

    def _start_profiling(self) -> None:
        """Continuous profiling of the proxy's own processes (issue 13); failure never stops us."""
        if not self.config.profiling.enabled:
            return
        from sniproxy.telemetry.continuous_profiling import start_continuous_profiling
        try:
            self.profiling, collectors = start_continuous_profiling(self.config, self._own_pids)
        except Exception as exc:  # noqa: BLE001 - ProfilerError (capabilities), OTLP settings...
            self.profiling_error = f"continuous profiling disabled: {exc}"
            log.error("%s", self.profiling_error)
            return
        self.extra_collectors.extend(collectors)
        if self.profiling.otlp_state is not None:
            self.export_states.append(self.profiling.otlp_state)

    def _own_pids(self) -> list[int]:
        return [os.getpid()] + [s.pid for s in self.slots if s.alive]

    def _spawn(self, slot: WorkerSlot) -> None:
        listeners = [create_listener(a.host, a.port, backlog=self.config.listen_backlog, reuse_port=True,
                                     defer_accept=self.config.listen_defer_accept,
                                     tune=self.ebpf.tune_listener if self.ebpf is not None else None)
                     for a in self.config.listen]
        parent_end, child_end = socket.socketpair()
        kernel_factory = self.ebpf.worker_factory() if self.ebpf is not None else None
        supervisor_pid = os.getpid()
        tagger = self.route_tcp.tagger if self.route_tcp is not None else None
        # Everything alive now goes to the permanent generation: the workers' collections then
        # never write the GC headers of the objects they share with us, so those pages stay
        # shared (copy-on-write) instead of being copied into every worker (measured: 13.2 MiB
        # private per worker after its first full collection without this, 3.9 MiB with it).
        # It stays frozen here too: a full collection in the supervisor would copy its pages.
        gc.freeze()
        pid = os.fork()
        if pid == 0:   # child
            status = 1
            try:
                parent_end.close()
                if self.metrics_lock is not None:
                    os.close(self.metrics_lock)    # the supervisor's lock (see hold_multiprocess_dir)
                self._drop_inherited_fds({child_end.fileno(), *(ls.fileno() for ls in listeners)})
                status = worker_main(slot.index, self.config, listeners, child_end, kernel_factory,
                                     socket_tagger=tagger, supervisor_pid=supervisor_pid)
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
        slot.kernel_row = getattr(kernel_factory, "row", None)

    def _drop_inherited_fds(self, keep: set[int]) -> None:
        """In a new worker: let go of the supervisor's sockets it inherited.

        Another worker's control-socket end kept that worker from seeing the supervisor's
        death (EOF) until this one exited; the metrics listener kept the port bound by orphans.
        Every inherited socket goes but stdio and `keep` (this worker's listeners and control
        end); BPF objects are not sockets and stay, and so do epoll fds: gRPC's fork handler
        (the OTLP exporter) restarts its pollers in the child on the inherited epoll fd, and
        replacing it aborted the worker (epoll_wait EINVAL). Each fd is replaced by /dev/null rather
        than closed: the objects that own them (the supervisor's loop, forgotten here) still
        hold the numbers, and a later close of a reused number would hit an unrelated fd.
        """
        fds = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd in keep:
                continue
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):
                fds.append(fd)
        if not fds:
            return
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in fds:
                os.dup2(null, fd)
        finally:
            os.close(null)

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
        if self.ebpf is not None and slot.kernel_row is not None:
            self.ebpf.worker_gone(slot.kernel_row)
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
            # "auto" workers and map sizes resolve as at start (same host, same relay).
            kernel_relay = self.ebpf is not None and self.ebpf.modes.running("sockmap")
            new, _ = capacity.plan_and_resolve(new, kernel_relay=kernel_relay)
        except ConfigError as exc:
            self.own_metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, keeping the running config:\n%s", exc)
            return
        except OSError as exc:
            self.own_metrics.reloads.labels("rejected").inc()
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        for warning in config_file_warnings(self.config_path):
            log.warning("%s", warning)
        fixed = [key for key in RESTART_ONLY_KEYS if getattr(new, key) != getattr(self.config, key)]
        if fixed:
            log.warning("reload: %s changed but only take effect after a restart; the running "
                        "values stay in use", ", ".join(fixed))
            # Keep the running values in the config the workers get and a respawned worker is
            # built from: a worker restarted later listened on the new address while the
            # others kept the old one (half applied).
            new = new.model_copy(update={key: getattr(self.config, key) for key in fixed})
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
    def _registry(self):
        """What /metrics renders and the OTLP exporter sends: the same numbers."""
        registry = metrics_mod.aggregated_registry()
        if self.ebpf is not None:
            registry.register(KernelCollector(self.ebpf))
        if self.route_tcp is not None:
            registry.register(self.route_tcp.collector(lambda: self.config))
        for collector in self.extra_collectors:
            registry.register(collector)
        return registry

    def _metrics(self):
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics_mod.render(self._registry())

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
            # Which ClientHello parser new connections get (the workers inherit the choice).
            "clienthello_parser": {"parser": clienthello.PARSER,
                                   **({"detail": clienthello.PARSER_DETAIL}
                                      if clienthello.PARSER_DETAIL else {})},
            "ebpf": self.ebpf.status() if self.ebpf is not None else ebpf_off_status(self.config),
            "tracing": {"network": self.route_tcp.status() if self.route_tcp is not None else {
                "state": "disabled", "reason": "ebpf.tracing.network is false in the config"}},
            "otlp": self._otlp_status(),
            "profiling": self._profiling_status(),
            "ebpf_overhead": self._ebpf_overhead(),
        })

    def _ebpf_overhead(self) -> dict:
        """The CPU profiler's and every running tracer's cost in one report (BPF run time
        from bpf_stats plus user-space CPU; observe/tracing/base.py overhead_report)."""
        from sniproxy.observe.tracing import overhead_report
        profiler = self.profiling.profiler if self.profiling is not None else None
        tracer = self.route_tcp.tracer if self.route_tcp is not None else None
        return overhead_report(profiler, (tracer,) if tracer is not None else ())

    def _profiling_status(self) -> dict:
        from sniproxy.telemetry.continuous_profiling import profiling_status
        return profiling_status(self.profiling, self.config, self.profiling_error)

    def _otlp_status(self) -> dict:
        if self.otlp is not None:
            return self.otlp.status()
        from sniproxy.telemetry.otlp_metrics import off_status
        return off_status(self.config, error=self.otlp_error)

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
