#!/usr/bin/env bash
# Installs what the real node of the end-to-end tests needs from Debian's packages: containerd and
# runc (the container runtime), the CNI plugins (the pod network), iptables and conntrack
# (kube-proxy), busybox-static (the shell of the test app image) and a static C library (the
# sandbox "pause" binary). Idempotent: installs only what is missing. Needs root (as CI runs).
set -euo pipefail
need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for pkg in containerd runc containernetworking-plugins iptables conntrack busybox-static libc6-dev gcc; do
  have "$pkg" || need+=("$pkg")
done
if [ "${#need[@]}" -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "the real node needs Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "installing for the real node: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Debian's containerd package would start (and, under systemd, enable) its service; the tests
# run their own containerd with their own config, so no service is started while installing.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
timeout 600 apt-get update -qq >&2
# --no-install-recommends keeps it to what the node uses.
timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
