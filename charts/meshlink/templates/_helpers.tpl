{{/* The labels the kustomize base puts on every object. */}}
{{- define "meshlink.labels" -}}
app.kubernetes.io/part-of: meshlink
{{- end }}

{{/* site.yaml: what an overlay's site.yaml says, from the values. Empty when nothing is set. */}}
{{- define "meshlink.siteConfig" -}}
{{- $site := dict -}}
{{- with .Values.site }}{{ $_ := set $site "site" . }}{{ end -}}
{{- $gateway := dict "replicas" (max 1 (int .Values.replicas)) -}}
{{- with .Values.gateway.advertise }}{{ $_ := set $gateway "advertise" . }}{{ end -}}
{{- $_ := set $site "gateway" $gateway -}}
{{- with .Values.grant.advertise }}{{ $_ := set $site "grant" (dict "advertise" .) }}{{ end -}}
{{- with .Values.importPorts }}{{ $_ := set $site "kubernetes" (dict "importPorts" .) }}{{ end -}}
{{- $site = mustMergeOverwrite $site (deepCopy .Values.config) -}}
{{- if $site }}{{ toYaml $site }}{{ end -}}
{{- end }}
