{{/* Common names and labels. */}}
{{- define "llm-proxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "llm-proxy.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llm-proxy.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llm-proxy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "llm-proxy.proxyURL" -}}
{{- .Values.controller.proxyURL | default (printf "http://%s-proxy.%s.svc:%v" (include "llm-proxy.fullname" .) .Release.Namespace .Values.proxy.service.port) -}}
{{- end -}}

{{/* Restrictive pod and container security contexts shared by both Deployments. */}}
{{- define "llm-proxy.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llm-proxy.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Who may reach the admin ports: this namespace, and the selected monitoring namespaces. */}}
{{- define "llm-proxy.metricsFrom" -}}
- podSelector: {}
{{- with .Values.networkPolicy.metricsNamespaceSelector }}
- namespaceSelector: {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}
