#!/usr/bin/env bash
# Installs Helm from the Go module proxy into the tools cache, once; prints its path
# (scripts/go-install.sh does the work; about 2.5 minutes cold).
set -euo pipefail
version="v3.22.0"
exec bash "$(dirname "$0")/go-install.sh" helm "$version" "helm.sh/helm/v3/cmd/helm@$version" \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version"
