{{/* Names, labels and images shared by the templates. */}}

{{/* The chart name, or nameOverride. */}}
{{- define "mbs-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: fullnameOverride, or "<release>-<name>" (just "<release>" when it
already contains the name). */}}
{{- define "mbs-csi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "mbs-csi.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "mbs-csi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mbs-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the chart's pods (each workload adds app.kubernetes.io/component). */}}
{{- define "mbs-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mbs-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The mbs-csi image. */}}
{{- define "mbs-csi.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Service accounts. */}}
{{- define "mbs-csi.controllerServiceAccount" -}}
{{ include "mbs-csi.fullname" . }}-controller
{{- end }}

{{- define "mbs-csi.nodeServiceAccount" -}}
{{ include "mbs-csi.fullname" . }}-node
{{- end }}

{{/* The Secret holding the backends' sensitive options. */}}
{{- define "mbs-csi.sensitiveOptionsSecret" -}}
{{ .Values.sensitiveOptions.existingSecret | default (printf "%s-backend-options" (include "mbs-csi.fullname" .)) }}
{{- end }}

{{/* The Secret holding the PostgreSQL URL, and its key. */}}
{{- define "mbs-csi.databaseSecret" -}}
{{ .Values.database.postgresql.existingSecret | default (printf "%s-database" (include "mbs-csi.fullname" .)) }}
{{- end }}

{{- define "mbs-csi.databaseSecretKey" -}}
{{ ternary .Values.database.postgresql.existingSecretKey "url" (ne .Values.database.postgresql.existingSecret "") }}
{{- end }}

{{/* The image of one sidecar: call with (list $ <sidecar key>). Its `image` value, or the one of the first
sidecars.releases entry whose kubeVersion constraint the cluster's version meets. */}}
{{- define "mbs-csi.sidecarImage" -}}
{{- $root := index . 0 }}
{{- $key := index . 1 }}
{{- $image := (index $root.Values.sidecars $key).image }}
{{- if not $image }}
{{- range $root.Values.sidecars.releases }}
{{- if and (not $image) (semverCompare .kubeVersion $root.Capabilities.KubeVersion.Version) }}
{{- $image = required (printf "sidecars.releases entry %q names no %s image" .kubeVersion $key) (index . $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- required (printf "no sidecars.releases entry matches Kubernetes %s: set sidecars.%s.image" $root.Capabilities.KubeVersion.Version $key) $image }}
{{- end }}

{{/* The release (semantic version, without "v") of a sidecar image: call with (list $ <sidecar key>);
"" when its tag is not a version (a digest, "latest"). */}}
{{- define "mbs-csi.sidecarRelease" -}}
{{- $tag := include "mbs-csi.sidecarImage" . | splitList "@" | first | splitList ":" | last }}
{{- if regexMatch "^v?[0-9]+\\.[0-9]+\\.[0-9]+" $tag }}{{ trimPrefix "v" $tag }}{{ end }}
{{- end }}

{{/* "true" when the snapshot sidecar, its RBAC and the VolumeSnapshotClass are made: snapshots.enabled,
and the cluster serves the VolumeSnapshot API (or snapshots.force). */}}
{{- define "mbs-csi.snapshots" -}}
{{- if and .Values.snapshots.enabled (or .Values.snapshots.force (.Capabilities.APIVersions.Has "snapshot.storage.k8s.io/v1")) }}true{{ end }}
{{- end }}

{{/* The controller sidecars' --timeout: longer than a backend call may take (controller.backendTimeout,
which bounds the wait for a worker and the call together), so the driver always answers first. */}}
{{- define "mbs-csi.sidecarTimeout" -}}
{{ add (int .Values.controller.backendTimeout) 60 }}s
{{- end }}

{{/* The node-stage Secret of one backend: call with (list $ <backend>); empty when the backend has none. */}}
{{- define "mbs-csi.nodeStageSecret" -}}
{{- $root := index . 0 }}
{{- $backend := index . 1 }}
{{- $secret := dig "nodeStageSecret" dict $backend }}
{{- if or (dig "name" "" $secret) (dig "data" dict $secret) }}
{{- dig "name" "" $secret | default (printf "%s-%s-node-stage" (include "mbs-csi.fullname" $root) $backend.name) }}
{{- end }}
{{- end }}

{{/* Settings the chart refuses, with the reason. Included by the controller Deployment. */}}
{{- define "mbs-csi.validate" -}}
{{- if not (has .Values.database.type (list "sqlite" "postgresql")) }}
{{- fail (printf "database.type must be sqlite or postgresql, not %q" .Values.database.type) }}
{{- end }}
{{- if and (gt (int .Values.controller.replicas) 1) (eq .Values.database.type "sqlite") }}
{{- fail (printf "controller.replicas=%d needs database.type=postgresql: the SQLite database lives on one ReadWriteOnce volume and serves a single controller. Set database.type=postgresql with database.postgresql.existingSecret (or url), or controller.replicas=1." (int .Values.controller.replicas)) }}
{{- end }}
{{- if and (eq .Values.database.type "postgresql") (not (or .Values.database.postgresql.existingSecret .Values.database.postgresql.url)) }}
{{- fail "database.type=postgresql needs database.postgresql.existingSecret (a Secret holding the URL) or database.postgresql.url" }}
{{- end }}
{{- /* Bootstrap deadlock: the controller's SQLite claim, left to the cluster's default StorageClass, must not
land on this driver's StorageClass. Checked when the chart makes the claim (a claim that exists already
keeps the StorageClass it was given): against the chart's own StorageClasses, and against the cluster's,
which helm looks up at install and upgrade (`helm template` finds nothing). */}}
{{- $claim := .Values.controller.state.persistentVolumeClaim }}
{{- $claimName := printf "%s-controller-state" (include "mbs-csi.fullname" .) }}
{{- if and (eq .Values.database.type "sqlite") (not .Values.controller.state.hostPath) (not $claim.existingClaim) (not $claim.storageClassName) (not (lookup "v1" "PersistentVolumeClaim" .Release.Namespace $claimName)) }}
{{- $fix := "Set controller.state.persistentVolumeClaim.storageClassName to another StorageClass (or existingClaim, or database.type=postgresql)" }}
{{- range .Values.backends }}
{{- $sc := dig "storageClass" dict . }}
{{- if and (dig "create" true $sc) (dig "isDefault" false $sc) }}
{{- fail (printf "backends[%s].storageClass.isDefault makes this driver's StorageClass the cluster default while controller.state.persistentVolumeClaim.storageClassName is empty: the controller's own SQLite claim would wait for the controller itself, which cannot start without it. %s, or drop isDefault." .name $fix) }}
{{- end }}
{{- end }}
{{- range dig "items" list (lookup "storage.k8s.io/v1" "StorageClass" "" "") }}
{{- if and (eq (dig "provisioner" "" .) $.Values.driverName) (eq (dig "metadata" "annotations" "storageclass.kubernetes.io/is-default-class" "" .) "true") }}
{{- fail (printf "the cluster's default StorageClass %s is served by this driver (%s) while controller.state.persistentVolumeClaim.storageClassName is empty: the controller's own SQLite claim would wait for the controller itself, which cannot start without it. %s." .metadata.name $.Values.driverName $fix) }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.backends }}
{{- if hasKey (dig "storageClass" dict .) "parameters" }}
{{- fail (printf "backends[%s].storageClass.parameters: the driver accepts no StorageClass parameter besides \"backend\" and the csi.storage.k8s.io/ keys the chart sets (fsType, the node-stage secret); remove it" .name) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The controller's volumes shared with the `helm test` pod: configuration, sensitive options, extra Secrets. */}}
{{- define "mbs-csi.controllerConfigVolumes" -}}
- name: config
  configMap:
    name: {{ include "mbs-csi.fullname" . }}
- name: backend-options
  secret:
    secretName: {{ include "mbs-csi.sensitiveOptionsSecret" . }}
    defaultMode: 0440
{{- range .Values.controller.secretMounts }}
- name: {{ .name }}
  secret:
    secretName: {{ .secretName }}
    defaultMode: 0440
{{- end }}
{{- with .Values.controller.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mbs-csi.controllerConfigMounts" -}}
- name: config
  mountPath: /etc/mbs-csi/config
  readOnly: true
- name: backend-options
  mountPath: /etc/mbs-csi/secrets
  readOnly: true
{{- range .Values.controller.secretMounts }}
- name: {{ .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- with .Values.controller.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The controller's environment shared with the `helm test` pod. */}}
{{- define "mbs-csi.controllerConfigEnv" -}}
- name: MBS_CSI_CONFIG
  value: /etc/mbs-csi/config/config.yaml
- name: MBS_CSI_SENSITIVE_OPTIONS_DIR
  value: /etc/mbs-csi/secrets
{{- if eq .Values.database.type "postgresql" }}
- name: MBS_CSI_DATABASE
  valueFrom:
    secretKeyRef:
      name: {{ include "mbs-csi.databaseSecret" . }}
      key: {{ include "mbs-csi.databaseSecretKey" . }}
{{- end }}
{{- with .Values.controller.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Arguments every controller sidecar takes: call with (list $ <metrics port>). Leader election is on
at any replica count: during a rollout an old and a new pod never act at once. */}}
{{- define "mbs-csi.sidecarArgs" -}}
{{- $root := index . 0 -}}
- --csi-address=/csi/csi.sock
- --v={{ $root.Values.sidecars.logVerbosity }}
- --timeout={{ include "mbs-csi.sidecarTimeout" $root }}
- --http-endpoint=:{{ index . 1 }}
- --leader-election
- --leader-election-namespace={{ $root.Release.Namespace }}
{{- end }}

{{/* Security context of the sidecar containers (in both pods). */}}
{{- define "mbs-csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* A topology map as the driver's environment wants it: "key=value,key2=value2". */}}
{{- define "mbs-csi.topologyText" -}}
{{- $pairs := list }}
{{- range $key, $value := . }}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
