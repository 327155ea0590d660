#!/usr/bin/env bash
# Smoke test of the test cluster itself: brings a cluster up in its own state
# dir, checks that its node schedules and runs GPU pods as real containers
# (the pause image, which needs no build of kubewan), that the kubelet enforces
# deadlines and stops deleted pods' containers, that the garbage collector
# works, then brings it down and checks that nothing of it is left: no
# process, container shim, bridge, NAT chain or cgroup. Exit 0 only when every
# check passed. The runner's own pods are checked by tests/e2e (node.rs).
#
#   tests/k8s/smoke.sh
#
# KUBEWAN_CLUSTER_DIR picks the state dir (default: a fresh temporary one,
# removed at the end); KUBEWAN_SMOKE_KEEP=1 leaves the cluster up afterwards.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OWN_STATE=0
if [[ -z ${KUBEWAN_CLUSTER_DIR:-} ]]; then
  KUBEWAN_CLUSTER_DIR=$(mktemp -d /tmp/kubewan-smoke.XXXXXX)
  OWN_STATE=1
fi
export KUBEWAN_CLUSTER_DIR
unset KUBECONFIG
STATE="$KUBEWAN_CLUSTER_DIR"
NS=smoke
FAILURES=0
IMAGE=localhost/kubewan/pause:3.4

log() { echo "[smoke $(date +%H:%M:%S)] $*" >&2; }
pass() { echo "PASS: $*"; }
failed() {
  echo "FAIL: $*"
  FAILURES=$((FAILURES + 1))
}
check() { # description expected actual
  if [[ "$3" == "$2" ]]; then pass "$1 ($3)"; else failed "$1: expected '$2', got '$3'"; fi
}

cleanup() {
  local rc=$?
  if [[ ${KUBEWAN_SMOKE_KEEP:-0} != 1 ]]; then
    "$SCRIPT_DIR/cluster.sh" down >/dev/null 2>&1 || true
    # A temporary state dir of our own goes too (etcd data, the node's folders).
    if ((OWN_STATE)); then rm -rf "$KUBEWAN_CLUSTER_DIR"; fi
  fi
  exit $rc
}
trap cleanup EXIT

log "cluster up in $STATE"
"$SCRIPT_DIR/cluster.sh" up
eval "$("$SCRIPT_DIR/cluster.sh" env)"
# shellcheck disable=SC1091
source "$STATE/node.env"
NODE="$KUBEWAN_NODE_NAME"
tasks() { ctr --address "$KUBEWAN_CONTAINERD_ADDRESS" --namespace k8s.io tasks list --quiet 2>/dev/null || true; }

jp() { kubectl -n "$NS" get pod "$1" -o jsonpath="$2" 2>/dev/null || true; }
wait_for() { # description timeout command...
  local what="$1" deadline=$((SECONDS + $2))
  shift 2
  while ((SECONDS < deadline)); do
    "$@" && return 0
    sleep 0.5
  done
  failed "timed out waiting for $what"
  return 1
}
phase_is() { [[ "$(jp "$1" '{.status.phase}')" == "$2" ]]; }

pod() { # name gpus [extra spec lines]
  kubectl -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $1
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
${3:-}
  containers:
  - name: main
    image: $IMAGE
    resources:
      limits:
        nvidia.com/gpu: "$2"
EOF
}

log "1. the node: Ready, a containerd runtime, nvidia.com/gpu advertised"
check "node Ready" True "$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')"
check "node GPUs" 4 "$(kubectl get node "$NODE" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')"
check "node runtime" containerd://1.6.20 "$(kubectl get node "$NODE" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}' | sed 's/~ds1//')"
check "node address" "$NODE_IP" "$(kubectl get node "$NODE" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"

kubectl create namespace "$NS" >/dev/null
# Pods cannot be created before the namespace's default ServiceAccount exists.
wait_for "the default ServiceAccount" 60 kubectl -n "$NS" get sa default >/dev/null 2>&1

log "2. a GPU pod runs as a container on the node, with an address in the pod subnet"
pod gpu 1
wait_for "pod gpu Running" 60 phase_is gpu Running && pass "pod gpu Running"
check "pod gpu bound to the GPU node" "$NODE" "$(jp gpu '{.spec.nodeName}')"
ip="$(jp gpu '{.status.podIP}')"
[[ $ip == "${NODE_IP%.1}".* ]] && pass "pod address $ip in $POD_CIDR" || failed "pod address $ip not in $POD_CIDR"
id="$(jp gpu '{.status.containerStatuses[0].containerID}')"
tasks | grep -x "${id#containerd://}" >/dev/null && pass "its container runs in the node's containerd" || failed "no task ${id#containerd://}"

log "3. a pod asking for 10 GPUs stays Pending"
pod toomany 10
sleep 5
check "pod toomany phase" Pending "$(jp toomany '{.status.phase}')"
check "pod toomany PodScheduled reason" Unschedulable "$(jp toomany '{.status.conditions[?(@.type=="PodScheduled")].reason}')"
msg="$(jp toomany '{.status.conditions[?(@.type=="PodScheduled")].message}')"
[[ $msg == *"nvidia.com/gpu"* ]] && pass "scheduler says why: $msg" || failed "unschedulable message does not name nvidia.com/gpu: $msg"

log "4. activeDeadlineSeconds: the kubelet kills the container"
pod deadline 1 '  activeDeadlineSeconds: 3'
wait_for "pod deadline Failed" 60 phase_is deadline Failed && pass "pod deadline Failed"
check "pod deadline status.reason" DeadlineExceeded "$(jp deadline '{.status.reason}')"

log "5. deleting a running pod stops its container"
kubectl -n "$NS" delete pod gpu --wait=true --timeout=60s >/dev/null && pass "pod gpu deleted" || failed "pod gpu not deleted"
tasks | grep -x "${id#containerd://}" >/dev/null && failed "container of pod gpu still runs" || pass "container of pod gpu stopped"

log "6. garbage collection (kube-controller-manager) deletes owned pods"
kubectl -n "$NS" create configmap owner >/dev/null
owner_uid="$(kubectl -n "$NS" get configmap owner -o jsonpath='{.metadata.uid}')"
pod owned 0
kubectl -n "$NS" patch pod owned --type=merge -p "{\"metadata\":{\"ownerReferences\":[{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"owner\",\"uid\":\"$owner_uid\",\"controller\":true}]}}" >/dev/null
kubectl -n "$NS" delete configmap owner >/dev/null
gone() { ! kubectl -n "$NS" get pod owned >/dev/null 2>&1; }
wait_for "the owned pod to be garbage-collected" 60 gone && pass "owned pod garbage-collected"

log "7. a pod still running when the cluster goes down"
pod lingering 1
wait_for "pod lingering Running" 60 phase_is lingering Running || true
lid="$(jp lingering '{.status.containerStatuses[0].containerID}')"
lpid="$(ctr --address "$KUBEWAN_CONTAINERD_ADDRESS" --namespace k8s.io tasks list 2>/dev/null | awk -v id="${lid#containerd://}" '$1 == id {print $2}')"
[[ -n $lpid ]] && pass "lingering container process $lpid runs" || failed "no process for pod lingering"

log "8. down leaves nothing"
pids=$(cat "$STATE"/pids/*.pid 2>/dev/null | awk '{print $1}' | tr '\n' ' ')
"$SCRIPT_DIR/cluster.sh" down
for p in $pids $lpid; do
  if [[ -d /proc/$p && "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]]; then failed "pid $p still running"; else pass "pid $p gone"; fi
done
# (the pattern comes from a file: grep's own command line must not match)
left="$(grep -lsF -f <(echo "$STATE") /proc/[0-9]*/cmdline | tr '\n' ' ' || true)"
[[ -z $left ]] && pass "no process names $STATE" || failed "processes naming $STATE: $left"
ip link show "$BRIDGE" >/dev/null 2>&1 && failed "bridge $BRIDGE still there" || pass "bridge $BRIDGE removed"
iptables -t nat -S "$NAT_CHAIN" >/dev/null 2>&1 && failed "NAT chain $NAT_CHAIN still there" || pass "NAT chain $NAT_CHAIN removed"
[[ -d /sys/fs/cgroup/memory$CGROUP_ROOT ]] && failed "cgroup $CGROUP_ROOT still there" || pass "cgroup $CGROUP_ROOT removed"
"$SCRIPT_DIR/cluster.sh" status >/dev/null 2>&1 && failed "status says running after down" || pass "status says stopped after down"

if ((FAILURES > 0)); then
  log "$FAILURES check(s) FAILED"
  exit 1
fi
log "all checks passed"
