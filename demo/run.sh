#!/usr/bin/env bash
# `make demo`: install what is missing, build a 3-host cluster in network
# namespaces (real sshd, DNS, OpenMPI), start the daemon on it, run a real MPI
# job through the REST API and the CLI, then tear everything down.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (it builds network namespaces)" >&2
    exit 2
fi
need=(openssh-server openssh-client openmpi-bin libopenmpi-dev dnsmasq-base iproute2
      nftables gcc libc6-dev procps curl)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "demo: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e .
exec python3 -m demo.demo "$@"
