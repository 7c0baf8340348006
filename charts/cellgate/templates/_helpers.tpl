{{/*
Names and labels. Object names are fixed (cellgate-operator, cellgate-node, ...): they are part of
the contract in docs/kubernetes.md, and Cellgate installs once per cluster (the CRD, ClusterRoles
and the node DaemonSet's host ports are cluster-wide).
*/}}

{{- define "cellgate.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cellgate.operatorName" -}}cellgate-operator{{- end }}
{{- define "cellgate.nodeName" -}}cellgate-node{{- end }}

{{/* Labels on every object. */}}
{{- define "cellgate.labels" -}}
helm.sh/chart: {{ include "cellgate.chart" . }}
app.kubernetes.io/name: cellgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cellgate
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "cellgate.selectorLabels" -}}
app.kubernetes.io/name: cellgate
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "ctx" $ "component" "node"). */}}
{{- define "cellgate.componentLabels" -}}
{{ include "cellgate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "component" "node") -> ghcr.io/cellgate/cellgate-node:0.1.0 */}}
{{- define "cellgate.image" -}}
{{- $tag := .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{ printf "%s/cellgate-%s:%s" (trimSuffix "/" .ctx.Values.image.registry) .component $tag }}
{{- end }}

{{/* imagePullSecrets of a pod spec, or nothing. */}}
{{- define "cellgate.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks on the values that fail the render early with a message saying what to set.
values.schema.json checks types and shapes first; these repeat the essential ones (so an install
that skips schema validation still fails clearly) and add what a schema cannot express.
*/}}
{{- define "cellgate.validate" -}}
{{- $v := .Values -}}
{{- if not $v.nodeCIDRs -}}
{{- fail "cellgate: nodeCIDRs is empty. Set the address ranges of the cluster's nodes, e.g. --set 'nodeCIDRs={10.0.0.0/16}': each cell's NetworkPolicy lets its pod reach only the node proxy on these addresses, and the operator refuses to start without them." -}}
{{- end -}}
{{- range $v.nodeCIDRs -}}
{{- if or (eq (toString .) "0.0.0.0/0") (eq (toString .) "::/0") -}}
{{- fail (printf "cellgate: nodeCIDRs contains %s. Name the nodes' address ranges: a cell's NetworkPolicy would otherwise allow ports 15001 and 15053 on every address." (toString .)) -}}
{{- end -}}
{{- end -}}
{{- range $key := list "signingKey" "trust" "ca" "caBundle" -}}
{{- if not (index $v.secrets $key) -}}
{{- fail (printf "cellgate: secrets.%s is empty. Name the Secret or ConfigMap the installer created (docs/install.md), e.g. the default %s." $key (index (dict "signingKey" "cellgate-signing-key" "trust" "cellgate-trust" "ca" "cellgate-ca" "caBundle" "cellgate-ca-bundle") $key)) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int $v.operator.replicas) 1) (not $v.operator.api.tlsSecret) -}}
{{- fail (printf "cellgate: operator.replicas is %d but operator.api.tlsSecret is empty. Without a certificate each replica serves its own self-signed one behind the Service cellgate-operator-api, so a client pinning one fingerprint fails on the other replicas: create a kubernetes.io/tls Secret and set operator.api.tlsSecret, or keep operator.replicas at 1." (int $v.operator.replicas)) -}}
{{- end -}}
{{- if and $v.extAuthz.tokenHeader (not $v.extAuthz.enabled) -}}
{{- fail "cellgate: extAuthz.tokenHeader is set but extAuthz.enabled is false. Enable the ext_authz listener (--set extAuthz.enabled=true) or leave tokenHeader empty." -}}
{{- end -}}
{{- range $v.envoy.podCIDRs -}}
{{- if or (eq (toString .) "0.0.0.0/0") (eq (toString .) "::/0") -}}
{{- fail (printf "cellgate: envoy.podCIDRs contains %s. Name the pods' address ranges: Envoy believes the PROXY protocol header (source address and cell token) of every peer in these ranges." (toString .)) -}}
{{- end -}}
{{- end -}}
{{- if $v.alerts.enabled -}}
{{- if not $v.alerts.sinks -}}
{{- fail "cellgate: alerts.enabled needs at least one sink in alerts.sinks, e.g. --set 'alerts.sinks[0].name=ops' --set 'alerts.sinks[0].url=https://alerts.example.com/cellgate'." -}}
{{- end -}}
{{- range $v.alerts.sinks -}}
{{- if and (or (include "cellgate.alertsSigned" .) .urlSecretKey) (not $v.alerts.secret) -}}
{{- fail (printf "cellgate: alerts sink %s needs alerts.secret, the name of a Secret holding its HMAC key under the key %s (json sinks are always signed) or its URL under urlSecretKey. The chart creates no Secret: kubectl create secret generic ... --from-file=%s=..." .name .name .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $v.vault -}}
{{- if .enabled -}}
{{- if not .address -}}
{{- fail "cellgate: vault.enabled needs vault.address, the Vault or OpenBao the nodes read credentials from, e.g. --set vault.address=https://vault.vault.svc:8200." -}}
{{- end -}}
{{- if and (eq .auth "approle") (not .approleSecret) -}}
{{- fail "cellgate: vault.auth approle needs vault.approleSecret, the name of a Secret in the release namespace with keys role-id and secret-id (docs/credentials.md). The chart creates no Secret: kubectl create secret generic cellgate-vault-approle --from-file=role-id=... --from-file=secret-id=..." -}}
{{- end -}}
{{- if and (eq .auth "token") (not .tokenSecret) -}}
{{- fail "cellgate: vault.auth token needs vault.tokenSecret, the name of a Secret in the release namespace with key token, a Vault token. The chart creates no Secret: kubectl create secret generic cellgate-vault-token --from-file=token=..." -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with $v.node.selfCheck -}}
{{- if .enabled -}}
{{- if $v.envoy.enabled -}}
{{- fail "cellgate: node.selfCheck.enabled and envoy.enabled are both set. The self-check's probe is raw TCP to a reserved address, which the nodes' Envoy does not carry (it closes raw TCP): every cell would read Governed=False. Turn one off." -}}
{{- end -}}
{{- if ge (include "cellgate.millis" .timeout | int64) (include "cellgate.millis" .interval | int64) -}}
{{- fail (printf "cellgate: node.selfCheck.timeout (%s) is not shorter than node.selfCheck.interval (%s): a probe must end before the next starts." .timeout .interval) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.envoy.enabled -}}
{{- if $v.extAuthz.enabled -}}
{{- fail "cellgate: envoy.enabled and extAuthz.enabled are both set. envoy.enabled runs Envoy in the node pods and serves ext_authz to it on a Unix socket inside the pod; extAuthz.enabled serves ext_authz on TCP 15011 of every node for an Envoy you run elsewhere. The node has one ext_authz listener: choose one." -}}
{{- end -}}
{{- if not $v.envoy.podCIDRs -}}
{{- fail "cellgate: envoy.enabled needs envoy.podCIDRs, the cluster's pod address ranges, e.g. --set 'envoy.podCIDRs={10.244.0.0/16}': Envoy believes the PROXY protocol header (source address and cell token) only from peers in these ranges and closes every other connection." -}}
{{- end -}}
{{- if not $v.envoy.intercept.hosts -}}
{{- fail "cellgate: envoy.enabled needs envoy.intercept.hosts, the HTTPS hosts Envoy terminates TLS for, e.g. --set 'envoy.intercept.hosts={api.openai.com}': Envoy cannot mint a certificate per host on demand as the node's intake does, and HTTPS to a host not listed is closed." -}}
{{- end -}}
{{- if not $v.envoy.intercept.secret -}}
{{- fail "cellgate: envoy.enabled needs envoy.intercept.secret, the name of a kubernetes.io/tls Secret whose leaf (tls.crt, tls.key) names every host of envoy.intercept.hosts and is signed by the Cellgate CA: see docs/envoy.md, \"Helm\"." -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* A duration of values.schema.json (Nms, Ns, Nm, Nh, Nd) in milliseconds. */}}
{{- define "cellgate.millis" -}}
{{- $d := toString . -}}
{{- if hasSuffix "ms" $d -}}{{ trimSuffix "ms" $d | int64 }}
{{- else if hasSuffix "s" $d -}}{{ mul (trimSuffix "s" $d | int64) 1000 }}
{{- else if hasSuffix "m" $d -}}{{ mul (trimSuffix "m" $d | int64) 60000 }}
{{- else if hasSuffix "h" $d -}}{{ mul (trimSuffix "h" $d | int64) 3600000 }}
{{- else if hasSuffix "d" $d -}}{{ mul (trimSuffix "d" $d | int64) 86400000 }}
{{- else -}}0
{{- end -}}
{{- end }}

{{/* The prober's socket, in a directory only the node pod's two containers mount. */}}
{{- define "cellgate.selfCheck.runDir" -}}/run/cellgate-selfcheck{{- end }}

{{/* Whether a sink of alerts.sinks is signed: json always, slack when signed is set. */}}
{{- define "cellgate.alertsSigned" -}}
{{- if or (eq (.format | default "json") "json") .signed }}true{{ end -}}
{{- end }}

{{/* The nodes' alerts file (alerts-configmap.yaml), from alerts.*. */}}
{{- define "cellgate.alertsFile" -}}
{{- $a := .Values.alerts -}}
sinks:
{{- range $a.sinks }}
  - name: {{ .name }}
    {{- if .urlSecretKey }}
    urlFile: /etc/cellgate/alerts-secret/{{ .urlSecretKey }}
    {{- else }}
    url: {{ .url | quote }}
    {{- end }}
    format: {{ .format | default "json" }}
    {{- if include "cellgate.alertsSigned" . }}
    secretFile: /etc/cellgate/alerts-secret/{{ .name }}
    {{- end }}
    {{- with .events }}
    events: {{ toJson . }}
    {{- end }}
{{- end }}
denialRate:
  perCell: {{ $a.denialRate.perCell }}
  window: {{ $a.denialRate.window }}
queue:
  capacity: {{ $a.queueCapacity }}
retry:
  attempts: {{ $a.retry.attempts }}
  backoffBase: {{ $a.retry.backoffBase }}
  backoffMax: {{ $a.retry.backoffMax }}
  timeout: {{ $a.retry.timeout }}
cooldown: {{ $a.cooldown }}
{{- end }}
