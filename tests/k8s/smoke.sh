#!/usr/bin/env bash
# Smoke test of the test control plane: brings a cluster up in its own state
# dir, checks scheduling and the node agent's pod lifecycle against the real
# kube-apiserver/scheduler, brings it down and checks that nothing of it is
# left running. Exit 0 only when every check passed.
#
#   tests/k8s/smoke.sh
#
# KUBEWAN_CLUSTER_DIR picks the state dir (default: a fresh temporary one);
# KUBEWAN_SMOKE_KEEP=1 leaves the cluster up afterwards.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export KUBEWAN_CLUSTER_DIR="${KUBEWAN_CLUSTER_DIR:-$(mktemp -d /tmp/kubewan-smoke.XXXXXX)}"
unset KUBECONFIG
STATE="$KUBEWAN_CLUSTER_DIR"
NS=smoke
FAILURES=0

log() { echo "[smoke $(date +%H:%M:%S)] $*" >&2; }
pass() { echo "PASS: $*"; }
failed() {
  echo "FAIL: $*"
  FAILURES=$((FAILURES + 1))
}
# Running (a zombie has exited; it only waits to be reaped by its parent).
alive() { [[ -n ${1:-} && -d /proc/$1 && "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }
check() { # description expected actual
  if [[ "$3" == "$2" ]]; then pass "$1 ($3)"; else failed "$1: expected '$2', got '$3'"; fi
}

cleanup() {
  local rc=$?
  if [[ ${KUBEWAN_SMOKE_KEEP:-0} != 1 ]]; then
    "$SCRIPT_DIR/cluster.sh" down >/dev/null 2>&1 || true
  fi
  exit $rc
}
trap cleanup EXIT

log "cluster up in $STATE"
"$SCRIPT_DIR/cluster.sh" up
eval "$("$SCRIPT_DIR/cluster.sh" env)"
NODE="$KUBEWAN_NODE_NAME"

jp() { kubectl -n "$NS" get pod "$1" -o jsonpath="$2" 2>/dev/null || true; }
wait_phase() { # pod phase timeout
  local deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    [[ "$(jp "$1" '{.status.phase}')" == "$2" ]] && return 0
    sleep 0.5
  done
  return 1
}

pod() { # name gpus command [extra spec yaml lines]
  local name="$1" gpus="$2" cmd="$3" extra="${4:-}"
  kubectl -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
$extra
  containers:
  - name: main
    image: kubewan-runner:smoke
    command: ["/bin/sh", "-c", $(printf '%s' "$cmd" | jq -Rs .)]
    terminationMessagePolicy: FallbackToLogsOnError
    resources:
      limits:
        nvidia.com/gpu: "$gpus"
EOF
}

kubectl create namespace "$NS" >/dev/null
# Pods cannot be created before the namespace's default ServiceAccount exists.
for _ in $(seq 1 60); do kubectl -n "$NS" get sa default >/dev/null 2>&1 && break; sleep 0.5; done

log "1. a GPU pod that writes its termination message and succeeds"
pod ok 1 'echo done > "$KUBEWAN_TERMINATION_LOG"'
if wait_phase ok Succeeded 60; then pass "pod ok Succeeded"; else failed "pod ok: phase $(jp ok '{.status.phase}')"; fi
check "pod ok bound to the GPU node" "$NODE" "$(jp ok '{.spec.nodeName}')"
check "pod ok exit code" 0 "$(jp ok '{.status.containerStatuses[0].state.terminated.exitCode}')"
check "pod ok reason" Completed "$(jp ok '{.status.containerStatuses[0].state.terminated.reason}')"
check "pod ok termination message" done "$(jp ok '{.status.containerStatuses[0].state.terminated.message}' | tr -d '\n')"
check "pod ok PodScheduled condition" True "$(jp ok '{.status.conditions[?(@.type=="PodScheduled")].status}')"
check "pod ok Ready condition (completed)" False "$(jp ok '{.status.conditions[?(@.type=="Ready")].status}')"
[[ -n "$(jp ok '{.status.startTime}')" ]] && pass "pod ok has a startTime" || failed "pod ok has no startTime"

log "2. a GPU pod that exits 3"
pod exit3 1 'echo "about to fail" >&2; exit 3'
if wait_phase exit3 Failed 60; then pass "pod exit3 Failed"; else failed "pod exit3: phase $(jp exit3 '{.status.phase}')"; fi
check "pod exit3 exit code" 3 "$(jp exit3 '{.status.containerStatuses[0].state.terminated.exitCode}')"
check "pod exit3 reason" Error "$(jp exit3 '{.status.containerStatuses[0].state.terminated.reason}')"
check "pod exit3 message falls back to the log" "about to fail" "$(jp exit3 '{.status.containerStatuses[0].state.terminated.message}')"

log "3. a pod asking for 10 GPUs stays Pending"
pod toomany 10 'exit 0'
sleep 6
check "pod toomany phase" Pending "$(jp toomany '{.status.phase}')"
check "pod toomany is not bound" "" "$(jp toomany '{.spec.nodeName}')"
check "pod toomany PodScheduled reason" Unschedulable "$(jp toomany '{.status.conditions[?(@.type=="PodScheduled")].reason}')"
msg="$(jp toomany '{.status.conditions[?(@.type=="PodScheduled")].message}')"
[[ $msg == *"nvidia.com/gpu"* ]] && pass "scheduler says why: $msg" || failed "unschedulable message does not name nvidia.com/gpu: $msg"

log "4. activeDeadlineSeconds kills a pod"
pod deadline 1 'sleep 120' '  activeDeadlineSeconds: 3'
if wait_phase deadline Failed 40; then pass "pod deadline Failed"; else failed "pod deadline: phase $(jp deadline '{.status.phase}')"; fi
check "pod deadline status.reason" DeadlineExceeded "$(jp deadline '{.status.reason}')"
check "pod deadline container reason" DeadlineExceeded "$(jp deadline '{.status.containerStatuses[0].state.terminated.reason}')"

log "5. volumes: hostPath and PVC map under the host root, mounts reach the process"
mkdir -p "$KUBEWAN_HOST_ROOT/data/inputs" "$KUBEWAN_HOST_ROOT/pvc/ckpts"
echo keyframe >"$KUBEWAN_HOST_ROOT/data/inputs/a.png"
echo weights >"$KUBEWAN_HOST_ROOT/pvc/ckpts/model.safetensors"
kubectl -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: PersistentVolume
metadata:
  name: smoke-ckpts
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  hostPath: {path: /pv/ckpts}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: ckpts
spec:
  storageClassName: manual
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata:
  name: volumes
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: kubewan-runner:smoke
    command: ["/bin/sh", "-c"]
    args:
    - 'cat "$KUBEWAN_INPUTS/a.png" "$KUBEWAN_CKPTS/model.safetensors" > "$KUBEWAN_OUTPUT/out.txt" && echo "$GREETING $(cat $KUBEWAN_OUTPUT/out.txt | tr "\n" " ")" > "$KUBEWAN_TERMINATION_LOG"'
    env:
    - {name: GREETING, value: hello}
    volumeMounts:
    - {name: inputs, mountPath: /inputs, readOnly: true}
    - {name: ckpts, mountPath: /ckpts, readOnly: true}
    - {name: out, mountPath: /output}
  volumes:
  - {name: inputs, hostPath: {path: /data/inputs}}
  - {name: ckpts, persistentVolumeClaim: {claimName: ckpts}}
  - {name: out, hostPath: {path: /data/output}}
EOF
if wait_phase volumes Succeeded 60; then pass "pod volumes Succeeded"; else failed "pod volumes: phase $(jp volumes '{.status.phase}') $(jp volumes '{.status.conditions}')"; fi
check "pod volumes message" "hello keyframe weights" "$(jp volumes '{.status.containerStatuses[0].state.terminated.message}' | sed 's/ *$//')"
check "pod volumes output on the host" "keyframe weights" "$(tr '\n' ' ' <"$KUBEWAN_HOST_ROOT/data/output/out.txt" | sed 's/ *$//')"

log "6. deleting a running pod kills its process and removes the pod"
pod sleeper 1 'echo started; sleep 300'
if wait_phase sleeper Running 60; then pass "pod sleeper Running"; else failed "pod sleeper: phase $(jp sleeper '{.status.phase}')"; fi
uid="$(jp sleeper '{.metadata.uid}')"
pidfile="$(ls "$STATE"/agent/pods/"${NS}_sleeper_${uid}"/pid 2>/dev/null || true)"
sleeper_pid="$(cat "$pidfile" 2>/dev/null || true)"
alive "$sleeper_pid" && pass "sleeper process $sleeper_pid is running" || failed "no running process for pod sleeper"
kubectl -n "$NS" delete pod sleeper --wait=true --timeout=40s >/dev/null && pass "pod sleeper deleted" || failed "pod sleeper not deleted"
sleep 1
[[ -n $sleeper_pid ]] && ! alive "$sleeper_pid" && pass "sleeper process is gone" || failed "sleeper process $sleeper_pid still running"
"$SCRIPT_DIR/cluster.sh" logs sleeper "$NS" 2>/dev/null | grep -qx "started" && pass "cluster.sh logs shows the process output" || failed "no process output from cluster.sh logs"

log "7. garbage collection (kube-controller-manager) deletes owned pods"
kubectl -n "$NS" create configmap owner >/dev/null
owner_uid="$(kubectl -n "$NS" get configmap owner -o jsonpath='{.metadata.uid}')"
kubectl -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: owned
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: owner, uid: $owner_uid, controller: true}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: x
    command: ["/bin/sh", "-c", "sleep 300"]
EOF
wait_phase owned Running 60 || true
kubectl -n "$NS" delete configmap owner >/dev/null
for _ in $(seq 1 60); do kubectl -n "$NS" get pod owned >/dev/null 2>&1 || break; sleep 0.5; done
kubectl -n "$NS" get pod owned >/dev/null 2>&1 && failed "owned pod survived its owner" || pass "owned pod garbage-collected"

log "8. a container without command runs --default-command (kubewan-runner) from the bin dir"
runner="$(dirname "$(readlink -f "$(cargo metadata --format-version 1 --no-deps --manifest-path "$SCRIPT_DIR/../../Cargo.toml" | jq -r .target_directory)/debug/kubewan-node-agent")")/kubewan-runner"
if [[ -x $runner ]]; then
  kubectl -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: runner
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: kubewan-runner:smoke
    args: ["--help"]
EOF
  if wait_phase runner Succeeded 60; then pass "kubewan-runner --help ran in a pod"; else failed "pod runner: phase $(jp runner '{.status.phase}'): $(jp runner '{.status.containerStatuses[0].state}')"; fi
  ruid="$(jp runner '{.metadata.uid}')"
  grep -qi "usage" "$STATE"/agent/pods/"${NS}_runner_${ruid}"/container.log && pass "runner's --help output in its container.log" || failed "runner output missing"
else
  echo "SKIP: $runner not built (cargo build -p kubewan-runner)"
fi

log "9. restartPolicy OnFailure restarts a failed container (after the kubelet's 10 s back-off); /tmp mount -> TMPDIR"
kubectl -n "$NS" apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: restarts
spec:
  restartPolicy: OnFailure
  containers:
  - name: main
    image: x
    command: ["/bin/sh", "-c", 'if [ -f "$TMPDIR/once" ]; then echo "second try $TMPDIR" > "$KUBEWAN_TERMINATION_LOG"; else touch "$TMPDIR/once"; exit 1; fi']
    volumeMounts:
    - {name: tmp, mountPath: /tmp}
  volumes:
  - {name: tmp, emptyDir: {}}
EOF
if wait_phase restarts Succeeded 60; then pass "pod restarts Succeeded"; else failed "pod restarts: phase $(jp restarts '{.status.phase}')"; fi
check "pod restarts restartCount" 1 "$(jp restarts '{.status.containerStatuses[0].restartCount}')"
check "pod restarts lastState exit code" 1 "$(jp restarts '{.status.containerStatuses[0].lastState.terminated.exitCode}')"
msg="$(jp restarts '{.status.containerStatuses[0].state.terminated.message}')"
[[ $msg == "second try "*"/volumes/tmp"* ]] && pass "second run saw the emptyDir as TMPDIR ($msg)" || failed "pod restarts message: $msg"

log "10. a pod still running when the cluster goes down"
pod lingering 1 'sleep 300'
wait_phase lingering Running 60 || failed "pod lingering did not start"
luid="$(jp lingering '{.metadata.uid}')"
lingering_pid="$(cat "$STATE"/agent/pods/"${NS}_lingering_${luid}"/pid 2>/dev/null || true)"
alive "$lingering_pid" && pass "lingering process $lingering_pid runs" || failed "no process for pod lingering"

log "status:"
"$SCRIPT_DIR/cluster.sh" status || true
kubectl -n "$NS" get pods -o wide

log "11. down leaves nothing running"
pids=$(cat "$STATE"/pids/*.pid 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
"$SCRIPT_DIR/cluster.sh" down
left="$(pgrep -af -- "$STATE" || true)"
[[ -z $left ]] && pass "pgrep -af $STATE: nothing left" || failed "left running: $left"
for p in $pids ${lingering_pid:-}; do
  if alive "$p"; then failed "pid $p still running"; else pass "pid $p gone"; fi
done
"$SCRIPT_DIR/cluster.sh" status >/dev/null 2>&1 && failed "status says running after down" || pass "status says stopped after down"

if ((FAILURES > 0)); then
  log "$FAILURES check(s) FAILED"
  exit 1
fi
log "all checks passed"
