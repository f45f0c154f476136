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

{{/* Flags of the NVMe/TCP guard: call with (dict "ctx" $ "ports" PORTS). The agent is given its
clear-text port here and its TLS port apart (it guards both); the node plugin guards every port a
storage node serves, so it is given both ("4420,4421"). */}}
{{- define "zvolt.guardArgs" -}}
- --storage-network={{ include "zvolt.storageNetwork" .ctx }}
- --nvme-port={{ .ports }}
{{- if not .ctx.Values.storageNetwork.guard }}
- --no-guard
{{- end }}
{{- end -}}

{{/* The agents' NVMe/TCP port for TLS volumes. It is a second listener on the same address as
agent.nvmePort, which the kernel cannot open twice, so an equal value fails the render here. */}}
{{- define "zvolt.nvmeTlsPort" -}}
{{- $a := .Values.agent -}}
{{- if eq (int $a.nvmeTlsPort) (int $a.nvmePort) -}}
{{- fail (printf "agent.nvmeTlsPort %d is agent.nvmePort too: volumes of a class with tls=psk need a port of their own on the storage nodes; give another one, e.g. --set agent.nvmeTlsPort=%d" (int $a.nvmeTlsPort) (add1 (int $a.nvmePort))) -}}
{{- end -}}
{{- int $a.nvmeTlsPort -}}
{{- end -}}

{{/* Every NVMe/TCP port of a storage node, clear-text then TLS: the node plugin's --nvme-port. */}}
{{- define "zvolt.nvmePorts" -}}
{{- printf "%d,%s" (int .Values.agent.nvmePort) (include "zvolt.nvmeTlsPort" .) -}}
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

{{/*
A class's NVMe/TCP TLS mode: call with (dict "ctx" $ "sc" <class>); "psk" or "off". Absent, "off"
and false (YAML's reading of an unquoted off) are off. A TLS class's PSK lives in the volume's
Secret zvolt-dhchap-<PV name>, which kubelet hands to the node plugin as the node-stage secret, so
the class cannot name a node-stage secret of its own. The schema refuses other values first;
these refusals hold when it is skipped.
*/}}
{{- define "zvolt.tlsClassMode" -}}
{{- $m := "off" -}}
{{- if hasKey .sc "tls" -}}
{{- $m = toString .sc.tls -}}
{{- end -}}
{{- if has $m (list "false" "off" "" "<nil>") -}}
{{- $m = "off" -}}
{{- else if ne $m "psk" -}}
{{- fail (printf "storageClasses %s: tls=%s is neither psk nor off; psk (NVMe/TCP TLS 1.3 with a per-volume pre-shared key, tlshd running on every storage node and worker) or off (YAML reads an unquoted on as true: write psk)" .sc.name $m) -}}
{{- end -}}
{{- if eq $m "psk" -}}
{{- range $k, $_ := .sc.extraParameters -}}
{{- if hasPrefix "csi.storage.k8s.io/node-stage-secret-" $k -}}
{{- fail (printf "storageClasses %s: extraParameters %s: with tls=psk the node-stage secret is the volume's Secret holding its TLS PSK (%s); remove it from extraParameters" $.sc.name $k (include "zvolt.dhchapSecretName" $.ctx)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $m -}}
{{- end -}}

{{/* "true" when the controller keeps per-volume keys in Secrets of the release namespace (so it
needs --dhchap-secret-namespace and the Role): DH-HMAC-CHAP is on, or a class uses TLS. */}}
{{- define "zvolt.volumeKeysOn" -}}
{{- $on := include "zvolt.dhchapOn" . -}}
{{- range .Values.storageClasses -}}
{{- if eq (include "zvolt.tlsClassMode" (dict "ctx" $ "sc" .)) "psk" -}}
{{- $on = "true" -}}
{{- end -}}
{{- end -}}
{{- $on -}}
{{- end -}}
