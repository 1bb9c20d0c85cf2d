#!/usr/bin/env bash
# Sets everything up and starts sni-proxy on examples/demo-config.json with two local TLS demo
# backends (Ctrl-C stops it). Needs root or CAP_BPF+CAP_NET_ADMIN for the kernel data path;
# without them the proxy says so and relays in user space.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/bootstrap.sh
exec .venv/bin/python examples/demo.py
