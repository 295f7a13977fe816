{{/*
Names. The full name prefixes every object; with the release name
"kube-dsr" (the documented one) it is just "kube-dsr".
*/}}
{{- define "kube-dsr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube-dsr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kube-dsr.operator.fullname" -}}
{{- printf "%s-operator" (include "kube-dsr.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube-dsr.agent.fullname" -}}
{{- printf "%s-agent" (include "kube-dsr.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kube-dsr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kube-dsr.labels" -}}
helm.sh/chart: {{ include "kube-dsr.chart" . }}
app.kubernetes.io/name: {{ include "kube-dsr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kube-dsr
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "kube-dsr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kube-dsr.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kube-dsr.componentLabels" -}}
{{ include "kube-dsr.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference from {registry, repository, tag, digest}; the tag defaults to appVersion. */}}
{{- define "kube-dsr.image" -}}
{{- $ref := printf "%s/%s" .image.registry .image.repository }}
{{- if .image.digest }}
{{- printf "%s@%s" $ref .image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/*
The Linux capabilities dsr-agent needs, and nothing else: the one place the
chart lists them. README.md "Privileges" documents each one, and
`make chart-check` fails unless the rendered DaemonSet adds exactly the
documented set.
*/}}
{{- define "kube-dsr.agent.capabilities" -}}
- NET_ADMIN
- NET_RAW
- SYS_ADMIN
- SYS_PTRACE
{{- end }}

{{/*
Fields the API server would otherwise default in a container, written out so
that GitOps tools comparing whole objects see no difference.
*/}}
{{- define "kube-dsr.containerDefaults" -}}
terminationMessagePath: /dev/termination-log
terminationMessagePolicy: File
{{- end }}

{{/* Probe timing, the API server's defaults written out. */}}
{{- define "kube-dsr.probeDefaults" -}}
timeoutSeconds: 1
successThreshold: 1
failureThreshold: 3
{{- end }}

{{/* Pod fields the API server defaults. */}}
{{- define "kube-dsr.podDefaults" -}}
restartPolicy: Always
schedulerName: default-scheduler
{{- end }}
