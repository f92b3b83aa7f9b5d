#!/usr/bin/env bash
# Installs promtool (Prometheus' rule checker) from the Go module proxy (no release-binary
# download) into a cache directory outside the work tree, once; prints its path. Built with
# `remove_all_sd` (no service-discovery plugins: promtool's rule checks do not need them), which
# keeps the cold build near a minute. Safe to run in parallel, as scripts/helm.sh.
set -euo pipefail
module_version="v0.316.0" # Prometheus 3.16.0
dir="${XERO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xero-operator/tools}/promtool-$module_version"
if [ ! -x "$dir/promtool" ]; then
  mkdir -p "$dir"
  exec 9>"$dir.lock"
  flock -w 1800 9 || { echo "scripts/promtool.sh: another install held the lock for 30 minutes" >&2; exit 1; }
  if [ ! -x "$dir/promtool" ]; then
    echo "installing promtool $module_version from the Go module proxy into $dir (about a minute, once)" >&2
    tmp="$(mktemp -d "$dir/.install.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$tmp" GOFLAGS=-mod=mod \
      timeout 1500 go install -tags remove_all_sd -trimpath \
      -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.16.0" \
      "github.com/prometheus/prometheus/cmd/promtool@$module_version" >&2
    mv "$tmp/promtool" "$dir/promtool"
  fi
fi
echo "$dir/promtool"
