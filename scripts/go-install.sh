#!/usr/bin/env bash
# Installs a Go tool from the Go module proxy (no release-binary download) into a cache directory
# outside the work tree, once; prints the path of the binary. Safe to run in parallel (the tests
# do): one process builds under a lock, into a temporary directory, and moves the binary into
# place whole; the others wait and then use it.
#
#   go-install.sh NAME CACHE-VERSION PACKAGE@VERSION [go install flags...]
set -euo pipefail
name="$1" cache_version="$2" package="$3"
shift 3
dir="${XERO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xero-operator/tools}/$name-$cache_version"
if [ ! -x "$dir/$name" ]; then
  mkdir -p "$dir"
  exec 9>"$dir.lock"
  flock -w 1800 9 || { echo "scripts/go-install.sh: another install of $name held the lock for 30 minutes" >&2; exit 1; }
  if [ ! -x "$dir/$name" ]; then
    echo "installing $name ($package) from the Go module proxy into $dir (minutes, once)" >&2
    tmp="$(mktemp -d "$dir/.install.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$tmp" GOFLAGS=-mod=mod \
      timeout 1500 go install -trimpath "$@" "$package" >&2
    mv "$tmp/$name" "$dir/$name"
  fi
fi
echo "$dir/$name"
