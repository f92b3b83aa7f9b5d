#!/usr/bin/env bash
# Installs promtool (Prometheus' rule checker) from the Go module proxy into the tools cache,
# once; prints its path (scripts/go-install.sh does the work). Built with `remove_all_sd` (no
# service-discovery plugins: the rule checks do not need them), which keeps the cold build near
# a minute.
set -euo pipefail
module_version="v0.316.0" # Prometheus 3.16.0
exec bash "$(dirname "$0")/go-install.sh" promtool "$module_version" \
  "github.com/prometheus/prometheus/cmd/promtool@$module_version" \
  -tags remove_all_sd -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.16.0"
