#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what it needs, builds the BPF
# objects, then runs pytest. eBPF tests FAIL (not skip) when eBPF is missing: CI has it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/bootstrap.sh
export SNI_PROXY_REQUIRE_EBPF="${SNI_PROXY_REQUIRE_EBPF:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
