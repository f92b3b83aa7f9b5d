#!/usr/bin/env bash
# Builds the real etcd, kube-apiserver, kube-controller-manager and a kubectl of the same
# release (so tests see no version skew), and the node's kubelet, kube-scheduler and kube-proxy
# (the end-to-end tests' real node), from Go modules
# (no downloads of release binaries, no Docker) into a cache directory outside the
# work tree, keyed by this module's go.mod/go.sum and this script, so a fresh clone
# on a warm machine reuses them. Prints the directory holding the binaries.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="$(awk '$1=="k8s.io/kubernetes" {print $2; exit}' "$here/go.mod")"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-12)"
out="${XERO_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xero-operator/controlplane}/$k8s_version-$key"
bins=(etcd kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy)

have_all() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out.tmp"
minor="$(echo "$k8s_version" | cut -d. -f2)"
# The version ldflags make /version (and `kubectl version`) report the real release.
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
cd "$here"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly
echo "building the control plane and node ($k8s_version) into $out (cold, with the Go modules downloaded: about 8 minutes on 2 cores; downloading them adds a few)" >&2
go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 >&2
go build -trimpath -ldflags "$ldflags" -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags "$ldflags" -o "$out.tmp/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager >&2
for cmd in kubectl kubelet kube-scheduler kube-proxy; do
  go build -trimpath -ldflags "$ldflags" -o "$out.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
done
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
