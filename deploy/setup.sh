#!/usr/bin/env bash
# Installs every Debian 12 package speedserve needs to build, test and run.
# Idempotent: when everything is present it prints one line and changes nothing.
# Usage: deploy/setup.sh            (as root, or as a user with sudo)
set -euo pipefail

packages=(
  build-essential cmake pkg-config git ca-certificates
  libcyaml-dev libyaml-dev libjansson-dev libpcre2-dev
  libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
  libucx-dev ucx-utils libmicrohttpd-dev libgnutls28-dev
  curl iproute2 iptables libnetfilter-queue-dev
  clang-14 libfuzzer-14-dev
  tmux
  prometheus
  librsvg2-bin
  python3-torch libopenblas0-pthread fortunes dict-gcide
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "setup: need root (or sudo) to install: ${missing[*]}" >&2
  exit 1
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# prometheus (tests/ops, deploy/monitoring) comes with a system service on :9090; the tests run
# their own server on a free port, so the packaged one is not left running.
if printf '%s\n' "${missing[@]}" | grep -qx prometheus && [ -d /run/systemd/system ]; then
  "${as_root[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
echo "setup: done"
