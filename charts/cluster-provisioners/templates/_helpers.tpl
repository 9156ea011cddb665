{{/*
Helpers shared by every template of the cluster-provisioners chart.
*/}}

{{/* Chart name, overridable with .Values.nameOverride. */}}
{{- define "cluster-provisioners.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name used as the prefix of every resource. Truncated to 63 characters
(DNS label limit); suffixes added by templates are short, and trimmed again where needed.
*/}}
{{- define "cluster-provisioners.fullname" -}}
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

{{/* "name-suffix", kept within 63 characters. Call with (list $ "suffix"). */}}
{{- define "cluster-provisioners.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "cluster-provisioners.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "cluster-provisioners.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels put on every object the chart creates. */}}
{{- define "cluster-provisioners.labels" -}}
helm.sh/chart: {{ include "cluster-provisioners.chart" . }}
{{ include "cluster-provisioners.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cluster-provisioners
{{- end }}

{{- define "cluster-provisioners.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cluster-provisioners.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector of the Jupyter Server pods (also used by the kernel NetworkPolicy). */}}
{{- define "cluster-provisioners.serverSelectorLabels" -}}
{{ include "cluster-provisioners.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Labels that the Kubernetes provisioner puts on every kernel pod. The chart never creates
kernel pods; it only selects them (NetworkPolicy).
*/}}
{{- define "cluster-provisioners.kernelPodLabels" -}}
app.kubernetes.io/managed-by: cluster-provisioners
app.kubernetes.io/component: kernel
{{- end }}

{{- define "cluster-provisioners.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cluster-provisioners.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the server token, and the key inside it. */}}
{{- define "cluster-provisioners.tokenSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- include "cluster-provisioners.suffixed" (list . "token") }}
{{- end }}
{{- end }}

{{- define "cluster-provisioners.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecretKey }}
{{- else -}}
token
{{- end }}
{{- end }}

{{- define "cluster-provisioners.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Namespace the kernels start in unless a kernelspec says otherwise: by default one of their
own, "<release namespace>-<release>-kernels", so that the server's token, Helm's release
Secrets and everything else of the release namespace stay out of the kernels' Role.
*/}}
{{- define "cluster-provisioners.kernelNamespace" -}}
{{- if .Values.kernels.namespace }}
{{- .Values.kernels.namespace }}
{{- else }}
{{- printf "%s-%s" .Release.Namespace .Release.Name | trunc 55 | trimSuffix "-" }}-kernels
{{- end }}
{{- end }}

{{/* The installation's name as kernel pods are labelled with it: "<namespace>.<release>". */}}
{{- define "cluster-provisioners.release" -}}
{{- printf "%s.%s" .Release.Namespace .Release.Name }}
{{- end }}

{{/*
Every namespace kernels may run in, as a JSON list (use with fromJsonArray): the default
kernel namespace first, then kernels.extraNamespaces, without duplicates.
*/}}
{{- define "cluster-provisioners.kernelNamespaces" -}}
{{- $all := list (include "cluster-provisioners.kernelNamespace" .) }}
{{- range .Values.kernels.extraNamespaces }}
{{- $all = append $all . }}
{{- end }}
{{- $all | uniq | toJson }}
{{- end }}

{{/* Server base URL, always starting and ending with "/". */}}
{{- define "cluster-provisioners.baseUrl" -}}
{{- $u := trimAll "/" .Values.server.baseUrl }}
{{- if $u }}{{ printf "/%s/" $u }}{{ else }}/{{ end }}
{{- end }}

{{/* A Python literal for a boolean. */}}
{{- define "cluster-provisioners.pyBool" -}}
{{- ternary "True" "False" (and (not (kindIs "invalid" .)) (eq (toString .) "true")) }}
{{- end }}

{{/* Directories inside the server container. */}}
{{- define "cluster-provisioners.configDir" -}}/etc/cluster-provisioners/jupyter{{- end }}
{{- define "cluster-provisioners.dataDir" -}}/opt/cluster-provisioners/share/jupyter{{- end }}
{{- define "cluster-provisioners.tokenDir" -}}/var/run/secrets/cluster-provisioners{{- end }}
{{- define "cluster-provisioners.usersDir" -}}/var/run/secrets/cluster-provisioners-users{{- end }}

{{/*
Kernelspecs after template rendering: a dict name -> kernel.json content. String values in
.Values.kernels.kernelspecs may use template actions such as {{ .Values.kernels.image }}.
Entries set to null are dropped. Each kernelspec named in kernels.pools.sizes gets that size
as metadata.kernel_provisioner.config.pool_size (a size of 0 writes nothing, but overrides a
pool_size the kernelspec sets itself); a name that is no kernelspec fails the render.
Returned as JSON (use with fromJson).
*/}}
{{- define "cluster-provisioners.kernelspecs" -}}
{{- $out := dict }}
{{- range $name, $spec := .Values.kernels.kernelspecs }}
{{- if $spec }}
{{- $_ := set $out $name (tpl (toJson $spec) $ | fromJson) }}
{{- end }}
{{- end }}
{{- $volume := .Values.kernels.userVolume }}
{{- if $volume.enabled }}
{{- range $name, $spec := $out }}
{{- $provisioner := dig "metadata" "kernel_provisioner" dict $spec }}
{{- if eq (index $provisioner "provisioner_name" | default "") "cluster-kubernetes-provisioner" }}
{{- $config := index $provisioner "config" | default dict }}
{{- $_ := set $provisioner "config" $config }}
{{- $defaults := dict "user_volume_mount_path" $volume.mountPath "user_volume_size" $volume.size "user_volume_storage_class" $volume.storageClass }}
{{- range $key, $value := $defaults }}
{{- if not (hasKey $config $key) }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $size := .Values.kernels.pools.sizes }}
{{- if not (hasKey $out $name) }}
{{- fail (printf "kernels.pools.sizes names %q, which is no kernelspec in kernels.kernelspecs (kernelspecs: %s)" $name (keys $out | sortAlpha | join ", ")) }}
{{- end }}
{{- $spec := index $out $name }}
{{- $own := dig "metadata" "kernel_provisioner" "config" "pool_size" nil $spec }}
{{- if or (gt (int $size) 0) (not (kindIs "invalid" $own)) }}
{{- $meta := index $spec "metadata" | default dict }}
{{- $_ := set $spec "metadata" $meta }}
{{- $provisioner := index $meta "kernel_provisioner" | default dict }}
{{- $_ = set $meta "kernel_provisioner" $provisioner }}
{{- if and (gt (int $size) 0) (not (index $provisioner "provisioner_name")) }}
{{- fail (printf "kernels.pools.sizes gives kernelspec %q a pool, but it names no metadata.kernel_provisioner.provisioner_name: jupyter_client's default local provisioner keeps no pool" $name) }}
{{- end }}
{{- $config := index $provisioner "config" | default dict }}
{{- $_ = set $provisioner "config" $config }}
{{- $_ = set $config "pool_size" (int $size) }}
{{- end }}
{{- end }}
{{- $out | toJson }}
{{- end }}

{{/*
Names of the kernelspecs with a warm pool (pool_size > 0 in their provisioner config, from
kernels.pools.sizes or written in the kernelspec), sorted, as a JSON list. Call with the
parsed output of cluster-provisioners.kernelspecs.
*/}}
{{- define "cluster-provisioners.pooledKernelspecs" -}}
{{- $pooled := list }}
{{- range $name, $spec := . }}
{{- if gt (int (dig "metadata" "kernel_provisioner" "config" "pool_size" 0 $spec)) 0 }}
{{- $pooled = append $pooled $name }}
{{- end }}
{{- end }}
{{- $pooled | sortAlpha | toJson }}
{{- end }}

{{/*
Whether a kernelspec mounts a claim per user (user_volume_mount_path set in its provisioner
config, from kernels.userVolume or written in the kernelspec): "true" or "". Call with the
parsed output of cluster-provisioners.kernelspecs.
*/}}
{{- define "cluster-provisioners.userVolumes" -}}
{{- range $name, $spec := . }}
{{- if dig "metadata" "kernel_provisioner" "config" "user_volume_mount_path" "" $spec }}true{{- end }}
{{- end }}
{{- end }}

{{/*
Kernel images to pre-pull: kernels.image, every image named in a kernelspec's provisioner
config, and prePuller.extraImages, without duplicates. Returned as a JSON list.
*/}}
{{- define "cluster-provisioners.prePullImages" -}}
{{- $images := list .Values.kernels.image }}
{{- range $name, $spec := include "cluster-provisioners.kernelspecs" . | fromJson }}
{{- $img := dig "metadata" "kernel_provisioner" "config" "image" "" $spec }}
{{- if $img }}
{{- $images = append $images $img }}
{{- end }}
{{- end }}
{{- range .Values.prePuller.extraImages }}
{{- $images = append $images . }}
{{- end }}
{{- $images | uniq | toJson }}
{{- end }}

{{/* Container securityContext shared by every container the chart runs. */}}
{{- define "cluster-provisioners.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* A RoleBinding of the server's account to Role $name in $ns. Call with (list $ $ns $name). */}}
{{- define "cluster-provisioners.roleBinding" -}}
{{- $root := index . 0 }}
{{- $ns := index . 1 }}
{{- $name := index . 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $name }}
  namespace: {{ $ns }}
  labels:
    {{- include "cluster-provisioners.labels" $root | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ $name }}
subjects:
  - kind: ServiceAccount
    name: {{ include "cluster-provisioners.serviceAccountName" $root }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}

{{/*
A dict of booleans as a Python dict literal: {"a": True, "b": False}.
*/}}
{{- define "cluster-provisioners.pyDict" -}}
{{- $items := list }}
{{- range $key, $value := . }}
{{- $items = append $items (printf "%s: %s" (toJson $key) (ternary "True" "False" (eq (toString $value) "true"))) }}
{{- end }}
{{- printf "{%s}" (join ", " $items) }}
{{- end }}
