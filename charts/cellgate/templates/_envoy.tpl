{{/*
Envoy mode (envoy.enabled): the bootstrap is deploy/envoy/envoy.yaml, copied byte for byte to
files/envoy.yaml (e2e/tests/install.rs checks the copy), with its placeholders replaced here. Every
replacement names the exact text it replaces and how often it must occur: when the shipped file
changes under the chart, the render fails instead of producing a bootstrap nobody reviewed.
*/}}

{{/* Paths shared by the DaemonSet and the rendered files. */}}
{{- define "cellgate.envoy.configDir" -}}/etc/envoy/config{{- end }}
{{- define "cellgate.envoy.certDir" -}}/etc/envoy/certs{{- end }}
{{- define "cellgate.envoy.runDir" -}}/run/cellgate{{- end }}
{{- define "cellgate.envoy.socket" -}}/run/cellgate/ext_authz.sock{{- end }}
{{- define "cellgate.envoy.sdsSecret" -}}cellgate-intercept{{- end }}
{{- define "cellgate.envoy.sdsFile" -}}sds-intercept.yaml{{- end }}
{{/* The node's own intake in Envoy mode: off the taggers' port, loopback only. */}}
{{- define "cellgate.envoy.nodeListen" -}}127.0.0.1:15008{{- end }}

{{/* Fails unless .text contains .old exactly .count times. */}}
{{- define "cellgate.envoy.expect" -}}
{{- $found := sub (len (splitList .old .text)) 1 -}}
{{- if ne (int $found) (int .count) -}}
{{- fail (printf "cellgate: files/envoy.yaml contains %q %d times, expected %d. The chart's Envoy mode renders that file by replacing exact text (templates/_envoy.tpl): update the template together with deploy/envoy/envoy.yaml." .old (int $found) (int .count)) -}}
{{- end -}}
{{- end }}

{{/* .text with .old (which must occur exactly .count times) replaced by .new. */}}
{{- define "cellgate.envoy.replace" -}}
{{- include "cellgate.envoy.expect" . -}}
{{- replace .old .new .text -}}
{{- end }}

{{/* The bootstrap: files/envoy.yaml with the values of envoy.* filled in. */}}
{{- define "cellgate.envoy.bootstrap" -}}
{{- $e := .Values.envoy -}}
{{- $t := .Files.Get "files/envoy.yaml" -}}
{{- if not $t -}}
{{- fail "cellgate: files/envoy.yaml is missing from the chart: copy deploy/envoy/envoy.yaml there." -}}
{{- end -}}
{{- /* Pod CIDRs. The shipped file names its one range once, as the YAML anchor &pod_cidr, and
uses it twice: the plain chain's direct_source_prefix_ranges and the RBAC principal. Each further
range gets its own anchor (pod_cidr_2, ...) next to the first, and every use lists them all. */ -}}
{{- include "cellgate.envoy.expect" (dict "text" $t "old" "&pod_cidr" "count" 2) -}}
{{- include "cellgate.envoy.expect" (dict "text" $t "old" "*pod_cidr" "count" 3) -}}
{{- $anchors := list -}}
{{- $refs := list -}}
{{- $principals := list -}}
{{- $ipv6 := false -}}
{{- range $i, $cidr := $e.podCIDRs -}}
{{- $name := "pod_cidr" -}}
{{- if gt $i 0 -}}{{- $name = printf "pod_cidr_%d" (add1 $i) -}}{{- end -}}
{{- $parts := splitList "/" (toString $cidr) -}}
{{- $anchors = append $anchors (printf "- &%s { address_prefix: %s, prefix_len: %s }   # envoy.podCIDRs[%d]" $name (index $parts 0 | quote) (index $parts 1) $i) -}}
{{- $refs = append $refs (printf "*%s" $name) -}}
{{- $principals = append $principals (printf "{ direct_remote_ip: *%s }" $name) -}}
{{- if contains ":" (toString $cidr) -}}{{- $ipv6 = true -}}{{- end -}}
{{- end -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "\n              - &pod_cidr { address_prefix: 10.244.0.0, prefix_len: 16 }   # PLACEHOLDER pod CIDR"
    "new" (printf "\n              %s" (join "\n              " $anchors))) -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "\n            direct_source_prefix_ranges: [*pod_cidr]"
    "new" (printf "\n            direct_source_prefix_ranges: [%s]" (join ", " $refs))) -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "principals: [{ direct_remote_ip: *pod_cidr }]"
    "new" (printf "principals: [%s]" (join ", " $principals))) -}}
{{- /* An IPv6 pod range: listen on [::]:15001 as well (IPv6 only there; 0.0.0.0 keeps IPv4). */ -}}
{{- $listen := "\n      address:\n        socket_address: { address: 0.0.0.0, port_value: 15001 }\n" -}}
{{- if $ipv6 -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1 "old" $listen
    "new" (printf "%s      additional_addresses:\n        - address:\n            socket_address: { address: \"::\", port_value: 15001 }\n" $listen)) -}}
{{- else -}}
{{- include "cellgate.envoy.expect" (dict "text" $t "old" $listen "count" 1) -}}
{{- end -}}
{{- /* The intercepted hosts: one filter chain, one certificate (SDS secret) for all of them. */ -}}
{{- /* The example host is named three times (server name, SDS secret, SDS path): all replaced. */ -}}
{{- include "cellgate.envoy.expect" (dict "text" $t "old" "api.openai.com" "count" 3) -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "server_names: [\"api.openai.com\"]"
    "new" (printf "server_names: %s" (toJson $e.intercept.hosts))) -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "                  - name: api.openai.com\n"
    "new" (printf "                  - name: %s\n" (include "cellgate.envoy.sdsSecret" .))) -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "path_config_source: { path: /etc/envoy/sds/api.openai.com.yaml }"
    "new" (printf "path_config_source: { path: %s/%s }" (include "cellgate.envoy.configDir" .) (include "cellgate.envoy.sdsFile" .))) -}}
{{- /* The admin API's port; the node's socket stays where the DaemonSet puts it. */ -}}
{{- $t = include "cellgate.envoy.replace" (dict "text" $t "count" 1
    "old" "socket_address: { address: 127.0.0.1, port_value: 9901 }"
    "new" (printf "socket_address: { address: 127.0.0.1, port_value: %d }" (int $e.adminPort))) -}}
{{- include "cellgate.envoy.expect" (dict "text" $t "count" 1
    "old" (printf "pipe: { path: %s }" (include "cellgate.envoy.socket" .))) -}}
# Rendered by the Cellgate Helm chart (templates/_envoy.tpl) from deploy/envoy/envoy.yaml, with:
#   pod CIDRs (anchors pod_cidr, pod_cidr_2, ...) = envoy.podCIDRs {{ toJson $e.podCIDRs }}
#   server_names of the intercepting chain        = envoy.intercept.hosts
#   its certificate                               = SDS secret {{ include "cellgate.envoy.sdsSecret" . }} ({{ include "cellgate.envoy.configDir" . }}/{{ include "cellgate.envoy.sdsFile" . }}),
#                                                   the Secret {{ $e.intercept.secret }} mounted at {{ include "cellgate.envoy.certDir" . }}
#   admin port                                    = envoy.adminPort
{{- if $ipv6 }}
#   listener also on [::]:15001 (an IPv6 pod CIDR)
{{- end }}
# Comments below that call a value a PLACEHOLDER describe the shipped file, not this one.
{{ $t }}
{{- end }}

{{/* The SDS file of the intercepting chain's certificate. */}}
{{- define "cellgate.envoy.sds" -}}
{{- $dir := include "cellgate.envoy.certDir" . -}}
# SDS secret (path_config_source) of the intercepting filter chain: the leaf of the Secret
# {{ .Values.envoy.intercept.secret }} (kubernetes.io/tls), mounted at {{ $dir }}, for the hosts
# {{ toJson .Values.envoy.intercept.hosts }}. The kubelet updates a mounted Secret by switching the
# directory's ..data link (a rename in that directory); watched_directory makes Envoy re-read
# tls.crt and tls.key together when it does, so new connections get the new leaf without a restart.
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: {{ include "cellgate.envoy.sdsSecret" . }}
    tls_certificate:
      certificate_chain: { filename: {{ $dir }}/tls.crt }
      private_key: { filename: {{ $dir }}/tls.key }
      watched_directory: { path: {{ $dir }} }
{{- end }}
