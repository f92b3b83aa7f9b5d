#!/usr/bin/env bash
# Prints the install without Helm: the chart rendered with its default values (CRD, RBAC,
# Deployment, Service, admission policies) for the namespace xero-operator, after the Namespace
# itself. `make manifest` writes it to deploy/xero-operator.yaml; `make test` fails when that
# file differs from the chart (`make manifest-drift`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
helm="$(bash scripts/helm.sh)"
version="$(awk '/^version:/ {print $2; exit}' charts/xero-operator/Chart.yaml)"
cat <<HEADER
# xero-operator $version without Helm: kubectl apply -f deploy/xero-operator.yaml (or use
# deploy/ as a kustomize base). Generated from charts/xero-operator with its default values by
# scripts/render-manifest.sh (make manifest); do not edit by hand.
---
apiVersion: v1
kind: Namespace
metadata:
  name: xero-operator
HEADER
# Not installed by Helm: the objects say who manages them (kubectl), not Helm and its chart.
# Without the `helm test` objects (tests.enabled=false: no test pod, no extra NetworkPolicy peer).
"$helm" template xero-operator charts/xero-operator --namespace xero-operator \
  --set tests.enabled=false |
  sed -e 's|^\( *\)app.kubernetes.io/managed-by: Helm$|\1app.kubernetes.io/managed-by: kubectl|' \
    -e '/^ *helm\.sh\/chart: /d'

