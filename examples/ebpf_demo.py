#!/usr/bin/env python3
"""The seed's `ebpf_demo`: initialise eBPF, print the capability line, load every program.

Same as `sni-proxy demo`. Run from a checkout after `make bpf`:

    .venv/bin/python examples/ebpf_demo.py
"""
from __future__ import annotations

import sys
from pathlib import Path

# Allow running from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sniproxy.ebpf.demo import cli_demo  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_demo(sys.argv[1:]))
