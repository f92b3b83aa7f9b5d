#!/usr/bin/env bash
# Builds one Kubernetes release's real binaries from Go modules (no downloads of release
# binaries, no Docker) into a cache directory outside the work tree, and prints that directory.
#
#   build.sh [VERSION]    VERSION: newest (the default), oldest, or a directory here (v1.32)
#
# Each directory here (v1.MINOR) is a Go module pinning one release; its `tool` block names what
# is built: for every release etcd, kube-apiserver, kube-controller-manager and a kubectl of the
# same release (so tests see no version skew), and for the newest also the node's kubelet,
# kube-scheduler and kube-proxy (the end-to-end tests' real node). The newest runs the whole
# suite, the oldest the suites that prove the supported range (docs/development.md).
# The cache is keyed by the module's go.mod/go.sum and the build flags, so a fresh clone on a
# warm machine reuses it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The releases: directories named v1.MINOR holding a go.mod, oldest first.
mapfile -t versions < <(cd "$here" && for d in v1.*; do
  [[ "$d" =~ ^v1\.[0-9]+$ && -f "$d/go.mod" ]] && echo "$d"; done | sort -V)
[ "${#versions[@]}" -gt 0 ] || { echo "build.sh: no v1.MINOR module in $here" >&2; exit 2; }
case "${1:-newest}" in
  newest) dir="${versions[-1]}" ;;
  oldest) dir="${versions[0]}" ;;
  *) dir="$1" ;;
esac
if [[ ! " ${versions[*]} " == *" $dir "* ]]; then
  echo "build.sh: no release '$dir' here; known: ${versions[*]} (or newest, oldest)" >&2
  exit 2
fi
module="$here/$dir"
k8s_version="$(awk '$1=="k8s.io/kubernetes" {print $2; exit}' "$module/go.mod")"
# The binaries: the go.mod's `tool` directives (block or single-line form), as Go reads them.
mapfile -t tools < <(cd "$module" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go mod edit -json |
  awk '/"Tool": \[/ {on=1; next} on && /^\t\]/ {on=0} on && /"Path":/ {gsub(/[",]/, "", $2); print $2}')
for required in go.etcd.io/etcd/server/v3 k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl; do
  [[ " ${tools[*]} " == *" $required "* ]] || {
    echo "build.sh: $dir/go.mod has no tool $required (every release needs it)" >&2; exit 2; }
done

minor="$(echo "$k8s_version" | cut -d. -f2)"
# The version ldflags make /version (and `kubectl version`) report the real release.
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
build_env="CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly -trimpath"
# Keyed by what decides the binaries: the module (versions, sums), the tools and the flags.
key="$({ cat "$module/go.mod" "$module/go.sum"; echo "$ldflags"; echo "$build_env"; } |
  sha256sum | cut -c1-12)"
out="${XERO_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xero-operator/controlplane}/$k8s_version-$key"

binary_name() { case "$1" in go.etcd.io/etcd/server/v3) echo etcd ;; *) basename "$1" ;; esac; }
have_all() { for t in "${tools[@]}"; do [ -x "$out/$(binary_name "$t")" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out.tmp"
cd "$module"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=readonly

echo "building Kubernetes $k8s_version (${#tools[@]} binaries) into $out (cold, with the Go modules downloaded: about 1 to 1.5 minutes a binary on 2 cores; downloading them adds a few)" >&2
for t in "${tools[@]}"; do
  flags="$ldflags"
  [ "$(binary_name "$t")" = etcd ] && flags="-s -w"
  go build -trimpath -ldflags "$flags" -o "$out.tmp/$(binary_name "$t")" "$t" >&2
done
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
