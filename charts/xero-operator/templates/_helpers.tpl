{{- define "xero-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "xero-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "xero-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{- define "xero-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xero-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the controller calls, and nothing more (docs/security.md lists each call). Shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "xero-operator.rules" -}}
# Reconcile XeroConnections (list + watch); get reads one again where the cache may lag (before
# a cleanup, after the controller's own status write); patch adds and removes the finalizer.
- apiGroups: ["xero-operator.io"]
  resources: ["xeroconnections"]
  verbs: ["get", "list", "watch", "patch"]
# Write status (server-side apply on the status subresource).
- apiGroups: ["xero-operator.io"]
  resources: ["xeroconnections/status"]
  verbs: ["patch"]
# Secrets: list (by name and opt-in label, so only opted-in Secrets' data is sent) and get the
# token and client Secrets; watch token Secrets (by label, metadata only); create and patch token
# Secrets. Used only on Secrets that are the operator's own or opted in (docs/security.md). No
# delete: owned token Secrets are garbage-collected with their connection.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The consumers' Role and RoleBinding for each connection: read to check they are the
# controller's own, create, apply changes, delete when the consumer list empties. Granting them
# requires holding the same Secret rights (get, watch, patch), which the rule above gives.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch", "delete"]
# One Event per Ready transition, each created on its own (no series kept, so no patch).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* "true" when the chart renders the CRD: crds.install, and the CRD is absent or this release's (see crds.yaml). */}}
{{- define "xero-operator.managesCrd" -}}
{{- if .Values.crds.install -}}
{{- $existing := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" "xeroconnections.xero-operator.io" -}}
{{- $annotations := dig "metadata" "annotations" dict $existing -}}
{{- $owner := get $annotations "meta.helm.sh/release-name" -}}
{{- $ownerNamespace := get $annotations "meta.helm.sh/release-namespace" -}}
{{- if or (not $existing) (and (eq $owner .Release.Name) (eq $ownerNamespace .Release.Namespace)) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A policy binding's scope: the watched namespaces, or every namespace. */}}
{{- define "xero-operator.policyNamespaces" -}}
{{- if .Values.watchNamespaces -}}
matchResources:
  namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
          {{- range .Values.watchNamespaces }}
          - {{ . | quote }}
          {{- end }}
{{- end }}
{{- end -}}

{{/* The `helm test` objects' labels: the release's, with a name of their own so that neither the metrics Service nor the PodDisruptionBudget selects the test pod. */}}
{{- define "xero-operator.testLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-test
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: helm-test
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
