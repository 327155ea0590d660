#!/usr/bin/env bash
# Follows README.md's "Installing on a cluster" command by command on a fresh
# test cluster: it runs exactly the README's ```sh walkthrough blocks, in
# order, in one bash (set -euo pipefail), then checks what they should have
# achieved. Before them it plays the cluster's storage administrator, the part
# the README leaves to the reader's storage:
#   - two hostPath PersistentVolumes for the README's claims (kubewan-ckpts:
#     the node's /var/lib/kubewan/ckpts, kubewan-data: /var/lib/kubewan/data)
#   - the checkpoints volume filled with the tiny checkpoints
#     (kubewan-runner tiny-ckpts) under the names the chart and the examples use
#   - the keyframes copied to the data volume, which uid 65532 may write
# The images are built as the README says, with the tests' profile and base
# (KUBEWAN_IMAGE_PROFILE=dev, KUBEWAN_IMAGE_BASE=local).
# Cluster state: $KUBEWAN_CLUSTER_DIR (default ~/.cache/kubewan/readme-cluster);
# the walkthrough's output: $KUBEWAN_CLUSTER_DIR/walkthrough.log.
# KUBEWAN_E2E_KEEP=1 leaves the cluster running.
set -euo pipefail
main() {
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export KUBEWAN_CLUSTER_DIR="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/readme-cluster}"
export KUBEWAN_IMAGE_PROFILE=dev KUBEWAN_IMAGE_BASE=local
E2E_NAME=readme
log() { e2e_log "$@"; }
die() { log "FAILED: $*"; exit 1; }
# shellcheck source=tests/e2e/common.sh
source tests/e2e/common.sh

# The README's walkthrough blocks, in order.
walkthrough="$KUBEWAN_CLUSTER_DIR/walkthrough.sh"
mkdir -p "$KUBEWAN_CLUSTER_DIR"
awk '/^```sh walkthrough$/ {on = 1; next} /^```/ {on = 0} on' README.md >"$walkthrough"
[[ $(grep -c . "$walkthrough") -ge 10 ]] || die "README.md has too few \`\`\`sh walkthrough lines: $(cat "$walkthrough")"

log "bringing a test cluster up ($KUBEWAN_CLUSTER_DIR)"
tests/k8s/cluster.sh up
eval "$(tests/k8s/cluster.sh env)"

log "the storage administrator: hostPath volumes for the README's claims, tiny checkpoints, keyframes"
node_dir="$KUBEWAN_HOST_ROOT/var/lib/kubewan"
mkdir -p "$node_dir/ckpts" "$node_dir/data"
tiny=$(mktemp -d)
"$(e2e_runner_bin)" tiny-ckpts "$tiny" >/dev/null
mv "$tiny/tiny/qwen2.5-vl" "$node_dir/ckpts/Qwen2.5-VL-7B-Instruct"
mv "$tiny/tiny/wan2.1-flf2v" "$node_dir/ckpts/Wan2.1-FLF2V-14B-720P-diffusers"
rm -rf "$tiny"
cp -r examples/keyframes "$node_dir/data/"
chmod -R a+rX "$node_dir/ckpts" "$node_dir/data"
chown -R 65532:65532 "$node_dir/data"
# A hostPath PersistentVolume bound to the README's claim NAME (namespace kubewan).
pv() { # name capacity access-mode node-path
  kubectl apply -f - <<EOF
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1}
spec:
  capacity: {storage: $2}
  accessModes: [$3]
  hostPath: {path: $4, type: Directory}
  claimRef: {namespace: kubewan, name: $1}
EOF
}
pv kubewan-ckpts 200Gi ReadOnlyMany /var/lib/kubewan/ckpts
pv kubewan-data 50Gi ReadWriteMany /var/lib/kubewan/data

log "running README.md's walkthrough ($(grep -c . "$walkthrough") lines; output in $KUBEWAN_CLUSTER_DIR/walkthrough.log)"
if ! bash -euxo pipefail "$walkthrough" 2>&1 | tee "$KUBEWAN_CLUSTER_DIR/walkthrough.log"; then
  die "a README command failed (see above)"
fi

log "checking what the walkthrough achieved"
[[ "$(kubectl -n kubewan get tj preview -o jsonpath='{.status.phase}')" == Succeeded ]] || die "the preview job did not succeed"
video="$node_dir/data/$(kubectl -n kubewan get tj preview -o jsonpath='{.status.output}')"
[[ $video == */videos/kubewan/preview/travel.mp4 && -s $video ]] || die "no preview video at $video"
[[ "$(stat -c %u "$video")" == 65532 ]] || die "$video was not written by the runner's user"
# The real job is accepted and its first pod created; on a machine like this
# one (2 CPUs, ~24 GiB) the pod, which asks for 8 CPUs and 48 GiB, cannot be
# scheduled, and the job's status says so in the scheduler's words (on a big
# enough machine it would run, on tiny weights, for hours on the CPU: it is not
# run to the end).
deadline=$((SECONDS + 300))
until kubectl -n kubewan get pod travel-prompts-1 >/dev/null 2>&1 &&
  { [[ "$(kubectl -n kubewan get tj travel -o jsonpath='{.status.message}')" == *Unschedulable* ]] ||
    [[ "$(kubectl -n kubewan get pod travel-prompts-1 -o jsonpath='{.spec.nodeName}')" == "$KUBEWAN_NODE_NAME" ]]; }; do
  ((SECONDS < deadline)) || die "the real job's first pod was neither scheduled nor explained: $(kubectl -n kubewan get tj travel -o jsonpath='{.status}')"
  sleep 2
done
kubectl -n kubewan get pods -l kubewan.dev/job=travel -o wide
kubectl -n kubewan get tj travel -o jsonpath='{.status.message}{"\n"}'
log "README walkthrough passed"
}

# Parsed whole before it runs, so that editing this file cannot disturb a run.
main "$@"; exit $?
