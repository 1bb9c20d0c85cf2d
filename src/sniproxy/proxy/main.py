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

# Sockets per connection: client + backend; the splice relay adds two pipes (4 fds).
FDS_PER_CONNECTION_SPLICE = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sni-proxy", description="TLS SNI proxy (reads the SNI, never terminates TLS)")
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
    _raise_fd_limit(config)

    from sniproxy.proxy.supervisor import StartupError, Supervisor
    ebpf = None
    if config.ebpf.enabled:
        from sniproxy.relay.datapath import KernelDataPath, KernelStartError
        try:
            ebpf = KernelDataPath.start(config)
        except KernelStartError as exc:
            log.error("%s", exc)
            return 3
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


def _raise_fd_limit(config) -> None:
    """Raise the soft fd limit to the hard one and say when max_connections cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    per_worker = -(-config.max_connections // config.workers)
    needed = per_worker * FDS_PER_CONNECTION_SPLICE + 64
    if needed > soft:
        log.warning(
            "max_connections=%d needs up to %d fds per worker with the user-space relay, but the fd "
            "limit is %d: accept will pause with EMFILE before the limit (raise LimitNOFILE= / "
            "ulimit -n, add workers, or lower max_connections)", config.max_connections, needed, soft)
