{{/*
meterd sidecar templates. To add meterd to your own chart, copy this file into its
templates/ folder, copy the `meterd:` block of values.yaml, and in your pod spec:

  initContainers:
    {{- include "meterd.sidecar" . | nindent 4 }}
  containers:
    - name: app
      env:
        {{- include "meterd.appEnv" . | nindent 8 }}
  volumes:
    {{- include "meterd.volumes" . | nindent 4 }}

and render the ConfigMap with {{ include "meterd.configMap" . }} (and the Secret with
{{ include "meterd.tokenSecret" . }} when meterd.auth.enabled). Names derive from
"meterd.resourcePrefix" (the release name plus -meterd).
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

{{- define "meterd.tokenSecretName" -}}
{{- .Values.meterd.auth.existingSecret | default (printf "%s-token" (include "meterd.resourcePrefix" .)) -}}
{{- end -}}

{{- define "meterd.validate" -}}
{{- $m := .Values.meterd -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $m.gracePeriodSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed meterd.gracePeriodSeconds (%v)" .Values.terminationGracePeriodSeconds $m.gracePeriodSeconds) -}}
{{- end -}}
{{- end -}}

{{/* The agent's configuration file (TOML). Unknown keys are errors in meterd. */}}
{{- define "meterd.config" -}}
{{- $m := .Values.meterd -}}
product_code = {{ include "meterd.productCode" . | quote }}
platform = {{ $m.platform | quote }}

[metering]
dimensions = [{{ range $i, $d := $m.dimensions }}{{ if $i }}, {{ end }}{{ $d | quote }}{{ end }}]
tag_keys = [{{ range $i, $k := $m.tagKeys }}{{ if $i }}, {{ end }}{{ $k | quote }}{{ end }}]
report_zero = {{ $m.reportZero }}
max_allocations = {{ int $m.maxAllocations }}

[registration]
enabled = {{ $m.registration.enabled }}
public_key_version = {{ int $m.registration.publicKeyVersion }}
public_key_files = []

[server]
listen = "0.0.0.0:{{ int $m.port }}"
unix_socket = ""
auth_token_file = {{ ternary "/var/run/meterd/token" "" $m.auth.enabled | quote }}
grace_period = "{{ int $m.gracePeriodSeconds }}s"

[state]
dir = "/var/lib/meterd"

[aws]
region = {{ $m.region | quote }}
endpoint_url = ""
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

{{- define "meterd.tokenSecret" -}}
{{- if and .Values.meterd.auth.enabled (not .Values.meterd.auth.existingSecret) -}}
{{- $name := include "meterd.tokenSecretName" . -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
apiVersion: v1
kind: Secret
metadata:
  name: {{ $name }}
  labels:
    app.kubernetes.io/component: meterd
    app.kubernetes.io/instance: {{ .Release.Name }}
type: Opaque
data:
  {{- if and $existing $existing.data }}
  token: {{ index $existing.data "token" }}
  {{- else }}
  token: {{ randAlphaNum 48 | b64enc }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* The native sidecar: an init container that keeps running (restartPolicy: Always).
     Kubernetes starts the app containers only once its startupProbe (/readyz) passes,
     which meterd reports after RegisterUsage succeeded. Probes send Host: localhost
     because meterd answers only loopback Host names (DNS-rebinding guard). */}}
{{- define "meterd.sidecar" -}}
{{- include "meterd.validate" . -}}
{{- $m := .Values.meterd -}}
- name: meterd
  image: "{{ $m.image.repository }}:{{ $m.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ $m.image.pullPolicy }}
  restartPolicy: Always
  args: ["run"]
  env:
    - name: METERD_CONFIG
      value: /etc/meterd/meterd.toml
    - name: METERD_LOG_FORMAT
      value: {{ $m.logFormat | quote }}
    {{- with $m.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: meterd
      containerPort: {{ int $m.port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: meterd
      httpHeaders:
        - name: Host
          value: localhost
    periodSeconds: {{ int $m.startupProbe.periodSeconds }}
    failureThreshold: {{ int $m.startupProbe.failureThreshold }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: meterd
      httpHeaders:
        - name: Host
          value: localhost
    periodSeconds: {{ int $m.livenessProbe.periodSeconds }}
    failureThreshold: {{ int $m.livenessProbe.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: meterd
      httpHeaders:
        - name: Host
          value: localhost
    periodSeconds: {{ int $m.readinessProbe.periodSeconds }}
    failureThreshold: {{ int $m.readinessProbe.failureThreshold }}
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
    {{- if $m.auth.enabled }}
    - name: meterd-token
      mountPath: /var/run/meterd
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Environment for the application: where meterd listens, and its token. */}}
{{- define "meterd.appEnv" -}}
- name: METERD_URL
  value: "http://127.0.0.1:{{ int .Values.meterd.port }}"
{{- if .Values.meterd.auth.enabled }}
- name: METERD_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "meterd.tokenSecretName" . }}
      key: token
{{- end }}
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
{{- if $m.auth.enabled }}
- name: meterd-token
  secret:
    secretName: {{ include "meterd.tokenSecretName" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}
