{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "activescale.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name when it already contains the chart name, so
`helm install activescale ...` gives Services named activescale and
activescale-scaler. 63 minus the longest suffix used ("-scaler", "-redis").
*/}}
{{- define "activescale.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "activescale.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "activescale.commonLabels" -}}
helm.sh/chart: {{ include "activescale.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "activescale.labels" -}}
{{ include "activescale.commonLabels" . }}
{{ include "activescale.selectorLabels" . }}
{{- end }}

{{- define "activescale.redisLabels" -}}
{{ include "activescale.commonLabels" . }}
{{ include "activescale.redisSelectorLabels" . }}
{{- end }}

{{- define "activescale.selectorLabels" -}}
app.kubernetes.io/name: {{ include "activescale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: scaler
{{- end }}

{{- define "activescale.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "activescale.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "activescale.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "activescale.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "activescale.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the bundled Valkey is deployed. */}}
{{- define "activescale.bundledRedis" -}}
{{- if and (eq .Values.config.store "redis") .Values.redis.bundled.enabled }}true{{ end }}
{{- end }}

{{/* The Redis URL handed to activescale (empty with the memory store). */}}
{{- define "activescale.redisUrl" -}}
{{- if eq .Values.config.store "redis" }}
{{- if .Values.redis.url }}
{{- .Values.redis.url }}
{{- else if .Values.redis.bundled.enabled }}
{{- printf "redis://%s-redis:6379" (include "activescale.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* In-cluster address of the scaler port, for ScaledObjects. */}}
{{- define "activescale.scalerAddress" -}}
{{- $svc := include "activescale.fullname" . }}
{{- if .Values.headlessService.enabled }}{{ $svc = printf "%s-scaler" $svc }}{{ end }}
{{- printf "%s.%s.svc.cluster.local:%v" $svc .Release.Namespace .Values.ports.scaler }}
{{- end }}

{{/* In-cluster address of the sink port, for Istio's envoyMetricsService. */}}
{{- define "activescale.sinkAddress" -}}
{{- printf "%s.%s.svc.cluster.local:%v" (include "activescale.fullname" .) .Release.Namespace .Values.ports.sink }}
{{- end }}

{{/*
Readiness over native gRPC only without TLS: kubelet's gRPC probe cannot
speak TLS.
*/}}
{{- define "activescale.grpcReadiness" -}}
{{- if and .Values.probes.grpcReadiness (not .Values.tls.enabled) }}true{{ end }}
{{- end }}

{{/*
Combinations the service would refuse or get wrong; failing here stops a
bad install before anything is created.
*/}}
{{- define "activescale.validate" -}}
{{- if and (eq .Values.config.store "memory") (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount=%v with config.store=memory: each replica would see only the sidecars connected to it and answer KEDA with part of the load. Use config.store=redis for more than one replica, or replicaCount=1." .Values.replicaCount) }}
{{- end }}
{{- if and (eq .Values.config.store "redis") .Values.redis.url .Values.redis.bundled.enabled }}
{{- fail "redis.url is set and redis.bundled.enabled is true: set redis.bundled.enabled=false to use your own Redis, or clear redis.url to use the bundled Valkey." }}
{{- end }}
{{- if and (eq .Values.config.store "redis") (not .Values.redis.url) (not .Values.redis.bundled.enabled) }}
{{- fail "config.store=redis needs redis.url (redis://, rediss://, redis+cluster://) or redis.bundled.enabled=true." }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled=true needs tls.existingSecret: a Secret with the certificate chain and key (e.g. from cert-manager)." }}
{{- end }}
{{- if and .Values.tls.clientAuth.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth.enabled=true needs tls.enabled=true: client certificates are verified during the TLS handshake." }}
{{- end }}
{{- if and .Values.tls.clientAuth.names (not .Values.tls.clientAuth.enabled) }}
{{- fail "tls.clientAuth.names needs tls.clientAuth.enabled=true: names are checked on client certificates, which only mTLS asks for." }}
{{- end }}
{{- if .Values.customMetrics.enabled }}
{{- $ca := .Values.customMetrics.clientCA }}
{{- $sources := 0 }}
{{- range (list $ca.pem $ca.existingConfigMap $ca.existingSecret) }}{{ if . }}{{ $sources = add1 $sources }}{{ end }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "customMetrics.enabled=true needs exactly one of customMetrics.clientCA.pem, .existingConfigMap, .existingSecret: the front-proxy CA (requestheader-client-ca-file of the ConfigMap extension-apiserver-authentication in kube-system, which a pod of another namespace cannot mount; copy it)." }}
{{- end }}
{{- if and .Values.customMetrics.caBundle (not .Values.customMetrics.tls.existingSecret) }}
{{- fail "customMetrics.caBundle needs customMetrics.tls.existingSecret: without it activescale makes a self-signed certificate at start-up, which no caBundle given in advance can verify." }}
{{- end }}
{{- end }}
{{- if and .Values.redis.tls.existingSecret (or (and .Values.redis.tls.certKey (not .Values.redis.tls.keyKey)) (and .Values.redis.tls.keyKey (not .Values.redis.tls.certKey))) }}
{{- fail "redis.tls.certKey and redis.tls.keyKey go together (client certificate and its key)." }}
{{- end }}
{{- end }}

{{/* One config value as an environment variable string. */}}
{{- define "activescale.envValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}
{{- /* values.yaml numbers arrive as float64; %v would print 1.6777216e+07 */ -}}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
The config file the container reads with --config: the settings that are
lists of objects. Empty when none is in use (no ConfigMap, no --config).
*/}}
{{- define "activescale.configFile" -}}
{{- $file := dict }}
{{- if .Values.activator.enabled }}
{{- $_ := set $file "activator_routes" .Values.activator.routes }}
{{- end }}
{{- if and .Values.customMetrics.enabled .Values.customMetrics.rules }}
{{- $_ := set $file "custom_metrics_rules" .Values.customMetrics.rules }}
{{- end }}
{{- with $file }}{{ toYaml . }}{{ end }}
{{- end }}

{{/* Whether the chart renders the front-proxy CA ConfigMap from clientCA.pem. */}}
{{- define "activescale.customMetricsCAFromValue" -}}
{{- if and .Values.customMetrics.enabled .Values.customMetrics.clientCA.pem }}true{{ end }}
{{- end }}
