"""`sni-proxy` command line: run (default), check, demo, profile.

Sub-commands live next to the code they drive and are imported lazily so that
`sni-proxy --check-config` stays fast and never touches BPF.
"""
from __future__ import annotations

import sys
from importlib import import_module

# sub-command -> "module:function" taking argv (list[str]) and returning an exit code
SUBCOMMANDS = {
    "run": "sniproxy.proxy.main:cli_run",
    "check": "sniproxy.ebpf.support:cli_check",
    "demo": "sniproxy.ebpf.demo:cli_demo",
    "profile": "sniproxy.observe.profile_cli:cli_profile",
    "trace": "sniproxy.observe.trace_cli:cli_trace",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: sni-proxy [run] --config FILE [--check-config] [--log-level LEVEL]\n"
            "       sni-proxy check [--config FILE] [--json]   what eBPF this system supports\n"
            "       sni-proxy demo                             load every BPF program for real\n"
            "       sni-proxy profile [-p PID] [-F HZ] [--duration S] [-o OUT]   CPU profiler\n"
            "       sni-proxy trace syscalls|tcp|connect|retrans|memory ...   bcc-style tracers\n"
            "Run `sni-proxy COMMAND --help` for the options of one command."
        )
        return 0
    command = "run"
    if argv and argv[0] in SUBCOMMANDS:
        command = argv.pop(0)
    module_name, func_name = SUBCOMMANDS[command].split(":")
    func = getattr(import_module(module_name), func_name)
    return int(func(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
