"""`sni-proxy [run] --config FILE`: validate the config, set up logging and eBPF, start the supervisor."""
from __future__ import annotations

import argparse
import logging
import resource
import sys

from sniproxy import __version__
from sniproxy.config import ConfigError, config_file_warnings, load_config
from sniproxy.logs import resolve_level, setup_logging

log = logging.getLogger("sniproxy")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sni-proxy [run]", description="TLS SNI proxy (reads the SNI, never terminates TLS)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  sni-proxy --config /etc/sni-proxy/config.json          run (run is the default command)
  sni-proxy run -c config.json --log-level debug         the same, with debug logs
  sni-proxy --config config.json --check-config          validate only: exit 0 valid, 2 not
  kill -HUP <pid>     reload the config (workers drain, new ones start)
  kill -TERM <pid>    drain and stop

Config reference: docs/configuration.md; what the host must allow: `sni-proxy check`.""")
    p.add_argument("--config", "-c", required=True, help="path to config.json")
    p.add_argument("--check-config", action="store_true", help="validate the config and exit (0 = valid)")
    p.add_argument("--log-level", help="debug, info, warning, error (overrides SNI_PROXY_LOG and log.level)")
    p.add_argument("--version", action="version", version=f"sni-proxy {__version__}")
    return p


def cli_run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sni-proxy: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sni-proxy: cannot read config {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    from sniproxy.proxy import capacity
    host = capacity.HostLimits.read()
    support = None
    # --check-config never touches BPF: it assumes the sockmap runs when the config asks for it.
    kernel_relay = None if args.check_config else False
    if config.ebpf.enabled and not args.check_config:
        # Probed once here (and handed to the data path): the fds a connection needs depend on
        # whether the kernel relays it (2) or a splice relay does (6).
        support = probe_support_in_child()
        requested = config.ebpf_requested()
        kernel_relay = (requested["sockmap"] and support.ok("sockmap")) or \
            (requested["tcp_splice"] and support.ok("tcp_splice"))
    config, plan = capacity.plan_and_resolve(config, host, kernel_relay=kernel_relay)
    if args.check_config:
        print(f"{args.config}: OK ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
              f"{config.workers} worker(s), listening on {', '.join(str(a) for a in config.listen)})")
        return 0
    try:
        level = resolve_level(args.log_level, config.log.level)
    except ValueError as exc:
        print(f"sni-proxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(level, config.log.format, config.log.file)
    for warning in config_file_warnings(args.config):
        log.warning("%s", warning)
    _raise_fd_limit()
    if plan.workers_auto and plan.fds_per_worker > plan.fd_limit:
        # "auto" promised to fit max_connections and cannot: refuse rather than half-work.
        log.error("cannot reach max_connections with workers \"auto\": %s", "; ".join(plan.problems))
        return 2
    for problem in plan.problems:
        log.warning("%s", problem)
    log.info("capacity: %s", plan.summary())

    if config_needs_dns(config):
        from sniproxy.proxy.resolver import preload_dnspython
        preload_dnspython()

    from sniproxy.proxy.supervisor import StartupError, Supervisor
    ebpf = None
    if config.ebpf.enabled:
        from sniproxy.relay.datapath import KernelDataPath, KernelStartError
        try:
            ebpf = KernelDataPath.start(config, support)
        except KernelStartError as exc:
            log.error("%s", exc)
            return 3
        if plan.relay == "sockmap" and not ebpf.modes.running("sockmap"):
            # Probed fine but failed to load: connections take the splice relay (6 fds each).
            fallback = capacity.plan_capacity(config, host, kernel_relay=False)
            if fallback.fds_per_worker > fallback.fd_limit:
                log.warning("the sockmap relay did not start: with the user-space relay %d "
                            "worker(s) need %d fds each (limit %d); restart with workers set to "
                            "\"auto\" or lower max_connections", config.workers,
                            fallback.fds_per_worker, fallback.fd_limit)
    route_tcp = None
    if config.ebpf.tracing.network:
        from sniproxy.telemetry.route_tcp import RouteTcpTelemetry
        route_tcp = RouteTcpTelemetry.start()      # degraded (with the reason) on failure
        if route_tcp.state != "active" and config.fallback_mode == "strict":
            log.error("ebpf.tracing.network cannot run and fallback_mode is \"strict\": %s",
                      route_tcp.reason)
            if ebpf is not None:
                ebpf.close()
            return 3
    try:
        return Supervisor(args.config, config, ebpf=ebpf, route_tcp=route_tcp).run()
    except StartupError as exc:
        log.error("%s", exc)
        return 3
    except KeyboardInterrupt:
        return 130


def config_needs_dns(config) -> bool:
    """Some destination is a name (or the client's SNI): the workers will query DNS."""
    from sniproxy.proxy.resolver import ip_literal
    hosts = [route.target.host for route in config.routes if route.upstream == "direct"]
    if config.default_backend is not None:
        from sniproxy.config import parse_backend
        hosts.append(parse_backend(config.default_backend).host)
    hosts += [u.address.host for u in config.upstreams.values()]
    return any(h is None or ip_literal(h) is None for h in hosts)


def probe_support_in_child():
    """`check_system_support()` run in a short-lived child process; its report comes back pickled.

    Probing loads the kernel's BTF (kept cached by libbpf.py: ~6 MiB of malloc), pyelftools and
    a dozen probe programs: memory the supervisor would keep for its whole life and share
    into every worker. Measured: 8 MiB less PSS for the proxy with 2 workers. Any failure of
    the child falls back to probing here.
    """
    import os
    import pickle

    from sniproxy.ebpf.support import adopt_report, check_system_support

    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return check_system_support()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            data = pickle.dumps(check_system_support(), protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(w, "wb") as out:
                out.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if status == 0 and data:
        try:
            return adopt_report(pickle.loads(data))
        except Exception:  # noqa: BLE001 - any bad answer: probe here instead
            pass
    return check_system_support()


def _raise_fd_limit() -> None:
    """Raise the soft fd limit to the hard one (the capacity plan counted on it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
