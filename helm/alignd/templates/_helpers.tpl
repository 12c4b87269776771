{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "alignd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "alignd.fullname" -}}
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

{{/*
Object names per component.
*/}}
{{- define "alignd.apiName" -}}
{{- printf "%s-api" (include "alignd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "alignd.workerName" -}}
{{- printf "%s-worker" (include "alignd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- define "alignd.migrationsName" -}}
{{- printf "%s-migrations" (include "alignd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alignd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "alignd.labels" -}}
helm.sh/chart: {{ include "alignd.chart" . }}
{{ include "alignd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alignd
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels shared by all components; add app.kubernetes.io/component to tell them apart.
*/}}
{{- define "alignd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the API and worker pods use.
*/}}
{{- define "alignd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alignd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding credentials: existingSecret, or the one the chart renders for trials.
*/}}
{{- define "alignd.secretName" -}}
{{- default (include "alignd.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Image reference. Call with (dict "image" <override map or nil> "root" $).
*/}}
{{- define "alignd.image" -}}
{{- $root := .root }}
{{- $o := default (dict) .image }}
{{- $repo := default $root.Values.image.repository $o.repository }}
{{- $digest := default $root.Values.image.digest $o.digest }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (default $root.Chart.AppVersion $root.Values.image.tag) $o.tag) }}
{{- end }}
{{- end }}

{{/*
The credential environment variables, each a secretKeyRef (never a value).
With existingSecret: database-url, redis-url (queue=arq) and api-keys are required keys; the AWS keys are optional
(IRSA / workload identity need none). Without it: only the keys set in .Values.secrets are referenced.
Call with (dict "root" $ "only" (list "database-url")) to restrict the set.
*/}}
{{- define "alignd.secretEnv" -}}
{{- $root := .root }}
{{- $secretName := default (include "alignd.secretName" $root) .secretName }}
{{- $s := $root.Values.secrets }}
{{- $entries := list
      (list "ALIGND_DATABASE_URL" "database-url" $s.databaseUrl false)
      (list "ALIGND_REDIS_URL" "redis-url" $s.redisUrl (ne $root.Values.config.queue "arq"))
      (list "ALIGND_API_KEYS" "api-keys" $s.apiKeys false)
      (list "AWS_ACCESS_KEY_ID" "aws-access-key-id" $s.awsAccessKeyId true)
      (list "AWS_SECRET_ACCESS_KEY" "aws-secret-access-key" $s.awsSecretAccessKey true) }}
{{- range $entries }}
{{- $env := index . 0 }}{{ $key := index . 1 }}{{ $value := index . 2 }}{{ $optional := index . 3 }}
{{- if or (not $.only) (has $key $.only) }}
{{- if or $root.Values.existingSecret $value }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: {{ $key }}
      {{- if and $root.Values.existingSecret $optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Settings shared by all alignd containers (the ConfigMap's data, and the migrations Job's inline env).
*/}}
{{- define "alignd.configData" -}}
ALIGND_DATA_DIR: "/var/lib/alignd"
ALIGND_QUEUE: {{ .Values.config.queue | quote }}
{{- with .Values.config.storageUrl }}
ALIGND_STORAGE_URL: {{ . | quote }}
{{- end }}
{{- with .Values.config.s3EndpointUrl }}
ALIGND_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
ALIGND_S3_PRESIGN: {{ .Values.config.s3Presign | quote }}
{{- with .Values.config.awsRegion }}
AWS_REGION: {{ . | quote }}
{{- end }}
ALIGND_MAX_DATASET_BYTES: {{ .Values.config.maxDatasetBytes | int64 | quote }}
ALIGND_MAX_MODEL_BYTES: {{ .Values.config.maxModelBytes | int64 | quote }}
ALIGND_MAX_QUEUED_JOBS_PER_TENANT: {{ .Values.config.maxQueuedJobsPerTenant | int64 | quote }}
ALIGND_LEASE_SECONDS: {{ .Values.config.leaseSeconds | toString | quote }}
ALIGND_HEARTBEAT_SECONDS: {{ .Values.config.heartbeatSeconds | toString | quote }}
ALIGND_RECONCILE_INTERVAL_SECONDS: {{ .Values.config.reconcileIntervalSeconds | toString | quote }}
ALIGND_JOB_TIMEOUT_SECONDS: {{ .Values.config.jobTimeoutSeconds | int64 | quote }}
ALIGND_JOB_MAX_TRIES: {{ .Values.config.jobMaxTries | int64 | quote }}
ALIGND_DB_RETRY_SECONDS: {{ .Values.config.dbRetrySeconds | toString | quote }}
ALIGND_CANCEL_GRACE_SECONDS: {{ .Values.config.cancelGraceSeconds | toString | quote }}
{{- with .Values.config.torchThreads }}
ALIGND_TORCH_THREADS: {{ . | int64 | quote }}
{{- end }}
ALIGND_LOG_JSON: {{ .Values.config.logJson | quote }}
ALIGND_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
HF_HUB_OFFLINE: {{ ternary "1" "0" .Values.config.hfHubOffline | quote }}
TRANSFORMERS_OFFLINE: {{ ternary "1" "0" .Values.config.hfHubOffline | quote }}
HF_HOME: "/var/cache/alignd/huggingface"
{{- range $k, $v := .Values.config.extraEnv }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end }}

{{/*
Checksums that roll the pods when their configuration changes. The secret checksum is only taken over the
chart's own Secret (never when existingSecret is set) and is a hash, never the values.
*/}}
{{- define "alignd.podChecksums" -}}
checksum/config: {{ include "alignd.configData" . | sha256sum }}
{{- if not .Values.existingSecret }}
checksum/secret: {{ toJson .Values.secrets | sha256sum }}
{{- end }}
{{- end }}

{{/*
Fail early on combinations the schema cannot express.
*/}}
{{- define "alignd.validate" -}}
{{- if .Values.worker.enabled }}
{{- $state := dict }}
{{- include "alignd.workerPools" (dict "root" . "out" $state) }}
{{- $seen := dict }}
{{- range $pool := $state.pools }}
{{- $where := ternary (printf "workerPools[%s]" $pool.pool) "worker" (ne $pool.pool "") }}
{{- if hasKey $seen $pool.name }}
{{- fail (printf "workerPools: two pools are named %q" $pool.pool) }}
{{- end }}
{{- $_ := set $seen $pool.name true }}
{{- $k := $pool.cfg.keda }}
{{- if and $k.enabled (not $k.redis.address) }}
{{- fail (printf "%s: keda.enabled needs worker.keda.redis.address (host:port of the queue's Redis)" $where) }}
{{- end }}
{{- if and $k.enabled $k.redis.passwordSecretKey (not $.Values.existingSecret) }}
{{- if or (ne $k.redis.passwordSecretKey "redis-password") (not $.Values.secrets.redisPassword) }}
{{- fail "without existingSecret, worker.keda.redis.passwordSecretKey must be redis-password and secrets.redisPassword set" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (lt (float64 .Values.config.heartbeatSeconds) (float64 .Values.config.leaseSeconds)) }}
{{- fail "config.heartbeatSeconds must be well below config.leaseSeconds (a runner renews its lease every heartbeat)" }}
{{- end }}
{{- $hpa := .Values.api.autoscaling }}
{{- if and .Values.api.enabled $hpa.enabled (eq (int $hpa.targetCPUUtilizationPercentage) 0) (eq (int $hpa.targetMemoryUtilizationPercentage) 0) }}
{{- fail "api.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage above 0" }}
{{- end }}
{{- if and .Values.api.enabled $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- fail "api.autoscaling.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- if and .Values.worker.enabled (eq .Values.config.queue "inline") }}
{{- fail "config.queue=inline runs jobs inside the API: set worker.enabled=false (and api.replicas=1), or use queue=arq" }}
{{- end }}
{{- if and (eq .Values.config.queue "inline") .Values.api.enabled (or .Values.api.autoscaling.enabled (gt (int .Values.api.replicas) 1)) }}
{{- fail "config.queue=inline supports a single API replica only" }}
{{- end }}
{{- end }}

{{/*
Every job method the server knows (service.core.jobs.Method; tests/deploy checks the two agree). Each has its
own arq queue, alignd:queue:<method> (service/queue/arq.py).
*/}}
{{- define "alignd.allMethods" -}}
sft,reward_model,dpo,ppo,grpo,rloo,rlhf,generate,evaluate,chat,score,judge
{{- end }}

{{/*
Sets every key of .src into .dst (a dict, changed in place). The chart's own maps (image, gpu, dataDir, scratch,
pdb, keda, keda.redis) are overlaid key by key, so a pool can change gpu.count alone; Kubernetes pass-through
values (resources, nodeSelector, tolerations, affinity, probes, env, ...) are replaced as a whole. Unlike
sprig's merge, a zero value (0, false, "", []) in .src does replace the default.
*/}}
{{- define "alignd.overlay" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- $current := index $dst $key }}
{{- if and (has $key (list "image" "gpu" "dataDir" "scratch" "pdb" "keda" "redis")) (kindIs "map" $value) (kindIs "map" $current) }}
{{- include "alignd.overlay" (dict "dst" $current "src" $value) }}
{{- else }}
{{- $_ := set $dst $key (deepCopy $value) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The worker pools to render, stored as a list under .out.pools. Call with (dict "root" $ "out" $dict).
Without workerPools: one pool from `worker` itself, named as before (<fullname>-worker, no pool label).
With workerPools: one pool per entry, its keys set over the worker values (alignd.overlay).
Each pool: name (object name), pool (pool name, "" for the single pool), cfg (resolved worker values),
methods (the methods it serves: cfg.methods, or every method when empty).
*/}}
{{- define "alignd.workerPools" -}}
{{- $root := .root }}
{{- $all := splitList "," (include "alignd.allMethods" $root) }}
{{- $pools := list }}
{{- $entries := $root.Values.workerPools }}
{{- if not $entries }}
{{- $entries = list (dict) }}
{{- end }}
{{- range $entries }}
{{- $cfg := deepCopy (omit $root.Values.worker "enabled") }}
{{- include "alignd.overlay" (dict "dst" $cfg "src" (omit . "name")) }}
{{- $methods := default $all $cfg.methods }}
{{- $name := include "alignd.workerName" $root }}
{{- if .name }}
{{- $name = printf "%s-%s" $name .name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- $pools = append $pools (dict "name" $name "pool" (default "" .name) "cfg" $cfg "methods" $methods) }}
{{- end }}
{{- $_ := set .out "pools" $pools }}
{{- end }}

{{/*
Labels that tell one worker pool's pods apart (selector and pod labels). Call with a pool from alignd.workerPools.
The single pool (no workerPools) keeps the selector it always had, so upgrades never touch an immutable field.
*/}}
{{- define "alignd.workerPoolLabels" -}}
app.kubernetes.io/component: worker
{{- if .pool }}
alignd.dev/worker-pool: {{ .pool }}
{{- end }}
{{- end }}
