{{- define "cascade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cascade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "cascade.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "cascade.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels for one component: (dict "root" $ "component" "gateway"). */}}
{{- define "cascade.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cascade.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cascade.labels" -}}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "cascade.adminSecret" -}}
{{- .Values.admin.existingSecret | default (printf "%s-admin" (include "cascade.fullname" .)) -}}
{{- end -}}

{{- define "cascade.redisSecret" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "cascade.fullname" .)) -}}
{{- end -}}

{{/*
A secret value, base64: the one given, else the one the cluster already holds (so upgrades
keep it), else a new random one. (dict "root" $ "secret" NAME "key" KEY "given" VALUE)
*/}}
{{- define "cascade.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- $data := (get ($existing | default dict) "data") | default dict -}}
{{- if .given -}}
{{- .given | b64enc -}}
{{- else if hasKey $data .key -}}
{{- get $data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* A pod's restricted security context (Pod Security Standards: restricted). */}}
{{- define "cascade.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{- define "cascade.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A PVC unless the component names an existing claim. (dict "root" $ "name" N "spec" S "mode" M) */}}
{{- define "cascade.claim" -}}
{{- if not .spec.existingClaim }}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  labels: {{- include "cascade.labels" (dict "root" .root "component" .component) | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep  # an uninstall must not delete exported models
spec:
  accessModes: [{{ .mode }}]
  {{- with .spec.storageClass }}
  storageClassName: {{ . }}
  {{- end }}
  resources: {requests: {storage: {{ .spec.size }}}}
{{- end }}
{{- end -}}
