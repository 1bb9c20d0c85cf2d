"""`sni-proxy [run] --config FILE`: validate the config, set up logging and eBPF, start the supervisor."""
from __future__ import annotations

import argparse
import logging
import resource
import sys

from sniproxy import __version__
from sniproxy.config import ConfigError, load_config
from sniproxy.logs import resolve_level, setup_logging

log = logging.getLogger("sniproxy")


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
    from sniproxy.proxy import capacity
    host = capacity.HostLimits.read()
    support = None
    # --check-config never touches BPF: it assumes the sockmap runs when the config asks for it.
    kernel_relay = None if args.check_config else False
    if config.ebpf_requested()["sockmap"] and not args.check_config:
        # Probed once here (and handed to the data path): the fds a connection needs depend on
        # whether the kernel relays it (2) or a splice relay does (6).
        from sniproxy.ebpf.support import check_system_support
        support = check_system_support()
        kernel_relay = support.ok("sockmap")
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
    _raise_fd_limit()
    if plan.problems and plan.workers_auto:
        # "auto" promised to fit max_connections and cannot: refuse rather than half-work.
        log.error("cannot reach max_connections with workers \"auto\": %s", "; ".join(plan.problems))
        return 2
    for problem in plan.problems:
        log.warning("%s", problem)
    log.info("capacity: %s", plan.summary())

    from sniproxy.proxy.supervisor import StartupError, Supervisor
    ebpf = None
    if config.ebpf.enabled:
        from sniproxy.relay.datapath import KernelDataPath, KernelStartError
        try:
            ebpf = KernelDataPath.start(config, support)
        except KernelStartError as exc:
            log.error("%s", exc)
            return 3
    try:
        return Supervisor(args.config, config, ebpf=ebpf).run()
    except StartupError as exc:
        log.error("%s", exc)
        return 3
    except KeyboardInterrupt:
        return 130


def _raise_fd_limit() -> None:
    """Raise the soft fd limit to the hard one (the capacity plan counted on it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
