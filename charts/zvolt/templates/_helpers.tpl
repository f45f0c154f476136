{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "zvolt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name. */}}
{{- define "zvolt.fullname" -}}
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

{{- define "zvolt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "zvolt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: zvolt
{{- end -}}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "agent"). */}}
{{- define "zvolt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "zvolt.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Label selector string the controller uses to find this release's agent pods. */}}
{{- define "zvolt.agentSelector" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=agent" (include "zvolt.name" .) .Release.Name -}}
{{- end -}}

{{- define "zvolt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A sidecar image: call with (dict "ctx" $ "s" .Values.sidecars.provisioner). */}}
{{- define "zvolt.sidecarImage" -}}
{{- printf "%s:%s" .s.repository .s.tag -}}
{{- end -}}

{{- define "zvolt.parent" -}}
{{- default (printf "%s/zvolt" .Values.agent.pool) .Values.agent.parent -}}
{{- end -}}

{{/* The storage network's CIDR. No default is safe (a guess exposes targets or cuts the data
path), so an empty value fails the render here with what to do. */}}
{{- define "zvolt.storageNetwork" -}}
{{- required "storageNetwork.cidr is required: the IPv4 CIDR of the network NVMe/TCP runs on, e.g. --set storageNetwork.cidr=10.42.0.0/24 (see SECURITY.md, The storage network)" .Values.storageNetwork.cidr -}}
{{- end -}}

{{/* Flags of the NVMe/TCP guard, the same for the agent and the node plugin. */}}
{{- define "zvolt.guardArgs" -}}
- --storage-network={{ include "zvolt.storageNetwork" . }}
- --nvme-port={{ .Values.agent.nvmePort }}
{{- if not .Values.storageNetwork.guard }}
- --no-guard
{{- end }}
{{- end -}}

{{- define "zvolt.caSecret" -}}{{ include "zvolt.fullname" . }}-ca{{- end -}}
{{- define "zvolt.agentTlsSecret" -}}{{ include "zvolt.fullname" . }}-agent-tls{{- end -}}
{{- define "zvolt.controllerTlsSecret" -}}{{ include "zvolt.fullname" . }}-controller-tls{{- end -}}

{{/* DNS name in the agent's server certificate. The controller dials agents by pod IP, so
it verifies the certificate against this fixed name (gRPC ssl_target_name_override). */}}
{{- define "zvolt.agentTlsName" -}}{{ include "zvolt.fullname" . }}-agent.{{ .Release.Namespace }}.svc{{- end -}}

{{/* Command-line TLS flags for a gRPC peer, or --insecure when TLS is off. */}}
{{- define "zvolt.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert=/etc/zvolt/tls/tls.crt
- --tls-key=/etc/zvolt/tls/tls.key
- --tls-ca=/etc/zvolt/tls/ca.crt
{{- else }}
- --insecure
{{- end }}
{{- end -}}

{{- define "zvolt.sidecarResources" -}}
{{- with .Values.sidecars.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Hardening shared by every unprivileged container. */}}
{{- define "zvolt.restrictedContainer" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/*
The VolumeGroupSnapshotClass API version to use, or "" for none. "auto" takes the newest one
the cluster serves, so an install on a cluster without the group snapshot CRDs renders no class
and leaves csi-snapshotter's CSIVolumeGroupSnapshot gate off (with the gate on, a v8.2
snapshot-controller refuses to start without those CRDs).
*/}}
{{- define "zvolt.groupSnapshotApiVersion" -}}
{{- $g := .Values.volumeGroupSnapshotClass -}}
{{- if $g.enabled -}}
{{- if ne $g.apiVersion "auto" -}}
{{- $g.apiVersion -}}
{{- else -}}
{{- range list "v1" "v1beta2" "v1beta1" -}}
{{- if $.Capabilities.APIVersions.Has (printf "groupsnapshot.storage.k8s.io/%s/VolumeGroupSnapshotClass" .) -}}
groupsnapshot.storage.k8s.io/{{ . }}
{{- break -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
DH-HMAC-CHAP (SECURITY.md, "NVMe in-band authentication"). "zvolt.dhchapMode" takes a value
(the top-level `dhchap`, or a class's) and gives "bidirectional", "unidirectional" or "off": a
values file that says `dhchap: off` unquoted gives YAML 1.1's boolean false, which means off too.
*/}}
{{- define "zvolt.dhchapMode" -}}
{{- $m := toString . -}}
{{- if has $m (list "false" "off" "" "<nil>") -}}off{{- else -}}{{ $m }}{{- end -}}
{{- end -}}

{{/* "true" when volumes are authenticated (agents refuse a publish without keys), else "". */}}
{{- define "zvolt.dhchapOn" -}}
{{- if ne (include "zvolt.dhchapMode" .Values.dhchap) "off" -}}true{{- end -}}
{{- end -}}

{{/* Name of a volume's DH-HMAC-CHAP Secret, as a node-stage secret template the
external-provisioner fills per PV (zvolt.names.dhchap_secret_name; the controller creates it). */}}
{{- define "zvolt.dhchapSecretName" -}}zvolt-dhchap-${pv.name}{{- end -}}

{{/*
A class's DH-HMAC-CHAP mode: call with (dict "ctx" $ "sc" <class>). Its own `dhchap` or else the
top-level value. The agents either refuse every publish without keys (`dhchap` on) or take none,
so a class that differs from the top-level value in being on or off fails the render.
*/}}
{{- define "zvolt.dhchapClassMode" -}}
{{- $top := include "zvolt.dhchapMode" .ctx.Values.dhchap -}}
{{- $mode := $top -}}
{{- if hasKey .sc "dhchap" -}}
{{- $mode = include "zvolt.dhchapMode" .sc.dhchap -}}
{{- end -}}
{{- if and (eq $mode "off") (ne $top "off") -}}
{{- fail (printf "storageClasses %s: dhchap is off for this class but the top-level value dhchap=%s makes every agent refuse a publish without DH-HMAC-CHAP keys, so its volumes would never attach; remove the class's dhchap (or set dhchap=off for the whole release, SECURITY.md)" .sc.name $top) -}}
{{- end -}}
{{- if and (ne $mode "off") (eq $top "off") -}}
{{- fail (printf "storageClasses %s: dhchap=%s needs the top-level value dhchap on (it gives the controller its Secret namespace and Role and the agents --dhchap)" .sc.name $mode) -}}
{{- end -}}
{{- if ne $mode "off" -}}
{{- range $k, $_ := .sc.extraParameters -}}
{{- if hasPrefix "csi.storage.k8s.io/node-stage-secret-" $k -}}
{{- fail (printf "storageClasses %s: extraParameters %s: with dhchap on the node-stage secret is the volume's DH-HMAC-CHAP Secret (%s)" $.sc.name $k (include "zvolt.dhchapSecretName" $.ctx)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $mode -}}
{{- end -}}
