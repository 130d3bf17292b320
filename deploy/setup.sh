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
  nodejs
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# Debian's nodejs comes without npm (package npm); NodeSource's nodejs carries its own and
# conflicts with Debian's npm: ask for the package only when there is no npm at all.
if ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
else
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
fi


# The Kubernetes manifest validator's npm packages (exact versions: tools/k8s-validate/
# package-lock.json), into that folder only; nothing when they are installed already.
k8s_validate="$(cd "$(dirname "$0")/.." && pwd)/tools/k8s-validate"
if [ -f "$k8s_validate/package-lock.json" ] &&
  ! cmp -s "$k8s_validate/package-lock.json" "$k8s_validate/node_modules/.speed-installed-lock" 2>/dev/null; then
  echo "setup: npm ci in tools/k8s-validate"
  (cd "$k8s_validate" && npm ci --no-audit --no-fund --loglevel=error >/dev/null &&
    cp package-lock.json node_modules/.speed-installed-lock)
fi
