#!/usr/bin/env bash
# Load benchmark of the operator (issue 14, item 6): N TravelJobs of the
# cheapest valid shape (2 keyframes, the built-in preview model, no VLM, CPU
# runner: one segment pod and one stitch pod each) created at once on the test
# control plane, with the operator in-cluster from its image (the chart, as
# tests/e2e/run.sh installs it). A script, not a test: it takes minutes.
#
#   scripts/load-bench.sh [N]          N defaults to 20
#
# It reports:
#   - the time from the first create to every job finished, and how many
#     succeeded, failed or were lost (not finished within KUBEWAN_LOAD_TIMEOUT)
#   - duplicates: pod names created twice, steps with more than one pod, and
#     pod creations answered 409 (a stale cache), from the API server's audit log
#   - the operator's requests by verb and resource (its ServiceAccount's
#     entries in the audit log: KUBEWAN_AUDIT_POLICY of tests/k8s/cluster.sh),
#     and its writes per pod lifecycle = (pod creates + TravelJob status writes
#     + event writes in the benchmark's namespace) / pods created
#   - the operator's events by reason, and those written more than once (series count > 1)
#   - the operator's reconciles (its /metrics), peak RSS (VmHWM) and CPU seconds
#     spent during the run (/proc/<pid>/stat of its container's process)
#
# Environment: KUBEWAN_CLUSTER_DIR (default ~/.cache/kubewan/load-cluster),
# KUBEWAN_LOAD_TIMEOUT (seconds to wait for all jobs, default 1800),
# KUBEWAN_IMAGE_PROFILE (cargo profile of the images, default dev),
# KUBEWAN_E2E_KEEP=1 (leave the cluster running afterwards). The jobs, requests
# and events it counted stay in $KUBEWAN_CLUSTER_DIR/load-bench/ until the next `up`.
# Needs what tests/e2e/run.sh needs (root, buildah/podman) and jq.
# The test node's kubelet runs at most 110 pods (its default maxPods): that,
# not the operator, bounds how many runner pods run at once.
set -euo pipefail
main() {
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
n="${1:-20}"
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "load-bench.sh: N must be a positive integer, not '$n'" >&2; exit 2; }
command -v jq >/dev/null || { echo "load-bench.sh: needs jq (apt-get install jq)" >&2; exit 2; }
export KUBEWAN_CLUSTER_DIR="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/load-cluster}"
timeout_s="${KUBEWAN_LOAD_TIMEOUT:-1800}"
profile="${KUBEWAN_IMAGE_PROFILE:-dev}"
ns=load
operator_user=system:serviceaccount:kubewan-system:kubewan
# Its own image names, so a parallel tests/e2e/run.sh never loads this build.
registry=localhost/kubewan-load
E2E_NAME=load-bench
log() { e2e_log "$@"; }
# shellcheck source=tests/e2e/common.sh
source tests/e2e/common.sh
trap 'log "failed (exit $?): $BASH_COMMAND (line $LINENO)"' ERR

log "building the images ($profile profile, local base, $registry)"
built=$(KUBEWAN_IMAGE_PROFILE=$profile KUBEWAN_IMAGE_BASE=local KUBEWAN_IMAGE_REGISTRY=$registry \
  scripts/build-images.sh)
mapfile -t images <<<"$built"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/kubewan/Chart.yaml)

policy=$(mktemp)
write_audit_policy "$policy"
log "bringing the test control plane up ($KUBEWAN_CLUSTER_DIR), auditing $operator_user"
KUBEWAN_AUDIT_POLICY="$policy" tests/k8s/cluster.sh up
rm -f "$policy" # up copied it
eval "$(tests/k8s/cluster.sh env)"
# The jobs, the phases seen and the counts, kept for a look afterwards (the
# next `up` wipes the state dir).
work="$KUBEWAN_CLUSTER_DIR/load-bench"
mkdir -p "$work"
audit="$KUBEWAN_CLUSTER_DIR/logs/audit.log"
tests/k8s/cluster.sh load-images "${images[@]}"

base="$KUBEWAN_HOST_ROOT/var/lib/kubewan"
mkdir -p "$base/inputs" "$base/ckpts" "$base/output"
cp -r examples/keyframes "$base/inputs/"
chmod -R a+rX "$base/inputs" "$base/ckpts"
chown 65532:65532 "$base/output"

log "installing the chart"
helm upgrade --install kubewan charts/kubewan -n kubewan-system --create-namespace \
  -f tests/e2e/values.yaml \
  --set image.repository=$registry/kubewan-operator --set runner.image.repository=$registry/kubewan-runner \
  --wait --timeout 3m
kubectl wait --for condition=established --timeout=60s crd/traveljobs.kubewan.dev
kubectl create namespace "$ns"
until kubectl -n "$ns" get serviceaccount default >/dev/null 2>&1; do sleep 1; done
kubectl -n kubewan-system rollout status deploy/kubewan --timeout=120s
sleep 5 # the operator takes its Lease and lists what there is

for i in $(seq 1 "$n"); do job_manifest "job-$i"; done >"$work/jobs.yaml"
pid=$(operator_pid)
cpu_before=$(cpu_seconds "$pid")
reconciles_before=$(operator_metric kubewan_reconciles_total)
audit_from=$(wc -l <"$audit")

log "creating $n TravelJobs in namespace $ns"
t0=$(date +%s.%N)
kubectl create -f "$work/jobs.yaml" >/dev/null
t_created=$(date +%s.%N)
finished=0
while true; do
  kubectl -n "$ns" get traveljobs -o json | jq -r '.items[].status.phase // "New"' | sort | uniq -c >"$work/phases"
  finished=$(awk '$2 == "Succeeded" || $2 == "Failed" {s += $1} END {print s + 0}' "$work/phases")
  log "$finished/$n finished: $(tr -s ' \n' ' ' <"$work/phases")"
  ((finished < n)) || break
  (($(date +%s) - ${t0%.*} < timeout_s)) || { log "timed out after $timeout_s s"; break; }
  sleep 10
done
t1=$(date +%s.%N)
sleep 10 # the last events and status writes land
[[ $(operator_pid) == "$pid" ]] || log "WARNING: the operator restarted during the run: its figures cover the new process only"

report "$work" "$audit" "$audit_from"
}

# Audit: every request of the operator's ServiceAccount (its writes, and that
# it no longer LISTs per reconcile), the request's metadata only; nothing else.
write_audit_policy() { # file
  cat >"$1" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: ["$operator_user"]
  - level: None
EOF
}

# The cheapest valid TravelJob: 2 keyframes → 1 segment + the stitch, the
# preview model (no checkpoints read), no VLM, no GPU, the fewest frames.
job_manifest() { # name
  cat <<EOF
apiVersion: kubewan.dev/v1alpha1
kind: TravelJob
metadata: {name: $1, namespace: $ns}
spec:
  keyframes: [keyframes/01-sunrise.png, keyframes/02-hills.png]
  prompt: load benchmark
  frames: 5
  overlap: 1
  fps: 8
  resolution: 160x96
  enhancePrompt: {enabled: false}
  model: {name: preview}
  checkpoints: {hostPath: {path: /var/lib/kubewan/ckpts}}
  inputs: {hostPath: {path: /var/lib/kubewan/inputs}}
  output: {volume: {hostPath: {path: /var/lib/kubewan/output}}}
  runner: {device: cpu}
  backoffLimit: 1
---
EOF
}

# The host pid of the leader's operator process (its container's task).
operator_pid() {
  local pod id
  pod=$(kubectl -n kubewan-system get lease kubewan-leader -o jsonpath='{.spec.holderIdentity}')
  id=$(kubectl -n kubewan-system get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
  ctr --address "$KUBEWAN_CONTAINERD_ADDRESS" --namespace k8s.io tasks ls |
    awk -v id="${id#containerd://}" '$1 == id {print $2}'
}

cpu_seconds() { # pid → utime + stime in seconds
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"
}

operator_metric() { # name → its value on the operator's /metrics (0 when absent)
  kubectl get --raw /api/v1/namespaces/kubewan-system/services/kubewan-metrics:metrics/proxy/metrics |
    awk -v m="$1" '$1 == m {v = $2} END {print v + 0}'
}

report() { # workdir audit-log first-line
  local work="$1" audit="$2" from="$3" pid
  pid=$(operator_pid)
  tail -n +"$((from + 1))" "$audit" | jq -c --arg ns "$ns" 'select(.stage == "ResponseComplete") |
    {verb, ns: .objectRef.namespace, resource: (.objectRef.resource + (if .objectRef.subresource then "/" + .objectRef.subresource else "" end)),
     name: .objectRef.name, code: .responseStatus.code}' >"$work/requests"
  kubectl -n "$ns" get events.v1.events.k8s.io -o json >"$work/all-events.json"
  jq -c '.items[] | select(.reportingController == "kubewan-operator") |
    {reason, pod: .related.name, job: .regarding.name, count: (.series.count // .deprecatedCount // 1)}' \
    "$work/all-events.json" >"$work/events"

  local succeeded failed lost pods writes
  succeeded=$(awk '$2 == "Succeeded" {print $1}' "$work/phases")
  failed=$(awk '$2 == "Failed" {print $1}' "$work/phases")
  lost=$((n - ${succeeded:-0} - ${failed:-0}))
  pods=$(jq -s --arg ns "$ns" '[.[] | select(.ns == $ns and .resource == "pods" and .verb == "create" and .code == 201)] | length' "$work/requests")
  writes=$(jq -s --arg ns "$ns" '[.[] | select(.ns == $ns and (.verb | test("create|update|patch")) and
    (.resource == "pods" or .resource == "traveljobs/status" or .resource == "events"))] | length' "$work/requests")

  echo
  echo "== load benchmark: $n TravelJobs (1 segment + stitch each), operator image profile: $profile"
  printf 'created in %.1f s; all finished %.1f s after the first create\n' \
    "$(echo "$t_created - $t0" | bc)" "$(echo "$t1 - $t0" | bc)"
  echo "jobs: ${succeeded:-0} succeeded, ${failed:-0} failed, $lost lost (unfinished after ${timeout_s} s)"
  echo "pods created: $pods (expected $((2 * n)))"
  echo "duplicates: $(jq -rs --arg ns "$ns" '[.[] | select(.ns == $ns and .resource == "pods" and .verb == "create" and .code == 201) | .name] |
      group_by(.) | map(select(length > 1)) | length' "$work/requests") pod names created twice," \
    "$(jq -rs --arg ns "$ns" '[.[] | select(.ns == $ns and .resource == "pods" and .verb == "create" and .code == 201) | .name | sub("-[0-9]+$"; "")] |
      group_by(.) | map(select(length > 1)) | length' "$work/requests") steps with more than one pod," \
    "$(jq -rs --arg ns "$ns" '[.[] | select(.ns == $ns and .resource == "pods" and .verb == "create" and .code == 409)] | length' "$work/requests") creations answered 409"
  echo "pods that waited for a place on the node (a FailedScheduling event; each wait is" \
    "shown in the status and cleared: two status writes): $(jq '[.items[] |
      select(.reason == "FailedScheduling") | .regarding.name] | unique | length' "$work/all-events.json")"
  echo "operator requests (verb resource code: count), leases = leader election:"
  jq -rs 'group_by([.verb, .resource, .code]) | map("  \(.[0].verb) \(.[0].resource) \(.[0].code): \(length)") | .[]' "$work/requests"
  printf 'API writes per pod lifecycle: %s (pod creates + traveljob status writes + event writes = %s, over %s pods)\n' \
    "$(echo "scale=2; $writes / $pods" | bc)" "$writes" "$pods"
  echo "the operator's events by reason (objects / occurrences), and those recorded more than once:"
  jq -rs 'group_by(.reason) | map("  \(.[0].reason): \(length) / \(map(.count) | add)") | .[]' "$work/events"
  jq -rs 'map(select(.count > 1)) | "  recorded more than once: \(length)"' "$work/events"
  echo "operator: $(($(operator_metric kubewan_reconciles_total) - reconciles_before)) reconciles," \
    "$(echo "$(cpu_seconds "$pid") - $cpu_before" | bc) CPU seconds during the run," \
    "peak RSS (VmHWM) $(awk '$1 == "VmHWM:" {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status")," \
    "RSS now $(awk '$1 == "VmRSS:" {printf "%.1f MiB", $2 / 1024}' "/proc/$pid/status")"
  local sum count
  sum=$(operator_metric kubewan_reconcile_duration_seconds_sum)
  count=$(operator_metric kubewan_reconcile_duration_seconds_count)
  if ((count > 0)); then
    printf 'mean reconcile: %.3f s (over the operator'"'"'s life)\n' "$(echo "$sum / $count" | bc -l)"
  fi
  echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# Parsed whole before it runs, so that editing this file cannot disturb a run.
main "$@"; exit $?
