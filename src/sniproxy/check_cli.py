"""`sni-proxy check`: what eBPF this host allows, and whether it can run a given config.

An entry point: it puts together the support probes (`ebpf.support`), the config and what
the proxy derives from it (systemd unit lines), which the `ebpf` package itself may not know.
"""
from __future__ import annotations

import argparse
import json
import sys

from sniproxy.ebpf.support import (
    Check, _load_ebpf_section, check_system_support, format_report, requested_checks,
)


def _unit_lines(path: str) -> list[str]:
    """The systemd unit lines for a config (deploy/systemd/sni-proxy.service)."""
    from sniproxy.config import ConfigError, load_config
    from sniproxy.privileges import unit_lines
    from sniproxy.proxy.capacity import plan_and_resolve
    try:
        config, _ = plan_and_resolve(load_config(path))    # workers "auto" -> a number
        return unit_lines(config)
    except (ConfigError, OSError) as e:
        return [f"# cannot derive the unit lines: {e}"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sni-proxy check",
        description="Measure what eBPF this kernel and these privileges allow. Exit 0 when "
                    "everything the config asks for (default: the proxy's kernel data path) "
                    "is available, 1 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  sni-proxy check                          can this host run the kernel data path?
  sni-proxy check --config config.json     what this config's `ebpf` section needs, and the
                                           capabilities / systemd lines to grant it
  sni-proxy check --json | jq .features    the report for scripts (exit 1 when lacking)""")
    parser.add_argument("--config", metavar="FILE",
                        help="evaluate what this config.json's `ebpf` section asks for")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def cli_check(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    ebpf_section = None
    if args.config:
        try:
            ebpf_section = _load_ebpf_section(args.config)
        except (OSError, ValueError) as e:
            print(f"sni-proxy check: cannot read {args.config}: {e}", file=sys.stderr)
            return 2
    report = check_system_support()
    keys, features = requested_checks(ebpf_section)
    missing = [c for c in report.missing(keys)]
    for key in keys:
        if report.check(key) is None:  # e.g. libbpf missing: no probe ran
            missing.append(Check(key, key, "map", False, "not probed (libbpf missing)"))
    ok = ebpf_ok = not missing
    # Capacity of the whole config (fds, map sizes, sysctls): doctor-style, with sysctl lines.
    capacity = None
    if args.config:
        from sniproxy.proxy.capacity import config_capacity
        capacity = config_capacity(args.config, sockmap_ok=report.ok("sockmap"))
        ok = ok and capacity.get("ok", True)

    unit = _unit_lines(args.config) if args.config else None
    from sniproxy.proxy import clienthello       # which parser new connections get (issue 14)
    parser = {"parser": clienthello.PARSER, "detail": clienthello.PARSER_DETAIL}
    if args.json:
        data = report.to_dict()
        data["clienthello_parser"] = parser
        if unit is not None:
            data["systemd_unit_lines"] = unit
        data["requested"] = {
            "source": args.config or "default (sockmap data path)",
            "features": features, "checks": keys, "ok": ebpf_ok,
            "missing": [c.key for c in missing],
        }
        if capacity is not None:
            data["capacity"] = capacity
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(format_report(report, keys))
        print()
        source = f"config {args.config}" if args.config else "the proxy's eBPF data path"
        if not keys:
            print(f"Result: {source} does not enable eBPF: nothing required.")
        elif ebpf_ok:
            print(f"Result: ✓ everything {source} needs is available.")
        else:
            print(f"Result: ✗ {source} needs {len(missing)} missing item(s): "
                  + ", ".join(c.label for c in missing))
            if features:
                print("  With fallback_mode \"auto\" the proxy still runs, degraded: "
                      + "; ".join(f"{f}: {'active' if report.ok(f) else 'disabled'}"
                                  for f in features))
        print(f"ClientHello parser: {parser['parser']}"
              + (f" ({parser['detail']})" if parser["detail"] else
                 " (sniproxy.proxy._clienthello, the Python parser behind it)"))
        if capacity is not None:
            print()
            print(capacity["text"])
        if unit is not None:
            print(f"\nsystemd [Service] lines for {args.config} (deploy/systemd/sni-proxy.service):")
            print("\n".join(f"  {line}" for line in unit))
    return 0 if ok else 1
