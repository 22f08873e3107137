{{/* The chart name, or nameOverride. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name of every resource: <release>-kubetune unless the release name has it. */}}
{{- define "kubetune.fullname" -}}
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

{{/* Labels of every resource. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end -}}

{{/* Labels that select the operator pod. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image reference (digest wins over tag). */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The default trainer image reference. */}}
{{- define "kubetune.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/*
RBAC rules, as lists shared by the ClusterRoles and Roles.

Framework rules are what Kopf itself needs; application rules are what kubetune's reconciler
calls (kubetune/operator/k8s.py). Kopf runs with --standalone: no peering objects, so no
rights on kopf.dev peerings.
*/}}
{{- define "kubetune.rules.framework.namespaced" -}}
# Framework (Kopf and our reconciler): post Events on FineTuneJobs (kubectl describe ftj).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{- define "kubetune.rules.application" -}}
# Application: watch FineTuneJobs (Kopf), read them, patch Kopf's bookkeeping annotations,
# delete finished ones whose ttlSecondsAfterFinished ran out.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch, delete]
# Application: write status through the /status subresource.
- apiGroups: [kubetune.dev]
  resources: [finetunejobs/status]
  verbs: [get, patch]
# Application: the prepare and training Jobs (created, watched, suspended; deleted by the
# garbage collector through owner references, and by the operator only to restart a failed
# multi-node training gang it owns: docs/operator.md "Multi-node gangs").
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Application: a child Job's FailedCreate Events (why the API server refuses its pods). RBAC
# cannot narrow a list to them: cluster-wide installs may list every namespace's Events.
- apiGroups: [""]
  resources: [events]
  verbs: [list]
# Application: rank 0's address and the pods' termination messages.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
# Application: the headless rendezvous Service of each training run.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# Application: the <job>-config ConfigMap (spec and plan), and reading configmap:// inputs.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Application: a queued training Job's Kueue Workload (read by the Job's uid label; patched
# for spec.active when spec.suspend changes) and its LocalQueue (exists? pending count).
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch, patch]
- apiGroups: [kueue.x-k8s.io]
  resources: [localqueues]
  verbs: [get]
# Application: a waiting Workload's position, from Kueue's visibility API (an aggregated API;
# without it, status shows the LocalQueue's pending count only).
- apiGroups: [visibility.kueue.x-k8s.io]
  resources: [localqueues/pendingworkloads]
  verbs: [get]
{{- end -}}

{{- define "kubetune.rules.secrets" -}}
# Application: the <job>-control Secret (the token the operator and rank 0 share): created,
# and read back to send the stop request. No list or watch.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
{{- end -}}
