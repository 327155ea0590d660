#!/usr/bin/env bash
# kubewan's end-to-end tests on a real control plane and a real node, from nothing:
#   1. builds the images (scripts/build-images.sh: the dev-profile binaries on the
#      local Debian 12 base, named as the chart expects) and the tests
#   2. tests/k8s/cluster.sh up (etcd, kube-apiserver, controller-manager,
#      scheduler, and a kubelet with containerd: Node gpu-node-1 with nvidia.com/gpu)
#      and loads the images into the node
#   3. prepares the node's /var/lib/kubewan: keyframes from examples/, tiny
#      checkpoints (kubewan-runner tiny-ckpts), an output folder the runner's
#      user (65532) may write, as an administrator prepares storage
#   4. helm install kubewan charts/kubewan -n kubewan-system --create-namespace
#      with the chart's default replicaCount and images: the operator runs
#      in-cluster, as a container from its image, under the chart's
#      ServiceAccount (values for the tests: tests/e2e/values.yaml)
#   5. cargo test -p kubewan-e2e -- --test-threads=1
#   6. brings the cluster down on exit, whatever happened
#      (KUBEWAN_E2E_KEEP=1 leaves it running to look around).
# The cluster state lives in $KUBEWAN_CLUSTER_DIR (default
# ~/.cache/kubewan/e2e-cluster, apart from a cluster you run by hand).
# Extra arguments go to the test binaries, e.g. `tests/e2e/run.sh example`.
set -euo pipefail
main() {
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export KUBEWAN_CLUSTER_DIR="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/e2e-cluster}"
E2E_NAME=e2e
log() { e2e_log "$@"; }
e2e_on_failure() {
  [[ -n ${KUBECONFIG:-} ]] || return 0
  log "operator log (last 60 lines):"
  kubectl -n kubewan-system logs deploy/kubewan --tail=60 >&2
}
# shellcheck source=tests/e2e/common.sh
source tests/e2e/common.sh

log "building the images (dev profile, local base) and the tests"
built=$(KUBEWAN_IMAGE_PROFILE=dev KUBEWAN_IMAGE_BASE=local scripts/build-images.sh)
mapfile -t images <<<"$built"
cargo test -p kubewan-e2e --no-run
runner_bin=$(e2e_runner_bin)

trap 'log "failed (exit $?): $BASH_COMMAND (line $LINENO)"' ERR

log "bringing the test control plane up ($KUBEWAN_CLUSTER_DIR)"
tests/k8s/cluster.sh up
eval "$(tests/k8s/cluster.sh env)"
tests/k8s/cluster.sh load-images "${images[@]}"
kubectl get nodes -o wide

log "preparing the node's /var/lib/kubewan (under $KUBEWAN_HOST_ROOT)"
base="$KUBEWAN_HOST_ROOT/var/lib/kubewan"
mkdir -p "$base/inputs" "$base/ckpts" "$base/output"
cp -r examples/keyframes "$base/inputs/"
"$runner_bin" tiny-ckpts "$base/ckpts" >/dev/null
# Readable by the runner's user, the output writable by it (hostPath volumes
# get no fsGroup ownership).
chmod -R a+rX "$base/inputs" "$base/ckpts"
chown 65532:65532 "$base/output"

log "installing the chart (the operator in-cluster, from its image)"
# Images built under another prefix (KUBEWAN_IMAGE_REGISTRY, e.g. to keep
# two checkouts' runs on one machine apart) are the ones installed.
image_values=()
if [[ -n ${KUBEWAN_IMAGE_REGISTRY:-} ]]; then
  image_values=(--set "image.repository=$KUBEWAN_IMAGE_REGISTRY/kubewan-operator"
    --set "runner.image.repository=$KUBEWAN_IMAGE_REGISTRY/kubewan-runner")
fi
helm upgrade --install kubewan charts/kubewan -n kubewan-system --create-namespace \
  -f tests/e2e/values.yaml "${image_values[@]}" --wait --timeout 3m
kubectl wait --for condition=established --timeout=60s crd/traveljobs.kubewan.dev
tests/e2e/operator.sh status

log "running the end-to-end tests"
cargo test -p kubewan-e2e -- --test-threads=1 --nocapture "$@"
log "end-to-end tests passed"
}

# Parsed whole before it runs, so that editing this file cannot disturb a run.
main "$@"; exit $?
