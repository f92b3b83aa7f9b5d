#!/usr/bin/env bash
# Installs Helm from the Go module proxy (no release-binary download) into a cache directory
# outside the work tree, once; prints the path of the helm binary. Safe to run in parallel (the
# tests do): one process builds under a lock, into a temporary directory, and moves the binary
# into place whole; the others wait and then use it.
set -euo pipefail
version="v3.22.0"
dir="${XERO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xero-operator/tools}/helm-$version"
if [ ! -x "$dir/helm" ]; then
  mkdir -p "$dir"
  exec 9>"$dir.lock"
  flock -w 1800 9 || { echo "scripts/helm.sh: another install held the lock for 30 minutes" >&2; exit 1; }
  if [ ! -x "$dir/helm" ]; then
    echo "installing helm $version from the Go module proxy into $dir (a few minutes, once)" >&2
    tmp="$(mktemp -d "$dir/.install.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$tmp" GOFLAGS=-mod=mod \
      timeout 1500 go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
      "helm.sh/helm/v3/cmd/helm@$version" >&2
    mv "$tmp/helm" "$dir/helm"
  fi
fi
echo "$dir/helm"
