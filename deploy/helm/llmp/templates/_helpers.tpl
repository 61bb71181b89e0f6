{{/* Names, labels, images and the pieces every pod of the chart shares. */}}

{{- define "llmp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmp.fullname" -}}
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

{{- define "llmp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of one component's objects: (dict "root" $ "component" "gateway") */}}
{{- define "llmp.componentName" -}}
{{- printf "%s-%s" (include "llmp.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "llmp.labels" -}}
helm.sh/chart: {{ include "llmp.chart" .root }}
{{ include "llmp.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: llmp
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An llmp image: (dict "root" $ "service" "training"); training and inference follow image.variant */}}
{{- define "llmp.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default .root.Chart.AppVersion $img.tag }}
{{- if and (eq $img.variant "cuda") (has .service (list "training" "inference")) }}
{{- $tag = printf "%s-cuda" $tag }}
{{- end }}
{{- $repo := printf "%s-%s" $img.prefix .service }}
{{- if $img.registry }}
{{- printf "%s/%s:%s" $img.registry $repo $tag }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{- define "llmp.secretName" -}}
{{- default (include "llmp.componentName" (dict "root" . "component" "secrets")) .Values.auth.existingSecret }}
{{- end }}

{{- define "llmp.artifactsClaim" -}}
{{- default (include "llmp.componentName" (dict "root" . "component" "artifacts")) .Values.artifacts.existingClaim }}
{{- end }}

{{- define "llmp.address" -}}
{{- printf "%s:%v" (include "llmp.componentName" (dict "root" .root "component" .component)) .port }}
{{- end }}

{{/* The pod securityContext of the restricted Pod Security Standard. */}}
{{- define "llmp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "llmp.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* What every llmp container reads: state, logs, Redis (its password from the Secret), Ray's token. */}}
{{- define "llmp.commonEnv" -}}
- name: LLMP_HOME
  value: /var/lib/llmp
- name: LLMP_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: LLMP_LOG_FORMAT
  value: json
- name: LLMP_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "llmp.secretName" . }}
      key: redis-password
- name: LLMP_REDIS_URL
  value: {{ printf "redis://:$(LLMP_REDIS_PASSWORD)@%s/%v" (include "llmp.redisHostPort" .) (include "llmp.redisDb" .) | quote }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "llmp.secretName" . }}
      key: auth_token
{{- end }}

{{- define "llmp.redisHostPort" -}}
{{- if .Values.redis.enabled }}
{{- include "llmp.address" (dict "root" . "component" "redis" "port" 6379) }}
{{- else }}
{{- printf "%s:%v" (required "redis.external.host is required when redis.enabled is false" .Values.redis.external.host) .Values.redis.external.port }}
{{- end }}
{{- end }}

{{- define "llmp.redisDb" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ .Values.redis.external.db }}{{ end }}
{{- end }}

{{- define "llmp.qdrantUrl" -}}
{{- if .Values.qdrant.enabled }}
{{- printf "http://%s" (include "llmp.address" (dict "root" . "component" "qdrant" "port" 6333)) }}
{{- else }}
{{- required "qdrant.externalUrl is required when qdrant.enabled is false" .Values.qdrant.externalUrl }}
{{- end }}
{{- end }}

{{/* Where each service is reached inside the cluster (LLMP_<SERVICE>_ADDRESS). */}}
{{- define "llmp.addressEnv" -}}
- name: LLMP_TOKENIZER_ADDRESS
  value: {{ include "llmp.address" (dict "root" . "component" "tokenizer" "port" .Values.tokenizer.port) | quote }}
- name: LLMP_RETRIEVAL_ADDRESS
  value: {{ include "llmp.address" (dict "root" . "component" "retrieval" "port" .Values.retrieval.port) | quote }}
- name: LLMP_TRAINING_ADDRESS
  value: {{ include "llmp.address" (dict "root" . "component" "training" "port" .Values.training.port) | quote }}
- name: LLMP_INFERENCE_ADDRESS
  value: {{ include "llmp.address" (dict "root" . "component" "inference" "port" .Values.inference.port) | quote }}
{{- end }}

{{/* The artifact store and a writable /tmp (the root filesystem is read-only). */}}
{{- define "llmp.volumeMounts" -}}
- name: artifacts
  mountPath: /var/lib/llmp
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "llmp.volumes" -}}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ include "llmp.artifactsClaim" . }}
- name: tmp
  emptyDir: {}
{{- end }}

{{/* Native gRPC probes on the standard health service (NOT_SERVING while loading or draining). */}}
{{- define "llmp.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: {{ .startupFailures | default 60 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{- define "llmp.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels the training service puts on its RayJobs' pods (services/training/backends.py). */}}
{{- define "llmp.trainingJobLabels" -}}
app.kubernetes.io/part-of: llmp
app.kubernetes.io/component: training-job
{{- end }}

{{/* Egress to Redis: the chart's, or the external one (networkPolicy.externalEgress). */}}
{{- define "llmp.redisEgress" -}}
{{- if .Values.redis.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "llmp.selectorLabels" (dict "root" . "component" "redis") | nindent 10 }}
  ports:
    - {protocol: TCP, port: 6379}
{{- else }}
{{- with .Values.networkPolicy.externalEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The KubeRay operator's calls to a Ray head's dashboard (job submission, Serve config and status). */}}
{{- define "llmp.operatorIngress" -}}
- from:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ include "llmp.operatorNamespace" . }}
      podSelector:
        matchLabels:
          app.kubernetes.io/name: kuberay-operator
  ports:
    - {protocol: TCP, port: 8265}
    - {protocol: TCP, port: 52365}
    - {protocol: TCP, port: 8000}
{{- end }}

{{- define "llmp.operatorNamespace" -}}
{{- if (index .Values "kuberay-operator").enabled }}{{ .Release.Namespace }}{{ else }}{{ .Values.networkPolicy.kuberayOperatorNamespace }}{{ end }}
{{- end }}
