#!/usr/bin/env bash
# Lints the Helm chart and validates its rendered manifests offline against the
# Kubernetes 1.32 schemas (kubernetes-validate; custom resources only warn).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$HOME/.cache/kubewan/tools/bin:$PATH"

venv="$HOME/.cache/kubewan/validate-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0
fi

helm lint --strict charts/kubewan
helm lint --strict charts/kubewan --set metrics.serviceMonitor.enabled=true

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for variant in default servicemonitor; do
  args=()
  [ "$variant" = servicemonitor ] && args=(--set metrics.serviceMonitor.enabled=true)
  helm template kubewan charts/kubewan --namespace kubewan-system --include-crds "${args[@]}" > "$out/$variant.yaml"
  "$venv/bin/kubernetes-validate" --strict -k 1.32 "$out/$variant.yaml"
done
echo "chart OK: lint --strict and kubernetes-validate --strict -k 1.32"
