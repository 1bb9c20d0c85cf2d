#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 machine for sni-proxy:
#   Debian packages (only those missing), the virtualenv at .venv/, the BPF objects, the package.
# Used by `make setup`, and so by both README commands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Debian packages: build (clang, libbpf-dev, bpftool), run (libbpf1), tests and demo peers
# (nginx/haproxy/wrk for benchmarks, dante-server as a real SOCKS5 server, openssl, curl,
# iproute2 for network namespaces, libcap2-bin/util-linux for capability-dropping tests,
# linux-perf for the profiler comparison, prometheus (+ promtool) and systemd (systemd-analyze)
# for the deploy/ tests, golang-go for `go tool pprof` reading our pprof files).
DEB_PKGS=(clang llvm libbpf-dev libbpf1 bpftool make gcc python3-venv python3-dev curl openssl golang-go
          dante-server iproute2 libcap2-bin util-linux linux-perf procps prometheus systemd)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian's prometheus package enables a system Prometheus on :9090, sni-proxy's default
  # metrics port; the tests start their own.
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus || true
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.sniproxy-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch "$stamp"
fi

make -s bpf
