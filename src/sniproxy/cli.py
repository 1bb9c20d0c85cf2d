"""`sni-proxy` command line: run (default), check, demo, profile, trace.

Sub-commands live next to the code they drive and are imported lazily so that
`sni-proxy --check-config` stays fast and never touches BPF. Each has its own argparse
parser (`sni-proxy COMMAND --help`, with examples in its epilog, bcc style).
"""
from __future__ import annotations

import sys
from importlib import import_module

# sub-command -> "module:function" taking argv (list[str]) and returning an exit code
SUBCOMMANDS = {
    "run": "sniproxy.proxy.main:cli_run",
    "check": "sniproxy.check_cli:cli_check",
    "demo": "sniproxy.ebpf.demo:cli_demo",
    "profile": "sniproxy.observe.profile_cli:cli_profile",
    "trace": "sniproxy.observe.trace_cli:cli_trace",
}
# one line each for `sni-proxy --help`
DESCRIPTIONS = {
    "run": "run the proxy (the default command): --config FILE [--check-config]",
    "check": "what eBPF this kernel and these privileges allow [--config FILE] [--json]",
    "demo": "load every BPF program for real and print what works",
    "profile": "eBPF CPU profiler, bcc profile-like: [-p PID] [-F HZ] [-d S] [-o OUT]",
    "trace": "eBPF tracers, bcc-like: syscalls | tcp | connect | retrans | memory",
}
EXAMPLES = """examples:
  sni-proxy --config config.json                 run the proxy
  sni-proxy --config config.json --check-config  validate the config only (exit 0 / 2)
  sni-proxy check --config config.json           is this host ready for this config?
  sni-proxy profile -F 99 -d 10 -o cpu.svg       10 s flame graph of the whole machine
  kill -HUP <pid>    reload the config          kill -TERM <pid>   drain and stop"""


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: sni-proxy [COMMAND] [OPTIONS]", "", "commands:"]
    for name in SUBCOMMANDS:
        lines.append(f"  {name.ljust(width)}  {DESCRIPTIONS.get(name, '')}")
    lines += ["", "Run `sni-proxy COMMAND --help` for the options of one command.", "", EXAMPLES]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = "run"
    if argv and argv[0] in SUBCOMMANDS:
        command = argv.pop(0)
    elif argv and not argv[0].startswith("-"):
        print(f"sni-proxy: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[command].split(":")
    func = getattr(import_module(module_name), func_name)
    return int(func(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
