{{/* Names and labels shared by every template. */}}

{{- define "alignx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "alignx.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "alignx.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "alignx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alignx
{{- end -}}

{{/* Selector labels of one component: include with (list . "consumer"). */}}
{{- define "alignx.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "alignx.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "alignx.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "alignx.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "alignx.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "alignx.modelClaim" -}}
{{- default (printf "%s-models" (include "alignx.fullname" .)) .Values.modelStore.persistence.existingClaim -}}
{{- end -}}

{{/* Restricted pod security (Pod Security Standards "restricted"). */}}
{{- define "alignx.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "alignx.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment shared by the consumer and the retraining job (no secrets in values). */}}
{{- define "alignx.commonEnv" -}}
- name: ALIGNX_BROKERS
  value: {{ .Values.kafka.brokers | quote }}
- name: ALIGNX_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- if .Values.redis.passwordSecret.name }}
- name: ALIGNX_REDIS_PASSWORD_FILE
  value: /etc/alignx/redis/password
{{- end }}
- name: ALIGNX_CONFIG
  value: /etc/alignx/config/config.toml
{{- end -}}

{{/* Volumes for configuration and secrets, shared by consumer and job. */}}
{{- define "alignx.configVolumes" -}}
- name: config
  configMap:
    name: {{ include "alignx.fullname" . }}-config
{{- if .Values.redis.passwordSecret.name }}
- name: redis-password
  secret:
    secretName: {{ .Values.redis.passwordSecret.name }}
    items:
      - key: {{ .Values.redis.passwordSecret.key }}
        path: password
{{- end }}
{{- range $i, $s := .Values.kafka.secretSettings }}
- name: kafka-secret-{{ $i }}
  secret:
    secretName: {{ $s.secretName }}
    items:
      - key: {{ $s.key }}
        path: value
{{- end }}
{{- if .Values.kafka.tlsSecretName }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tlsSecretName }}
{{- end }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "alignx.modelClaim" . }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Mounts for the volumes above; the model store read-only unless (list . true). */}}
{{- define "alignx.configMounts" -}}
{{- $root := index . 0 -}}
{{- $writable := index . 1 -}}
- name: config
  mountPath: /etc/alignx/config
  readOnly: true
{{- if $root.Values.redis.passwordSecret.name }}
- name: redis-password
  mountPath: /etc/alignx/redis
  readOnly: true
{{- end }}
{{- range $i, $s := $root.Values.kafka.secretSettings }}
- name: kafka-secret-{{ $i }}
  mountPath: /etc/alignx/kafka-secrets/{{ $i }}
  readOnly: true
{{- end }}
{{- if $root.Values.kafka.tlsSecretName }}
- name: kafka-tls
  mountPath: /etc/alignx/kafka-tls
  readOnly: true
{{- end }}
- name: models
  mountPath: {{ $root.Values.modelStore.mountPath }}
  readOnly: {{ not $writable }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Cross-field checks the schema cannot express. */}}
{{- define "alignx.validate" -}}
{{- $a := .Values.autoscaling -}}
{{- if and $a.keda.enabled $a.hpa.enabled -}}
{{- fail "autoscaling: enable keda or hpa, not both (they would fight over the replica count)" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics: enable serviceMonitor or podMonitor, not both (every sample would be scraped twice)" -}}
{{- end -}}
{{- if and $a.keda.enabled (gt (int $a.keda.maxReplicas) (int .Values.kafka.partitions)) -}}
{{- fail (printf "autoscaling.keda.maxReplicas (%v) exceeds kafka.partitions (%v): extra consumers would get no partition" $a.keda.maxReplicas .Values.kafka.partitions) -}}
{{- end -}}
{{- if and $a.hpa.enabled (gt (int $a.hpa.maxReplicas) (int .Values.kafka.partitions)) -}}
{{- fail (printf "autoscaling.hpa.maxReplicas (%v) exceeds kafka.partitions (%v)" $a.hpa.maxReplicas .Values.kafka.partitions) -}}
{{- end -}}
{{- if and $a.keda.enabled (gt (int $a.keda.minReplicas) (int $a.keda.maxReplicas)) -}}
{{- fail "autoscaling.keda.minReplicas exceeds maxReplicas" -}}
{{- end -}}
{{- if and $a.hpa.enabled (gt (int $a.hpa.minReplicas) (int $a.hpa.maxReplicas)) -}}
{{- fail "autoscaling.hpa.minReplicas exceeds maxReplicas" -}}
{{- end -}}
{{- if and (not .Values.modelStore.persistence.create) (not .Values.modelStore.persistence.existingClaim) -}}
{{- fail "modelStore.persistence: set existingClaim or create: true (consumer and trainer share the model store)" -}}
{{- end -}}
{{- end -}}
