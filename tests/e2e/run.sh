#!/usr/bin/env bash
# kubewan's end-to-end tests on a real control plane, from nothing:
#   1. builds kubewan-runner, kubewan-operator, kubewan-node-agent
#   2. tests/k8s/cluster.sh up (etcd, kube-apiserver, controller-manager,
#      scheduler 1.20.2, Node gpu-node-1 with nvidia.com/gpu, the test kubelet)
#   3. prepares the node's host folders: keyframes from examples/, tiny
#      checkpoints (kubewan-runner tiny-ckpts), an empty output folder
#   4. helm install kubewan charts/kubewan -n kubewan-system --create-namespace
#      --set replicaCount=0 (the CRD, RBAC, ServiceAccount, metrics Service; no
#      in-cluster operator pod: the test kubelet runs local processes, not images)
#   5. runs the operator as a local process under the chart's ServiceAccount
#      identity (tests/e2e/operator.sh: impersonation, so the chart's RBAC is
#      what authorises it)
#   6. cargo test -p kubewan-e2e -- --test-threads=1
#   7. stops the operator and the cluster on exit, whatever happened
#      (KUBEWAN_E2E_KEEP=1 leaves both running to look around).
# The cluster state lives in $KUBEWAN_CLUSTER_DIR (default
# ~/.cache/kubewan/e2e-cluster, apart from a cluster you run by hand).
# Extra arguments go to the test binary, e.g. `tests/e2e/run.sh example`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export PATH="$HOME/.cache/kubewan/tools/bin:$PATH"
export KUBEWAN_CLUSTER_DIR="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/e2e-cluster}"
export KUBEWAN_E2E_STATE="$KUBEWAN_CLUSTER_DIR/e2e"
log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building kubewan-runner, kubewan-operator, kubewan-node-agent and the tests"
cargo build -p kubewan-runner -p kubewan-operator -p kubewan-node-agent
cargo test -p kubewan-e2e --no-run
target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target/debug"
export KUBEWAN_OPERATOR_BIN="$bin/kubewan-operator"
export KUBEWAN_NODE_AGENT="$bin/kubewan-node-agent"
export KUBEWAN_AGENT_BIN_DIR="$bin"

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 && -f $KUBEWAN_E2E_STATE/operator.log ]]; then
    log "operator log (last 60 lines):"
    tail -n 60 "$KUBEWAN_E2E_STATE/operator.log" >&2 || true
  fi
  if [[ ${KUBEWAN_E2E_KEEP:-0} == 1 ]]; then
    log "KUBEWAN_E2E_KEEP=1: leaving the operator and the cluster running (eval \"\$(tests/k8s/cluster.sh env)\")"
  else
    tests/e2e/operator.sh stop >&2 || true
    tests/k8s/cluster.sh down || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "failed (exit $?): $BASH_COMMAND (line $LINENO)"' ERR
mkdir -p "$KUBEWAN_E2E_STATE"
: >"$KUBEWAN_E2E_STATE/operator.log"

log "bringing the test control plane up ($KUBEWAN_CLUSTER_DIR)"
tests/k8s/cluster.sh up
eval "$(tests/k8s/cluster.sh env)"
kubectl get nodes -o wide

log "preparing the node's host folders under $KUBEWAN_HOST_ROOT"
base="$KUBEWAN_HOST_ROOT/var/lib/kubewan"
rm -rf "$base/output" "$base/inputs"
mkdir -p "$base/inputs" "$base/ckpts" "$base/output"
cp -r examples/keyframes "$base/inputs/"
"$bin/kubewan-runner" tiny-ckpts "$base/ckpts"

log "installing the chart (replicaCount=0: the operator runs as a local process)"
helm upgrade --install kubewan charts/kubewan -n kubewan-system --create-namespace \
  --set replicaCount=0 --wait --timeout 2m
kubectl wait --for condition=established --timeout=60s crd/traveljobs.kubewan.dev

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export KUBEWAN_E2E_METRICS_ADDR="127.0.0.1:$port"
tests/e2e/operator.sh start

log "running the end-to-end tests"
cargo test -p kubewan-e2e -- --test-threads=1 --nocapture "$@"
log "end-to-end tests passed"
