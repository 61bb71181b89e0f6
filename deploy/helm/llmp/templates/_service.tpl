{{/*
One llmp gRPC service as a Deployment and a ClusterIP Service:
  (dict "root" $ "component" "tokenizer" "spec" .Values.tokenizer "env" $extraEnvYaml
        "ports" (list (dict "name" "grpc" "port" 50051) ...) "serviceAccount" "" "replicas" 1)
The first port is the gRPC one the probes use.
*/}}
{{- define "llmp.deployment" -}}
{{- $root := .root }}
{{- $ctx := dict "root" $root "component" .component }}
{{- $grpc := (first .ports).port }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "llmp.componentName" $ctx }}
  labels:
    {{- include "llmp.labels" $ctx | nindent 4 }}
spec:
  {{- if not (and .spec.autoscaling .spec.autoscaling.enabled) }}
  replicas: {{ .spec.replicas }}
  {{- end }}
  revisionHistoryLimit: 3
  selector:
    matchLabels:
      {{- include "llmp.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "llmp.labels" $ctx | nindent 8 }}
      annotations:
        checksum/secrets: {{ include (print $root.Template.BasePath "/secrets.yaml") $root | sha256sum | trunc 16 }}
    spec:
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      {{- with (include "llmp.imagePullSecrets" $root) }}{{ . | trim | nindent 6 }}{{- end }}
      securityContext:
        {{- include "llmp.podSecurityContext" dict | nindent 8 }}
      terminationGracePeriodSeconds: 45
      containers:
        - name: {{ .component }}
          image: {{ include "llmp.image" (dict "root" $root "service" .component) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          ports:
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "llmp.commonEnv" $root | nindent 12 }}
            {{- include "llmp.addressEnv" $root | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
          {{- include "llmp.grpcProbes" (dict "port" $grpc) | nindent 10 }}
          resources:
            {{- toYaml .spec.resources | nindent 12 }}
          securityContext:
            {{- include "llmp.containerSecurityContext" dict | nindent 12 }}
          volumeMounts:
            {{- include "llmp.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "llmp.volumes" $root | nindent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "llmp.componentName" $ctx }}
  labels:
    {{- include "llmp.labels" $ctx | nindent 4 }}
  {{- with .serviceAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .serviceType | default "ClusterIP" }}
  selector:
    {{- include "llmp.selectorLabels" $ctx | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      protocol: TCP
      {{- if hasPrefix "grpc" .name }}
      appProtocol: grpc
      {{- end }}
    {{- end }}
{{- end }}

{{/* A PodDisruptionBudget and, when on, a HorizontalPodAutoscaler for one component. */}}
{{- define "llmp.availability" -}}
{{- $ctx := dict "root" .root "component" .component }}
{{- if .spec.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "llmp.componentName" $ctx }}
  labels:
    {{- include "llmp.labels" $ctx | nindent 4 }}
spec:
  maxUnavailable: {{ .spec.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "llmp.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- if and .spec.autoscaling .spec.autoscaling.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "llmp.componentName" $ctx }}
  labels:
    {{- include "llmp.labels" $ctx | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "llmp.componentName" $ctx }}
  minReplicas: {{ .spec.autoscaling.minReplicas }}
  maxReplicas: {{ .spec.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .spec.autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- end }}
