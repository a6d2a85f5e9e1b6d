#!/usr/bin/env bash
# Installs everything Zero-Mesh needs on a Debian 12 machine (run as root), then the Python
# package with its test extras into ./.venv. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# openssl: the tests make their etcd TLS certificates with it (controller/sim/pki.py).
# prometheus (with promtool) and chromium: the tests check deploy/'s rules and dashboard on a
# real Prometheus and render the agent's mesh page in headless Chromium (docs/observability.md).
DEBIAN_PACKAGES=(etcd-server etcd-client wireguard-go wireguard-tools nftables iproute2
                 iputils-ping python3-venv python3-pip procps openssl prometheus chromium)

missing=()
for p in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd-server and prometheus packages start system services (etcd on 127.0.0.1:2379,
# Prometheus on :9090) where an init system runs them; Zero-Mesh's demo and
# tests start their own on free ports and never touch them.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready (.venv/bin/zmesh)"
