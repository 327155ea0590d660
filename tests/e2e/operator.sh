#!/usr/bin/env bash
# Runs kubewan-operator as a local process under EXACTLY the Helm chart's
# identity: it impersonates the chart's ServiceAccount
# (system:serviceaccount:kubewan-system:kubewan and its groups), so every API
# call it makes is authorised by the chart's ClusterRole/Role, not by the
# admin credentials of $KUBECONFIG (which only hold the right to impersonate).
# Why a local process: the test kubelet runs pods as local processes from this
# build, not container images, so the chart is installed with replicaCount=0
# and this script plays its Deployment (same flags as the chart's args).
#
#   tests/e2e/operator.sh start     start it (no-op when running); waits for /readyz
#   tests/e2e/operator.sh stop      SIGTERM (releases the leader lease), wait
#   tests/e2e/operator.sh kill      SIGKILL (a crash: the lease must expire)
#   tests/e2e/operator.sh restart   stop + start
#   tests/e2e/operator.sh status    print pid and command line; exit 1 when not running
#
# Environment: KUBECONFIG (required), KUBEWAN_OPERATOR_BIN (default: the cargo
# target dir's debug/kubewan-operator), KUBEWAN_E2E_STATE (pid + log; default
# ~/.cache/kubewan/e2e), KUBEWAN_E2E_METRICS_ADDR (default 127.0.0.1:18080),
# KUBEWAN_RELEASE_NAMESPACE (default kubewan-system), KUBEWAN_SERVICE_ACCOUNT
# (default kubewan), KUBEWAN_E2E_INSTANCE (a second replica: its own pid file
# and log; give it its own KUBEWAN_E2E_METRICS_ADDR).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
: "${KUBECONFIG:?KUBECONFIG is not set: run tests/k8s/cluster.sh up (or tests/e2e/run.sh)}"
state="${KUBEWAN_E2E_STATE:-$HOME/.cache/kubewan/e2e}"
mkdir -p "$state"
# KUBEWAN_E2E_INSTANCE=N runs a further replica (own pid file and log).
inst="${KUBEWAN_E2E_INSTANCE:-}"
pidfile="$state/operator${inst:+-$inst}.pid"
logfile="$state/operator${inst:+-$inst}.log"
addr="${KUBEWAN_E2E_METRICS_ADDR:-127.0.0.1:18080}"
ns="${KUBEWAN_RELEASE_NAMESPACE:-kubewan-system}"
sa="${KUBEWAN_SERVICE_ACCOUNT:-kubewan}"
if [[ -z ${KUBEWAN_OPERATOR_BIN:-} ]]; then
  target=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  KUBEWAN_OPERATOR_BIN="$target/debug/kubewan-operator"
fi

starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }
alive() { # prints the pid when the recorded process is still ours
  local pid start
  [[ -f $pidfile ]] || return 1
  read -r pid start <"$pidfile" || return 1
  [[ -n ${pid:-} && -d /proc/$pid && "$(starttime "$pid")" == "$start" ]] || return 1
  echo "$pid"
}

start() {
  if pid=$(alive); then
    echo "operator already running (pid $pid)"
    return 0
  fi
  [[ -x $KUBEWAN_OPERATOR_BIN ]] || { echo "no operator binary at $KUBEWAN_OPERATOR_BIN (cargo build -p kubewan-operator)" >&2; exit 1; }
  # The same flags as the chart's Deployment, plus the impersonation, a short
  # lease (a crashed operator's successor waits for it) and a fast backoff.
  RUST_LOG="${RUST_LOG:-info,kube_client=warn}" setsid "$KUBEWAN_OPERATOR_BIN" \
    --metrics-addr "$addr" \
    --leader-elect --lease-namespace "$ns" --lease-name kubewan-leader \
    --lease-duration-seconds "${KUBEWAN_E2E_LEASE_SECONDS:-10}" \
    --runner-image kubewan-runner:e2e \
    --backoff-base-seconds "${KUBEWAN_E2E_BACKOFF_SECONDS:-1}" --backoff-max-seconds 5 \
    --resync-seconds 30 \
    --as "system:serviceaccount:$ns:$sa" \
    --as-group system:serviceaccounts --as-group "system:serviceaccounts:$ns" \
    --as-group system:authenticated \
    >>"$logfile" 2>&1 </dev/null &
  local pid=$! start=""
  for _ in $(seq 20); do start=$(starttime "$pid"); [[ -n $start ]] && break; sleep 0.1; done
  echo "$pid $start" >"$pidfile"
  for _ in $(seq 300); do
    if curl -fsS "http://$addr/readyz" >/dev/null 2>&1; then
      echo "operator started (pid $pid, as system:serviceaccount:$ns:$sa, metrics http://$addr, log $logfile)"
      return 0
    fi
    if ! alive >/dev/null; then
      echo "operator exited; last log lines:" >&2
      tail -n 30 "$logfile" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "operator not ready after 30 s; last log lines:" >&2
  tail -n 30 "$logfile" >&2
  exit 1
}

stop() { # signal
  local pid
  if pid=$(alive); then
    kill "-$1" "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive >/dev/null || break; sleep 0.1; done
    if alive >/dev/null; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.5; fi
    echo "operator stopped with SIG$1 (pid $pid)"
  else
    echo "operator not running"
  fi
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop TERM ;;
  kill) stop KILL ;;
  restart) stop TERM; start ;;
  status)
    if pid=$(alive); then
      echo "operator running (pid $pid): $(tr '\0' ' ' <"/proc/$pid/cmdline")"
    else
      echo "operator not running"; exit 1
    fi ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
