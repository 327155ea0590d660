#!/usr/bin/env bash
# Controls the operator that the chart runs in-cluster (Deployment
# kubewan-system/kubewan, installed by tests/e2e/run.sh), the way its failures
# and operations happen in a real cluster:
#
#   tests/e2e/operator.sh status     the leader (Lease holder) and the pods; exit 1 when no pod is Ready
#   tests/e2e/operator.sh kill       SIGKILL the leader's container process through the node's
#                                    containerd (a crash: no shutdown, no Lease release); the
#                                    kubelet restarts the container; waits until it is Ready again
#   tests/e2e/operator.sh crash      SIGKILL the leader's container process, as kill, then delete
#                                    its pod at once: the Deployment starts a fresh pod (no
#                                    crash-loop backoff, so crashes can repeat); waits until a
#                                    new pod holds the Lease
#   tests/e2e/operator.sh scale N    N replicas; waits until N are Ready (0: until none is left)
#   tests/e2e/operator.sh leader     print the Lease holder (a pod name)
#
# Environment: KUBECONFIG and KUBEWAN_CONTAINERD_ADDRESS (tests/k8s/cluster.sh env),
# KUBEWAN_RELEASE_NAMESPACE (default kubewan-system), KUBEWAN_RELEASE (default kubewan).
# For development the operator also runs out of cluster: scale to 0, then
# `cargo run -p kubewan-operator -- --leader-elect --lease-namespace kubewan-system
#  --allowed-volume-kinds persistentVolumeClaim,hostPath
#  --lease-name kubewan-leader --as system:serviceaccount:kubewan-system:kubewan
#  --as-group system:serviceaccounts --as-group system:serviceaccounts:kubewan-system`
# (impersonating the chart's ServiceAccount, so the chart's RBAC still applies).
set -euo pipefail
: "${KUBECONFIG:?KUBECONFIG is not set: eval \"\$(tests/k8s/cluster.sh env)\" (or run tests/e2e/run.sh)}"
ns="${KUBEWAN_RELEASE_NAMESPACE:-kubewan-system}"
release="${KUBEWAN_RELEASE:-kubewan}"
selector="app.kubernetes.io/instance=$release,app.kubernetes.io/component=operator"

leader() {
  kubectl -n "$ns" get lease "$release-leader" -o jsonpath='{.spec.holderIdentity}'
}

ready_pods() {
  kubectl -n "$ns" get pods -l "$selector" \
    -o jsonpath='{range .items[?(@.status.containerStatuses[0].ready==true)]}{.metadata.name}{"\n"}{end}'
}

wait_ready() { # count
  local deadline=$((SECONDS + 120)) n
  while ((SECONDS < deadline)); do
    n=$(ready_pods | grep -c . || true)
    if [[ $1 -eq 0 ]]; then
      [[ -z "$(kubectl -n "$ns" get pods -l "$selector" -o name)" ]] && return 0
    elif ((n >= $1)); then
      return 0
    fi
    sleep 0.5
  done
  echo "operator: $1 Ready replicas expected after 120 s:" >&2
  kubectl -n "$ns" get pods -l "$selector" -o wide >&2
  exit 1
}

case "${1:-}" in
  status)
    kubectl -n "$ns" get pods -l "$selector" -o wide
    echo "leader: $(leader || true)"
    [[ -n "$(ready_pods)" ]] ;;
  leader) leader ;;
  scale)
    replicas="${2:?usage: operator.sh scale N}"
    kubectl -n "$ns" scale deployment "$release" --replicas="$replicas" >/dev/null
    wait_ready "$replicas"
    echo "operator: $replicas replica(s) Ready" ;;
  kill|crash)
    : "${KUBEWAN_CONTAINERD_ADDRESS:?KUBEWAN_CONTAINERD_ADDRESS is not set (tests/k8s/cluster.sh env)}"
    pod=$(leader) && [[ -n $pod ]] || { echo "operator: no leader to kill" >&2; exit 1; }
    restarts=$(kubectl -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')
    id=$(kubectl -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].containerID}')
    ctr --address "$KUBEWAN_CONTAINERD_ADDRESS" --namespace k8s.io tasks kill --signal SIGKILL "${id#containerd://}"
    if [[ $1 == crash ]]; then
      kubectl -n "$ns" delete pod "$pod" --wait=false >/dev/null
      deadline=$((SECONDS + 120))
      # The Lease still names the dead pod until it expires: wait for a live
      # replica to take it over.
      until next=$(leader) && [[ -n $next && $next != "$pod" ]] && ready_pods | grep -qx "$next"; do
        ((SECONDS < deadline)) || { echo "operator: no new leader after $pod's crash in 120 s" >&2; exit 1; }
        sleep 0.5
      done
      echo "operator: killed the container of $pod (SIGKILL) and deleted the pod; $next leads"
      exit 0
    fi
    deadline=$((SECONDS + 120))
    until [[ "$(kubectl -n "$ns" get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')" -gt $restarts ]]; do
      ((SECONDS < deadline)) || { echo "operator: $pod was not restarted after SIGKILL" >&2; exit 1; }
      sleep 0.5
    done
    wait_ready 1
    echo "operator: killed the container of $pod (SIGKILL); the kubelet restarted it" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
