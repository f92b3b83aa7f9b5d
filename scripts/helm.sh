#!/usr/bin/env bash
# Installs Helm from the Go module proxy into the tools cache, once; prints its path
# (scripts/go-install.sh does the work; about 2.5 minutes cold).
#
# Built the way Helm's own release binaries are: its Makefile sets the Kubernetes version that
# `helm template` and `helm lint` assume when no cluster is asked (the minor of the client-go
# in Helm's go.mod: v0.37 for v3.22.0). A `go install` without these ldflags assumes 1.20,
# and a chart's `kubeVersion` (ours: the supported range) would then refuse plain
# `helm template` where a released Helm renders.
set -euo pipefail
version="v3.22.0"
kube_minor="37"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kube_minor"
done
exec bash "$(dirname "$0")/go-install.sh" helm "$version-kube1.$kube_minor" \
  "helm.sh/helm/v3/cmd/helm@$version" -ldflags "$ldflags"
