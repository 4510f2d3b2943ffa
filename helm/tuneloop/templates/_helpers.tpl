{{/* Names */}}
{{- define "tuneloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tuneloop.fullname" -}}
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

{{/* Labels: every object; selector labels: the immutable subset used by selectors */}}
{{- define "tuneloop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tuneloop
tuneloop.io/environment: {{ .Values.environment }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tuneloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
ServiceAccount of one component. Argument: (dict "ctx" $ "component" "mlflow"); components are the keys
of .Values.serviceAccounts. Name: serviceAccounts.<component>.name, else <fullname>-<suffix>.
*/}}
{{- define "tuneloop.serviceAccountName" -}}
{{- $v := .ctx.Values -}}
{{- $sa := get $v.serviceAccounts .component -}}
{{- $suffix := get (dict "mlflow" "mlflow" "feedback" "feedback" "monitor" "monitor" "pipeline" "pipeline" "training" "training" "upload" "pipeline-upload" "mlflowUsers" "mlflow-users") .component -}}
{{- if $sa.create -}}
{{- default (printf "%s-%s" (include "tuneloop.fullname" .ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix) $sa.name -}}
{{- else -}}
{{- required (printf "serviceAccounts.%s.name is required when serviceAccounts.%s.create is false" .component .component) $sa.name -}}
{{- end -}}
{{- end -}}

{{/* The upload Job's ServiceAccount: pipeline.jobServiceAccountName (multi-user Kubeflow), else its own */}}
{{- define "tuneloop.uploadServiceAccountName" -}}
{{- default (include "tuneloop.serviceAccountName" (dict "ctx" . "component" "upload")) .Values.pipeline.jobServiceAccountName -}}
{{- end -}}

{{/* The KServe predictor's ServiceAccount (the cluster's, with storage credentials) */}}
{{- define "tuneloop.servingServiceAccountName" -}}
{{- default "tuneloop-serving" (dig "deploy" "kserve" "service_account" "" .Values.runConfig) -}}
{{- end -}}

{{/* The namespace of the InferenceService and its predictor pods (runConfig kubernetes.namespace) */}}
{{- define "tuneloop.servingNamespace" -}}
{{- default .Release.Namespace (dig "kubernetes" "namespace" "" .Values.runConfig) -}}
{{- end -}}

{{/* Pod labels of the chart's Jobs (and the monitor's): no Istio sidecar, which would outlive the container */}}
{{- define "tuneloop.jobPodLabels" -}}
{{- if and .Values.mesh.istio.enabled .Values.mesh.istio.jobsWithoutSidecar }}
sidecar.istio.io/inject: "false"
{{- end }}
{{- end -}}

{{/* The Pod Security Standard labels of the release namespace */}}
{{- define "tuneloop.podSecurityLabels" -}}
{{- $ps := .Values.namespace.podSecurity -}}
{{- range $mode := list "enforce" "audit" "warn" }}
pod-security.kubernetes.io/{{ $mode }}: {{ get $ps $mode }}
pod-security.kubernetes.io/{{ $mode }}-version: {{ $ps.version }}
{{- end }}
{{- end -}}

{{/*
MLflow credentials of one client, as (secret, usernameKey, passwordKey): its own user's keys when
mlflow.auth.users.enabled, else the admin's. Argument: (dict "ctx" $ "user" "monitor").
*/}}
{{- define "tuneloop.mlflowCredentials" -}}
{{- $a := .ctx.Values.mlflow.auth -}}
{{- if $a.users.enabled -}}
{{- $u := get $a.users .user -}}
secret: {{ $a.users.existingSecret }}
usernameKey: {{ $u.usernameKey }}
passwordKey: {{ $u.passwordKey }}
{{- else -}}
secret: {{ $a.existingSecret }}
usernameKey: {{ $a.usernameKey }}
passwordKey: {{ $a.passwordKey }}
{{- end -}}
{{- end -}}

{{/* Images: repository@digest when a digest is given, else repository:tag (tag defaults to appVersion) */}}
{{- define "tuneloop.imageRef" -}}
{{- $repo := index . 0 -}}{{- $tag := index . 1 -}}{{- $digest := index . 2 -}}
{{- if $digest -}}{{ printf "%s@%s" $repo $digest }}{{- else -}}{{ printf "%s:%s" $repo $tag }}{{- end -}}
{{- end -}}

{{- define "tuneloop.image" -}}
{{- include "tuneloop.imageRef" (list .Values.image.repository (default .Chart.AppVersion .Values.image.tag) .Values.image.digest) -}}
{{- end -}}

{{- define "tuneloop.trainImage" -}}
{{- include "tuneloop.imageRef" (list .Values.trainImage.repository (default .Chart.AppVersion .Values.trainImage.tag) .Values.trainImage.digest) -}}
{{- end -}}

{{- define "tuneloop.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- include "tuneloop.imageRef" (list .Values.mlflow.image.repository (default .Chart.AppVersion .Values.mlflow.image.tag) .Values.mlflow.image.digest) -}}
{{- else -}}
{{- include "tuneloop.image" . -}}
{{- end -}}
{{- end -}}

{{/* In-cluster URLs */}}
{{- define "tuneloop.mlflowUrl" -}}
{{- printf "http://%s-mlflow.%s.svc.cluster.local:%d" (include "tuneloop.fullname" .) .Release.Namespace (int .Values.mlflow.service.port) -}}
{{- end -}}

{{- define "tuneloop.feedbackUrl" -}}
{{- printf "http://%s-feedback.%s.svc.cluster.local:%d" (include "tuneloop.fullname" .) .Release.Namespace (int .Values.feedback.service.port) -}}
{{- end -}}

{{/* Env var through which the pipeline's tasks and the monitor reach the Postgres feedback store */}}
{{- define "tuneloop.feedbackStoreEnv" -}}
{{- default "TUNELOOP_FEEDBACK_DB" (get (default dict (get .Values.runConfig "deploy")) "feedback_store_env") -}}
{{- end -}}

{{/*
The run config as stored in the ConfigMap, wired to this release where runConfig leaves a key out:
- registry.tracking_uri: the chart's MLflow;
- kubernetes.state_pvc: stateVolume.existingClaim (mounted at state_dir in every pipeline task
  and training pod);
- kubernetes.secrets: the MLflow credentials (basic auth: the pipeline user's, or the admin's when
  mlflow.auth.users is off) and the feedback database URL, as env of every pipeline task and training pod;
- train.cluster.service_account: serviceAccounts.training (training pods: no API rights);
- deploy.feedback_store_env: that env var, when the feedback store is Postgres;
- kubernetes.pod_labels: the chart's selector labels (the NetworkPolicies select training and serving
  pods by them); train.cluster.runtime: the chart's hardened TrainingRuntime;
- kubernetes.namespace: the release namespace; deploy.kserve.feedback_url: the chart's feedback
  service; deploy.kserve.artifact_store_uri: MLflow's s3:// artifact destination;
  deploy.kserve.base_model_uri: base_model.path on the state volume (pvc://).
*/}}
{{- define "tuneloop.runConfig" -}}
{{- $v := .Values -}}
{{- $cfg := deepCopy $v.runConfig -}}
{{- $registry := default dict (get $cfg "registry") -}}
{{- if and $v.mlflow.enabled (not (get $registry "tracking_uri")) -}}
{{- $_ := set $registry "tracking_uri" (include "tuneloop.mlflowUrl" .) -}}
{{- end -}}
{{- $_ := set $cfg "registry" $registry -}}
{{- $k8s := default dict (get $cfg "kubernetes") -}}
{{- if not (hasKey $k8s "state_pvc") -}}
{{- $_ := set $k8s "state_pvc" (default nil $v.stateVolume.existingClaim) -}}
{{- end -}}
{{- $secrets := default list (get $k8s "secrets") -}}
{{- $names := list -}}
{{- range $secrets }}{{ $names = append $names .name }}{{ end -}}
{{- if and $v.mlflow.enabled $v.mlflow.auth.enabled -}}
{{- $cred := include "tuneloop.mlflowCredentials" (dict "ctx" . "user" "pipeline") | fromYaml -}}
{{- if not (has "MLFLOW_TRACKING_USERNAME" $names) -}}
{{- $secrets = append $secrets (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" $cred.secret "key" $cred.usernameKey) -}}
{{- end -}}
{{- if not (has "MLFLOW_TRACKING_PASSWORD" $names) -}}
{{- $secrets = append $secrets (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" $cred.secret "key" $cred.passwordKey) -}}
{{- end -}}
{{- end -}}
{{- $deploy := default dict (get $cfg "deploy") -}}
{{- if and $v.feedback.enabled $v.feedback.database.existingSecret -}}
{{- $env := include "tuneloop.feedbackStoreEnv" . -}}
{{- $_ := set $deploy "feedback_store_env" $env -}}
{{- if not (has $env $names) -}}
{{- $secrets = append $secrets (dict "name" $env "secret" $v.feedback.database.existingSecret "key" $v.feedback.database.urlKey) -}}
{{- end -}}
{{- end -}}
{{- if and $v.feedback.enabled $v.feedback.auth.existingSecret (eq (get $deploy "backend") "kserve") -}}
{{- $tokenEnv := default "TUNELOOP_EVENTS_TOKEN" (dig "kserve" "events_token_env" "" $deploy) -}}
{{- if not (has $tokenEnv $names) -}}
{{- $secrets = append $secrets (dict "name" $tokenEnv "secret" $v.feedback.auth.existingSecret "key" $v.feedback.auth.eventsTokenKey) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $k8s "secrets" $secrets -}}
{{- if $v.tracing.enabled -}}
{{- /* the pipeline's task pods and training pods (created by KFP and by the platform, not by this chart) */ -}}
{{- $otel := include "tuneloop.otelEnv" (dict "ctx" . "component" "pipeline") | fromYamlArray -}}
{{- $env := default dict (get $k8s "env") -}}
{{- range $otel }}{{- if not (hasKey $env .name) }}{{- $_ := set $env .name .value -}}{{- end }}{{- end -}}
{{- $_ := set $k8s "env" $env -}}
{{- end -}}
{{- if not (hasKey $k8s "pod_labels") -}}
{{- $_ := set $k8s "pod_labels" (include "tuneloop.selectorLabels" . | fromYaml) -}}
{{- end -}}
{{- if not (get $k8s "namespace") -}}
{{- $_ := set $k8s "namespace" .Release.Namespace -}}
{{- end -}}
{{- if not (hasKey $k8s "service_account") -}}
{{- $_ := set $k8s "service_account" (include "tuneloop.serviceAccountName" (dict "ctx" . "component" "pipeline")) -}}
{{- end -}}
{{- $_ := set $cfg "kubernetes" $k8s -}}
{{- $train := default dict (get $cfg "train") -}}
{{- $cluster := default dict (get $train "cluster") -}}
{{- if and $v.training.runtime.enabled (not (hasKey $cluster "runtime")) -}}
{{- $_ := set $cluster "runtime" $v.training.runtime.name -}}
{{- $_ := set $cluster "runtime_kind" "TrainingRuntime" -}}
{{- end -}}
{{- if not (hasKey $cluster "service_account") -}}
{{- $_ := set $cluster "service_account" (include "tuneloop.serviceAccountName" (dict "ctx" . "component" "training")) -}}
{{- end -}}
{{- if and $v.mlflow.enabled $v.mlflow.auth.enabled $v.mlflow.auth.users.enabled (not (hasKey $cluster "secrets")) -}}
{{- $tcred := include "tuneloop.mlflowCredentials" (dict "ctx" . "user" "training") | fromYaml -}}
{{- $_ := set $cluster "secrets" (list (dict "name" "MLFLOW_TRACKING_USERNAME" "secret" $tcred.secret "key" $tcred.usernameKey) (dict "name" "MLFLOW_TRACKING_PASSWORD" "secret" $tcred.secret "key" $tcred.passwordKey)) -}}
{{- end -}}
{{- $_ := set $train "cluster" $cluster -}}
{{- $_ := set $cfg "train" $train -}}
{{- if eq (get $deploy "backend") "kserve" -}}
{{- $ks := default dict (get $deploy "kserve") -}}
{{- if and $v.feedback.enabled (not (get $ks "feedback_url")) -}}
{{- $_ := set $ks "feedback_url" (include "tuneloop.feedbackUrl" .) -}}
{{- end -}}
{{- if and (not (get $ks "artifact_store_uri")) (hasPrefix "s3://" (toString $v.mlflow.artifacts.destination)) -}}
{{- $_ := set $ks "artifact_store_uri" $v.mlflow.artifacts.destination -}}
{{- end -}}
{{- $base := toString (get (default dict (get $cfg "base_model")) "path") -}}
{{- $mount := trimSuffix "/" $v.stateVolume.mountPath -}}
{{- if and (not (get $ks "base_model_uri")) $v.stateVolume.existingClaim (hasPrefix (printf "%s/" $mount) $base) -}}
{{- $_ := set $ks "base_model_uri" (printf "pvc://%s/%s" $v.stateVolume.existingClaim (trimPrefix (printf "%s/" $mount) $base)) -}}
{{- end -}}
{{- $_ := set $deploy "kserve" $ks -}}
{{- end -}}
{{- $_ := set $cfg "deploy" $deploy -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
Environment of every container that talks to MLflow: the server URL and, with basic auth, the
credentials of that client's own MLflow user (the admin's when mlflow.auth.users is off).
Argument: (dict "ctx" $ "user" "monitor" | "training").
*/}}
{{- define "tuneloop.mlflowClientEnv" -}}
{{- $v := .ctx.Values -}}
{{- if $v.mlflow.enabled }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "tuneloop.mlflowUrl" .ctx | quote }}
{{- if $v.mlflow.auth.enabled }}
{{- $cred := include "tuneloop.mlflowCredentials" . | fromYaml }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $cred.secret }}
      key: {{ $cred.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $cred.secret }}
      key: {{ $cred.passwordKey }}
{{- end }}
{{- end }}
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
- name: DO_NOT_TRACK
  value: "true"
- name: HOME
  value: /tmp
{{- end -}}

{{/*
OpenTelemetry: the standard OTEL_* variables that point a component at the collector (tracing.enabled);
nothing when tracing is off (tuneloop then imports no OpenTelemetry SDK). Argument: (dict "ctx" $ "component"
"feedback"); the service name is tuneloop-<component>.
*/}}
{{- define "tuneloop.otelEnv" -}}
{{- $t := .ctx.Values.tracing -}}
{{- if $t.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $t.otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: http/protobuf
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_METRICS_EXPORTER
  value: none
- name: OTEL_LOGS_EXPORTER
  value: none
- name: OTEL_SERVICE_NAME
  value: {{ printf "tuneloop-%s" .component | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "service.namespace=%s,deployment.environment.name=%s,service.version=%s" .ctx.Release.Namespace .ctx.Values.environment .ctx.Chart.AppVersion | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $t.sampleRatio | toString | quote }}
{{- end }}
{{- end -}}

{{/*
checkov findings this chart accepts, each with its reason (helm/check_chart.py fails on any
other failed check, and on a skip without a reason). Argument: (dict "ctx" $ "secretsInEnv" bool).
*/}}
{{- define "tuneloop.checkovSkips" -}}
{{- $v := .ctx.Values -}}
{{- $n := 0 -}}
{{- if not $v.image.digest }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_43=images carry the package version as an immutable release tag; set image.digest to pull by digest
{{- end }}
{{- if ne $v.image.pullPolicy "Always" }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_15=release tags are never rebuilt, so IfNotPresent is safe; set image.pullPolicy to change it
{{- end }}
{{- if .secretsInEnv }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: CKV_K8S_35=MLflow's server and clients (MLFLOW_TRACKING_PASSWORD), boto3 and the feedback service (DATABASE_URL) read credentials from env only; they come from secretKeyRef
{{- end }}
{{- end -}}

{{/* NetworkPolicy peers allowed to call MLflow */}}
{{- define "tuneloop.clientPeers" -}}
- podSelector: {}
{{- range .Values.networkPolicy.clientNamespaces }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ . }}
{{- end }}
{{- if .Values.networkPolicy.ingressNamespace }}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.networkPolicy.ingressNamespace }}
{{- end }}
{{- end }}

{{/*
Guards: combinations that cannot work fail the render with one line naming the values.
Called from every template that depends on them (the result is empty).
*/}}
{{- define "tuneloop.validate" -}}
{{- $v := .Values -}}
{{- $strict := has $v.environment (list "staging" "prod") -}}
{{- if and $v.stateVolume.existingClaim (ne (trimSuffix "/" (toString $v.runConfig.state_dir)) (trimSuffix "/" $v.stateVolume.mountPath)) -}}
{{- fail (printf "runConfig.state_dir (%s) must be stateVolume.mountPath (%s): the pipeline's tasks, the training pods and the monitor all mount the state volume at state_dir" (toString $v.runConfig.state_dir) $v.stateVolume.mountPath) -}}
{{- end -}}
{{- if and $v.mlflow.enabled $v.mlflow.auth.enabled (not $v.mlflow.auth.existingSecret) -}}
{{- fail "mlflow.auth.enabled is true but mlflow.auth.existingSecret is empty: create a Secret with the admin username and password and name it there (or turn basic auth off, dev only)" -}}
{{- end -}}
{{- if and $strict $v.mlflow.enabled (not $v.mlflow.auth.enabled) -}}
{{- fail (printf "environment %s: mlflow.auth.enabled must be true (basic auth is only optional in dev)" $v.environment) -}}
{{- end -}}
{{- if and $strict $v.mlflow.enabled (not $v.mlflow.backendStore.existingSecret) -}}
{{- fail (printf "environment %s: mlflow.backendStore.existingSecret is empty; staging and prod need the Postgres backend (the sqlite fallback loses the registry on every restart)" $v.environment) -}}
{{- end -}}
{{- if and $strict $v.mlflow.enabled (not $v.mlflow.artifacts.destination) -}}
{{- fail (printf "environment %s: mlflow.artifacts.destination is empty; staging and prod need an S3 artifact store" $v.environment) -}}
{{- end -}}
{{- if and $strict $v.feedback.enabled (not $v.feedback.database.existingSecret) -}}
{{- fail (printf "environment %s: feedback.database.existingSecret is empty; staging and prod need the Postgres feedback store" $v.environment) -}}
{{- end -}}
{{- if and $strict (not $v.stateVolume.existingClaim) -}}
{{- fail (printf "environment %s: stateVolume.existingClaim is empty; the monitor and the training pods need the shared state volume" $v.environment) -}}
{{- end -}}
{{- if and $v.mlflow.enabled (gt (int $v.mlflow.replicas) 1) (not $v.mlflow.backendStore.existingSecret) -}}
{{- fail "mlflow.replicas > 1 needs mlflow.backendStore.existingSecret (each replica would get its own sqlite file)" -}}
{{- end -}}
{{- if and $v.mlflow.enabled (gt (int $v.mlflow.replicas) 1) (not $v.mlflow.artifacts.destination) -}}
{{- fail "mlflow.replicas > 1 needs mlflow.artifacts.destination (each replica would keep artifacts on its own emptyDir)" -}}
{{- end -}}
{{- if and $v.feedback.enabled (gt (int $v.feedback.replicas) 1) (not $v.feedback.database.existingSecret) -}}
{{- fail "feedback.replicas > 1 needs feedback.database.existingSecret (each replica would get its own sqlite file)" -}}
{{- end -}}
{{- if and $v.mlflow.enabled $v.mlflow.artifacts.existingSecret (not (hasPrefix "s3://" $v.mlflow.artifacts.destination)) -}}
{{- fail "mlflow.artifacts.existingSecret holds S3 credentials but mlflow.artifacts.destination is not an s3:// URI" -}}
{{- end -}}
{{- if and $v.rbac.create (not $v.rbac.pipelineServiceAccounts) -}}
{{- fail "rbac.create is true but rbac.pipelineServiceAccounts is empty: name the ServiceAccount(s) Kubeflow Pipelines runs the task pods as" -}}
{{- end -}}
{{- if and $v.pipeline.enabled $v.pipeline.schedule.enabled (ne (len (splitList " " (trim $v.pipeline.schedule.cron))) 6) -}}
{{- fail (printf "pipeline.schedule.cron %q: Kubeflow Pipelines wants 6 fields, seconds first (e.g. \"0 0 3 * * *\")" $v.pipeline.schedule.cron) -}}
{{- end -}}
{{- if and $v.monitor.enabled (not $v.mlflow.enabled) (not (dig "registry" "tracking_uri" "" $v.runConfig)) -}}
{{- fail "monitor.enabled with mlflow.enabled false: set runConfig.registry.tracking_uri to your MLflow server" -}}
{{- end -}}
{{- if and $v.training.runtime.enabled (lt (int $v.training.gpusPerNode) 1) -}}
{{- fail "training.gpusPerNode must be at least 1 when training.runtime.enabled is true" -}}
{{- end -}}
{{- $users := $v.mlflow.auth.users -}}
{{- if and $v.mlflow.enabled $v.mlflow.auth.enabled $users.enabled (not $users.existingSecret) -}}
{{- fail "mlflow.auth.users.enabled is true but mlflow.auth.users.existingSecret is empty: create a Secret with each component's MLflow username and password (README \"Per-component accounts\") and name it there" -}}
{{- end -}}
{{- if and $strict $v.mlflow.enabled $v.mlflow.auth.enabled (not $users.enabled) -}}
{{- fail (printf "environment %s: mlflow.auth.users.enabled must be true (the pipeline, the monitor and the training pods get their own MLflow users; the admin account is for people)" $v.environment) -}}
{{- end -}}
{{- if and $v.mlflow.enabled $v.mlflow.auth.enabled $users.enabled (eq $users.existingSecret $v.mlflow.auth.existingSecret) -}}
{{- fail "mlflow.auth.users.existingSecret must not be mlflow.auth.existingSecret: the clients' Secret would carry the admin password" -}}
{{- end -}}
{{- if and $v.feedback.enabled (not $v.feedback.auth.existingSecret) -}}
{{- fail "feedback.enabled but feedback.auth.existingSecret is empty: the feedback service refuses to start without API keys and a user-id secret (README \"Install per environment\")" -}}
{{- end -}}
{{- if and $v.tracing.enabled (not $v.tracing.otlpEndpoint) -}}
{{- fail "tracing.enabled but tracing.otlpEndpoint is empty: name the OpenTelemetry collector's OTLP/HTTP endpoint (e.g. http://otel-collector.observability:4318)" -}}
{{- end -}}
{{- include "tuneloop.validateNamespace" . -}}
{{- end -}}

{{/* Guards of the namespace, Pod Security and mesh values */}}
{{- define "tuneloop.validateNamespace" -}}
{{- $v := .Values -}}
{{- $ns := $v.namespace -}}
{{- if and $ns.create (has .Release.Namespace (list "default" "kube-system" "kube-public" "kube-node-lease")) -}}
{{- fail (printf "namespace.create: the release namespace %s is a system namespace; install into a namespace of its own" .Release.Namespace) -}}
{{- end -}}
{{- if and $ns.create (eq $v.pipeline.kfpNamespace .Release.Namespace) -}}
{{- fail (printf "namespace.create: %s is the Kubeflow profile namespace (pipeline.kfpNamespace); the profile controller owns it and its labels - set namespace.create false and label it as README \"Pod Security\" shows" .Release.Namespace) -}}
{{- end -}}
{{- range $k, $_ := $ns.labels -}}
{{- if hasPrefix "pod-security.kubernetes.io/" $k -}}
{{- fail (printf "namespace.labels.%s: set the Pod Security levels in namespace.podSecurity, not as labels" $k) -}}
{{- end -}}
{{- end -}}
{{- if eq $ns.podSecurity.enforce "restricted" -}}
{{- $pod := $v.podSecurityContext -}}
{{- $c := $v.containerSecurityContext -}}
{{- $why := list -}}
{{- if not (or (eq (toString $pod.runAsNonRoot) "true") (eq (toString $c.runAsNonRoot) "true")) -}}{{- $why = append $why "runAsNonRoot must be true" -}}{{- end -}}
{{- if or (eq (toString $pod.runAsUser) "0") (eq (toString $c.runAsUser) "0") -}}{{- $why = append $why "runAsUser must not be 0" -}}{{- end -}}
{{- $seccomp := default (dig "seccompProfile" "type" "" $pod) (dig "seccompProfile" "type" "" $c) -}}
{{- if not (has $seccomp (list "RuntimeDefault" "Localhost")) -}}{{- $why = append $why "seccompProfile.type must be RuntimeDefault or Localhost" -}}{{- end -}}
{{- if ne (toString $c.allowPrivilegeEscalation) "false" -}}{{- $why = append $why "containerSecurityContext.allowPrivilegeEscalation must be false" -}}{{- end -}}
{{- if eq (toString $c.privileged) "true" -}}{{- $why = append $why "containerSecurityContext.privileged must not be true" -}}{{- end -}}
{{- if not (has "ALL" (default list (dig "capabilities" "drop" (list) $c))) -}}{{- $why = append $why "containerSecurityContext.capabilities.drop must contain ALL" -}}{{- end -}}
{{- range (default list (dig "capabilities" "add" (list) $c)) -}}{{- if ne . "NET_BIND_SERVICE" -}}{{- $why = append $why (printf "capability %s may not be added" .) -}}{{- end -}}{{- end -}}
{{- if $why -}}
{{- fail (printf "namespace.podSecurity.enforce is restricted but podSecurityContext/containerSecurityContext would be rejected: %s" (join "; " $why)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.mesh.istio.enabled (eq $ns.podSecurity.enforce "restricted") (not $v.mesh.istio.cni) -}}
{{- fail "mesh.istio.enabled with namespace.podSecurity.enforce restricted needs mesh.istio.cni true: an injected istio-init container (NET_ADMIN, NET_RAW) cannot pass the restricted profile; use the Istio CNI plugin or ambient mode" -}}
{{- end -}}
{{- if and $v.mesh.istio.enabled $v.feedback.enabled (ne (dig "deploy" "backend" "local" $v.runConfig) "kserve") -}}
{{- fail "mesh.istio.enabled: the feedback service's AuthorizationPolicy admits KServe's payload logger by the serving ServiceAccount; runConfig.deploy.backend must be kserve" -}}
{{- end -}}
{{- end -}}
