#!/usr/bin/env bash
# Prints what a test node may leave on the host: the kernel settings the kubelet changes, node
# cgroups, mounts and processes of any node run, pod network namespaces, the fixed host
# directories. `make e2e` compares this before and after the run: a difference fails it, so a
# node that does not tear down completely is caught by CI.
set -euo pipefail
for key in kernel/panic kernel/panic_on_oops vm/overcommit_memory vm/panic_on_oom \
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  echo "sysctl $key=$(cat "/proc/sys/$key")"
done
ls -d /sys/fs/cgroup/*/xero-node-* 2>/dev/null | sed 's/^/cgroup /' || true
grep -E 'xero-cp-|/run/netns/cni-' /proc/self/mountinfo | awk '{print "mount " $5}' || true
for p in /proc/[0-9]*; do
  # A process may exit between the glob and the read.
  cmd="$( (tr '\0' ' ' < "$p/cmdline") 2>/dev/null || true)"
  case "$cmd" in
    *xero-cp-*|*containerd-shim*|/pause*) echo "process ${p#/proc/} $cmd" ;;
  esac
done
for d in /var/lib/kubelet /var/lib/cni /var/log/containers /run/containerd /run/netns /opt/containerd; do
  [ -e "$d" ] && echo "dir $d"
done
ls /var/lib/cni/results /run/containerd/s 2>/dev/null | sed 's/^/file /' || true
# The host's own network: the node's bridge, veths and kube-proxy's rules stay in the run's
# namespace, never here.
ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9:]*\]$//' | sed 's/^/iptables /' || true
true
