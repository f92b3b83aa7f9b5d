{{- define "xero-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "xero-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "xero-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "xero-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "xero-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* What the controller calls, and nothing more. Shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "xero-operator.rules" -}}
# Reconcile XeroConnections; patch adds and removes the cleanup finalizer.
- apiGroups: ["xero-operator.io"]
  resources: ["xeroconnections"]
  verbs: ["get", "list", "watch", "patch", "update"]
# Write status (server-side apply on the status subresource).
- apiGroups: ["xero-operator.io"]
  resources: ["xeroconnections/status"]
  verbs: ["get", "patch", "update"]
# Read client Secrets; create, watch (by label) and patch token Secrets. No delete: owned token
# Secrets are garbage-collected with their connection.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update"]
# The consumers' Role and RoleBinding for each connection (server-side apply; removed when the
# consumer list empties). Granting them requires holding the same Secret rights, which the rule
# above gives.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch", "update", "delete"]
# One Event per Ready transition.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
