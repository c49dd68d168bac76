{{/*
meterd sidecar templates. To add meterd to your own chart, copy this file into its
templates/ folder, copy the `meterd:` block of values.yaml, and in your pod spec:

  securityContext:
    fsGroup: 10001              # the socket's group: the app must share it
  initContainers:
    {{- include "meterd.sidecar" . | nindent 4 }}
  containers:
    - name: app
      env:
        {{- include "meterd.appEnv" . | nindent 8 }}
      volumeMounts:
        {{- include "meterd.appVolumeMounts" . | nindent 8 }}
  volumes:
    {{- include "meterd.volumes" . | nindent 4 }}

and render the ConfigMap with {{ include "meterd.configMap" . }}. Names derive from
"meterd.resourcePrefix" (the release name plus -meterd).

Rendering is deterministic (no lookup, no random values, no hooks): the chart passes the
Amazon EKS add-on rules, which scripts/check-deploy.sh enforces.
*/}}

{{- define "meterd.resourcePrefix" -}}
{{- printf "%s-meterd" .Release.Name | trunc 56 | trimSuffix "-" -}}
{{- end -}}

{{/* The product code: from the chart's annotation, or a value on the chart's allow-list. */}}
{{- define "meterd.productCode" -}}
{{- $ann := .Chart.Annotations | default dict -}}
{{- $default := index $ann "meterd.io/product-code" | default "" -}}
{{- $allowed := splitList "," (index $ann "meterd.io/allowed-product-codes" | default $default) -}}
{{- $code := .Values.meterd.productCode | default $default -}}
{{- if not $code -}}
{{- fail "meterd: no product code; set the chart annotation meterd.io/product-code" -}}
{{- end -}}
{{- $ok := false -}}
{{- range $allowed -}}{{- if eq (trim .) $code -}}{{- $ok = true -}}{{- end -}}{{- end -}}
{{- if not $ok -}}
{{- fail (printf "meterd.productCode %q is not in this chart's meterd.io/allowed-product-codes annotation" $code) -}}
{{- end -}}
{{- $code -}}
{{- end -}}

{{/* Where the application reaches meterd: the socket's directory is an emptyDir shared by
     both containers. */}}
{{- define "meterd.runDir" -}}/var/run/meterd{{- end -}}
{{- define "meterd.socketPath" -}}{{ include "meterd.runDir" . }}/meterd.sock{{- end -}}
{{- define "meterd.tokenDir" -}}/var/run/secrets/meterd{{- end -}}

{{/* The metrics port on the pod's IP, when a PodMonitor scrapes it (monitoring.podMonitor);
     empty otherwise. It serves only GET /metrics, /healthz and /readyz. */}}
{{- define "meterd.metricsPort" -}}
{{- $pm := (.Values.monitoring | default dict).podMonitor | default dict -}}
{{- if $pm.enabled }}{{ int ($pm.port | default 9377) }}{{ end -}}
{{- end -}}

{{- define "meterd.validate" -}}
{{- $m := .Values.meterd -}}
{{- if and (eq $m.transport "tcp") (not $m.auth.existingSecret) -}}
{{- fail "meterd.transport tcp needs meterd.auth.existingSecret: a Secret you create with the bearer token (key: token)" -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $m.gracePeriodSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed meterd.gracePeriodSeconds (%v)" .Values.terminationGracePeriodSeconds $m.gracePeriodSeconds) -}}
{{- end -}}
{{- end -}}

{{/* The agent's configuration file (TOML). Unknown keys are errors in meterd. */}}
{{- define "meterd.config" -}}
{{- $m := .Values.meterd -}}
product_code = {{ include "meterd.productCode" . | quote }}
pricing = {{ $m.pricing | quote }}
platform = {{ $m.platform | quote }}
{{- if not (has $m.pricing (list "hourly" "contract")) }}

[metering]
dimensions = [{{ range $i, $d := $m.dimensions }}{{ if $i }}, {{ end }}{{ $d | quote }}{{ end }}]
tag_keys = [{{ range $i, $k := $m.tagKeys }}{{ if $i }}, {{ end }}{{ $k | quote }}{{ end }}]
report_zero = {{ $m.reportZero }}
max_allocations = {{ int $m.maxAllocations }}
{{- end }}

[registration]
public_key_version = {{ int $m.registration.publicKeyVersion }}
public_key_files = []

[server]
{{- if eq $m.transport "tcp" }}
listen = "127.0.0.1:{{ int $m.port }}"
unix_socket = ""
{{- else }}
listen = ""
unix_socket = {{ include "meterd.socketPath" . | quote }}
{{- end }}
auth_token_file = {{ ternary (printf "%s/token" (include "meterd.tokenDir" .)) "" (not (empty $m.auth.existingSecret)) | quote }}
grace_period = "{{ int $m.gracePeriodSeconds }}s"
{{- with include "meterd.metricsPort" . }}
metrics_listen = "0.0.0.0:{{ . }}"
{{- end }}

[state]
dir = "/var/lib/meterd"

[aws]
region = {{ $m.region | quote }}
endpoint_url = ""
{{- with $m.sending }}

[sending]
spread = "{{ int .spreadSeconds }}s"
max_calls_per_second = {{ int .maxCallsPerSecond }}
{{- end }}
{{- if has $m.pricing (list "contract" "contract+custom") }}
{{- with $m.contract }}

[contract]
product_sku = {{ .productSku | quote }}
key_fingerprint = {{ .keyFingerprint | quote }}
checkout_type = {{ .checkoutType | quote }}
{{- if .licenseTokenSecret }}
license_token_file = "/var/run/secrets/meterd-license/license_token"
role_arn = {{ .roleArn | quote }}
{{- end }}
{{- range .entitlements }}

[[contract.entitlements]]
name = {{ .name | quote }}
unit = {{ .unit | default "Count" | quote }}
{{- if hasKey . "count" }}
count = {{ int .count }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "meterd.configMap" -}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "meterd.resourcePrefix" . }}-config
  labels:
    app.kubernetes.io/component: meterd
    app.kubernetes.io/instance: {{ .Release.Name }}
data:
  meterd.toml: |
    {{- include "meterd.config" . | nindent 4 }}
{{- end -}}

{{/* Kept for charts that include it: the token Secret is now yours (meterd.auth.existingSecret),
     so this renders nothing. */}}
{{- define "meterd.tokenSecret" -}}
{{- end -}}

{{/* The native sidecar: an init container that keeps running (restartPolicy: Always).
     Kubernetes starts the app containers only once its startupProbe passes, which meterd
     reports after RegisterUsage succeeded. meterd listens only inside the pod (the Unix
     socket, or TCP on 127.0.0.1), so the probes are exec probes: `meterd health` asks
     /readyz, `meterd status` shows that the agent answers. */}}
{{- define "meterd.sidecar" -}}
{{- include "meterd.validate" . -}}
{{- $m := .Values.meterd -}}
- name: meterd
  image: "{{ $m.image.repository }}:{{ $m.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ $m.image.pullPolicy }}
  restartPolicy: Always
  args: ["run"]
  {{- with include "meterd.metricsPort" . }}
  ports:
    - name: metrics
      containerPort: {{ . }}
      protocol: TCP
  {{- end }}
  env:
    - name: METERD_CONFIG
      value: /etc/meterd/meterd.toml
    - name: METERD_LOG_FORMAT
      value: {{ $m.logFormat | quote }}
    {{- with $m.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    exec:
      command: ["meterd", "health"]
    periodSeconds: {{ int $m.startupProbe.periodSeconds }}
    failureThreshold: {{ int $m.startupProbe.failureThreshold }}
    timeoutSeconds: 5
  livenessProbe:
    exec:
      command: ["meterd", "status"]
    periodSeconds: {{ int $m.livenessProbe.periodSeconds }}
    failureThreshold: {{ int $m.livenessProbe.failureThreshold }}
    timeoutSeconds: 10
  readinessProbe:
    exec:
      command: ["meterd", "health"]
    periodSeconds: {{ int $m.readinessProbe.periodSeconds }}
    failureThreshold: {{ int $m.readinessProbe.failureThreshold }}
    timeoutSeconds: 5
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    {{- toYaml $m.resources | nindent 4 }}
  volumeMounts:
    - name: meterd-config
      mountPath: /etc/meterd
      readOnly: true
    - name: meterd-state
      mountPath: /var/lib/meterd
    - name: meterd-tmp
      mountPath: /tmp
    - name: meterd-run
      mountPath: {{ include "meterd.runDir" . }}
    {{- if $m.auth.existingSecret }}
    - name: meterd-token
      mountPath: {{ include "meterd.tokenDir" . }}
      readOnly: true
    {{- end }}
    {{- if ($m.contract | default dict).licenseTokenSecret }}
    - name: meterd-license
      mountPath: /var/run/secrets/meterd-license
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Environment for the application: where meterd listens (METERD_SOCKET, or METERD_URL
     with transport tcp), and the bearer token when there is one. */}}
{{- define "meterd.appEnv" -}}
{{- $m := .Values.meterd -}}
{{- if eq $m.transport "tcp" -}}
- name: METERD_URL
  value: "http://127.0.0.1:{{ int $m.port }}"
{{- else -}}
- name: METERD_SOCKET
  value: {{ include "meterd.socketPath" . | quote }}
{{- end }}
{{- if $m.auth.existingSecret }}
- name: METERD_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $m.auth.existingSecret }}
      key: token
{{- end }}
{{- end -}}

{{/* The application's mount of meterd's socket directory. The socket is mode 0660 with the
     pod's fsGroup as its group, which Kubernetes gives every container of the pod. */}}
{{- define "meterd.appVolumeMounts" -}}
- name: meterd-run
  mountPath: {{ include "meterd.runDir" . }}
{{- end -}}

{{- define "meterd.volumes" -}}
{{- $m := .Values.meterd -}}
- name: meterd-config
  configMap:
    name: {{ include "meterd.resourcePrefix" . }}-config
- name: meterd-state
  {{- if $m.state.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ $m.state.persistence.existingClaim | default (printf "%s-state" (include "meterd.resourcePrefix" .)) }}
  {{- else }}
  emptyDir:
    {{- with $m.state.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
- name: meterd-tmp
  emptyDir:
    sizeLimit: 16Mi
- name: meterd-run
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- if $m.auth.existingSecret }}
- name: meterd-token
  secret:
    secretName: {{ $m.auth.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- with ($m.contract | default dict).licenseTokenSecret }}
- name: meterd-license
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}
