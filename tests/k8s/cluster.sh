#!/usr/bin/env bash
# kubewan's own test control plane: etcd, kube-apiserver, kube-controller-manager
# and kube-scheduler (v1.20.2) on loopback, one Node with nvidia.com/gpu
# capacity, and kubewan-node-agent playing that node's kubelet (it runs each pod
# bound to the node as a local process). See shared/k8s-test-env.md.
#
#   tests/k8s/cluster.sh up       start everything (installs tools when missing)
#   tests/k8s/cluster.sh down     stop exactly the processes `up` started
#   tests/k8s/cluster.sh status   say what is running (exit 0 only when all is)
#   tests/k8s/cluster.sh env      print the `export ...` lines for this cluster
#   tests/k8s/cluster.sh logs POD [NAMESPACE]
#                                 a pod's process output (there is no kubelet
#                                 API, so `kubectl logs` does not work here)
#
# Environment:
#   KUBEWAN_CLUSTER_DIR   state dir (pids, logs, certs, etcd data, agent folders)
#                         default ~/.cache/kubewan/cluster
#   KUBECONFIG            when set, `up` writes the admin kubeconfig there too
#                         (always written to $KUBEWAN_CLUSTER_DIR/kubeconfig)
#   KUBEWAN_NODE_NAME     default gpu-node-1
#   KUBEWAN_NODE_GPUS     nvidia.com/gpu capacity, default 4
#   KUBEWAN_NODE_CPU      cpu capacity, default 16
#   KUBEWAN_NODE_MEMORY   memory capacity, default 128Gi
#   KUBEWAN_HOST_ROOT     the node's "host" filesystem: hostPath P -> $KUBEWAN_HOST_ROOT/P,
#                         PVC C -> $KUBEWAN_HOST_ROOT/pvc/C; default $KUBEWAN_CLUSTER_DIR/host
#   KUBEWAN_NODE_AGENT    path of a prebuilt kubewan-node-agent; default: build it with
#                         cargo (`cargo build -p kubewan-node-agent`) and use target/debug
#   KUBEWAN_AGENT_BIN_DIR where the agent looks up command[0] first (kubewan-runner);
#                         default: the agent binary's folder (target/debug)
#   KUBEWAN_UP_TIMEOUT    seconds to wait for each component, default 90
#   KUBEWAN_AGENT_LOG     the agent's RUST_LOG, default info,kube=warn,kubewan_node_agent=info
#   KUBEWAN_CACHE_DIR     tool cache of install-tools.sh, default ~/.cache/kubewan
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
STATE="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/cluster}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
NODE="${KUBEWAN_NODE_NAME:-gpu-node-1}"
GPUS="${KUBEWAN_NODE_GPUS:-4}"
NODE_CPU="${KUBEWAN_NODE_CPU:-16}"
NODE_MEMORY="${KUBEWAN_NODE_MEMORY:-128Gi}"
HOST_ROOT="${KUBEWAN_HOST_ROOT:-$STATE/host}"
TIMEOUT="${KUBEWAN_UP_TIMEOUT:-90}"
ADMIN_KUBECONFIG="$STATE/kubeconfig"
# Components in start order; `down` stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler node-agent)

log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }

# ------------------------------------------------------------ process tracking
# A pid file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a recycled
# pid is never mistaken for ours.
proc_starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

pid_alive() { # component -> prints pid when the recorded process is alive
  local f="$STATE/pids/$1.pid" pid start
  [[ -f $f ]] || return 1
  read -r pid start <"$f" || return 1
  [[ -n ${pid:-} && -d /proc/$pid ]] || return 1
  [[ "$(proc_starttime "$pid")" == "$start" ]] || return 1
  # A zombie (exited, not yet reaped by its new parent) is not running.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] || return 1
  echo "$pid"
}

start_component() { # name logfile cmd...
  local name="$1" logfile="$2"
  shift 2
  mkdir -p "$STATE/pids" "$STATE/logs"
  # setsid: own session and process group, so `down` can stop it whole.
  setsid "$@" >"$logfile" 2>&1 </dev/null 8>&- &
  local pid=$!
  local start=""
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    start="$(proc_starttime "$pid")"
    [[ -n $start ]] && break
    sleep 0.1
  done
  echo "$pid $start" >"$STATE/pids/$name.pid"
  log "started $name (pid $pid, log $logfile)"
}

stop_component() {
  local name="$1" pid
  if pid="$(pid_alive "$name")"; then
    kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 150; i++)); do
      pid_alive "$name" >/dev/null || break
      sleep 0.1
    done
    if pid_alive "$name" >/dev/null; then
      log "$name (pid $pid) did not stop in 15 s, killing it"
      kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        pid_alive "$name" >/dev/null || break
        sleep 0.1
      done
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$STATE/pids/$name.pid"
}

# Pod processes the agent started and that are still alive (only when the agent
# died without cleaning up). Recognised by the termination-log path the agent
# put in their environment, which lies inside this state dir.
leftover_pod_pids() {
  local f pid
  for f in "$STATE"/agent/pods/*/pid; do
    [[ -f $f ]] || continue
    read -r pid <"$f" || continue
    [[ -n ${pid:-} && -r /proc/$pid/environ ]] || continue
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "KUBEWAN_TERMINATION_LOG=$(dirname "$f")/termination-log"; then
      echo "$pid"
    fi
  done
}

do_down() {
  local i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    stop_component "${COMPONENTS[$i]}"
  done
  local pid
  for pid in $(leftover_pod_pids); do
    log "killing leftover pod process group $pid"
    kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
}

# ------------------------------------------------------------ helpers
# Ports are drawn below the kernel's ephemeral range (outgoing connections
# take ports from there, and a listener cannot bind one in use), and must not
# be used by any socket, listening or not.
used_ports=()
free_port() {
  local port tries=0 lo hi
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || lo=32768
  local top=$((lo > 12000 ? lo : 32768))
  while ((tries++ < 200)); do
    port=$((10000 + RANDOM % (top - 10000)))
    [[ " ${used_ports[*]:-} " == *" $port "* ]] && continue
    if ! ss -Htan "sport = :$port" 2>/dev/null | grep -q .; then
      used_ports+=("$port")
      echo "$port"
      return
    fi
  done
  echo "no free port found" >&2
  return 1
}

fail() { # component message
  local name="$1"
  shift
  echo "[cluster] ERROR: $*" >&2
  local logfile="$STATE/logs/$name.log"
  if [[ -f $logfile ]]; then
    echo "----- last 40 lines of $logfile -----" >&2
    tail -n 40 "$logfile" >&2
    echo "-----" >&2
  fi
  log "stopping what was started"
  do_down
  exit 1
}

wait_for() { # component description command...
  local name="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + TIMEOUT))
  while ! "$@" >/dev/null 2>&1; do
    pid_alive "$name" >/dev/null || fail "$name" "$name exited while waiting for $what"
    ((SECONDS < deadline)) || fail "$name" "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.5
  done
}

kc() { "$KUBECTL" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

write_kubeconfig() { # file user token
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubewan-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $2
  user:
    token: $3
contexts:
- name: kubewan-test
  context:
    cluster: kubewan-test
    user: $2
    namespace: default
current-context: kubewan-test
EOF
  chmod 600 "$1"
}

print_env() {
  echo "export KUBEWAN_CLUSTER_DIR='$STATE'"
  echo "export KUBECONFIG='${KUBECONFIG_OUT:-$ADMIN_KUBECONFIG}'"
  echo "export KUBEWAN_HOST_ROOT='$HOST_ROOT'"
  echo "export KUBEWAN_NODE_NAME='$NODE'"
  echo "export KUBEWAN_AGENT_STATE_DIR='$STATE/agent'"
  echo "export PATH='$KUBEWAN_TOOLS_BIN':\"\$PATH\""
}

# ------------------------------------------------------------ up
do_up() {
  local running=0 c
  for c in "${COMPONENTS[@]}"; do
    pid_alive "$c" >/dev/null && running=$((running + 1))
  done
  if ((running == ${#COMPONENTS[@]})); then
    log "already up (state $STATE); run '$0 down' first for a fresh cluster"
    [[ -n ${KUBECONFIG:-} ]] && cp "$ADMIN_KUBECONFIG" "$KUBECONFIG"
    echo "kubeconfig: ${KUBECONFIG:-$ADMIN_KUBECONFIG}"
    return 0
  fi
  if ((running > 0)); then
    log "a partial cluster is running ($running of ${#COMPONENTS[@]}); stopping it first"
    do_down
  fi
  local t0=$SECONDS

  eval "$("$SCRIPT_DIR/install-tools.sh" --env)"
  KUBECTL="$KUBEWAN_TOOLS_BIN/kubectl"

  local agent_bin="${KUBEWAN_NODE_AGENT:-}"
  if [[ -z $agent_bin ]]; then
    log "building kubewan-node-agent"
    (cd "$REPO_ROOT" && nice cargo build -q -p kubewan-node-agent) || fail node-agent "cargo build -p kubewan-node-agent failed"
    local target_dir
    target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
    agent_bin="$target_dir/debug/kubewan-node-agent"
  fi
  [[ -x $agent_bin ]] || fail node-agent "no node agent binary at $agent_bin"

  # A fresh cluster every time: forget the previous one's state.
  rm -rf "$STATE/etcd" "$STATE/pki" "$STATE/logs" "$STATE/pids" "$STATE/agent" "$STATE/kubeconfigs" "$STATE/host"
  mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/kubeconfigs" "$HOST_ROOT"

  ETCD_PORT=$(free_port)
  ETCD_PEER_PORT=$(free_port)
  API_PORT=$(free_port)
  CM_PORT=$(free_port)
  SCHED_PORT=$(free_port)

  # PKI: a CA, a server cert for 127.0.0.1/localhost, the service-account key.
  PKI="$STATE/pki"
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=kubewan-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$STATE/logs/pki.log" 2>&1 || fail pki "openssl failed"

  # Static tokens, one identity per component (all cluster admins: this is a
  # test cluster; the operator's own RBAC is tested through impersonation).
  local tok_admin tok_cm tok_sched tok_agent
  tok_admin=$(openssl rand -hex 24)
  tok_cm=$(openssl rand -hex 24)
  tok_sched=$(openssl rand -hex 24)
  tok_agent=$(openssl rand -hex 24)
  cat >"$PKI/tokens.csv" <<EOF
$tok_admin,kubewan-admin,uid-admin,"system:masters"
$tok_cm,system:kube-controller-manager,uid-cm,"system:masters"
$tok_sched,system:kube-scheduler,uid-sched,"system:masters"
$tok_agent,system:node:$NODE,uid-node,"system:masters,system:nodes"
EOF
  chmod 600 "$PKI/tokens.csv"
  write_kubeconfig "$ADMIN_KUBECONFIG" kubewan-admin "$tok_admin"
  write_kubeconfig "$STATE/kubeconfigs/controller-manager" system:kube-controller-manager "$tok_cm"
  write_kubeconfig "$STATE/kubeconfigs/scheduler" system:kube-scheduler "$tok_sched"
  write_kubeconfig "$STATE/kubeconfigs/node-agent" "system:node:$NODE" "$tok_agent"

  # etcd
  start_component etcd "$STATE/logs/etcd.log" "$KUBEWAN_ETCD" --name kubewan --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kubewan=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
  wait_for etcd "etcd health on port $ETCD_PORT" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

  # kube-apiserver
  start_component kube-apiserver "$STATE/logs/kube-apiserver.log" "$KUBEWAN_K8S_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$PKI/server.crt" --tls-private-key-file="$PKI/server.key" --client-ca-file="$PKI/ca.crt" \
    --token-auth-file="$PKI/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --enable-priority-and-fairness=false --profiling=false --v=1
  wait_for kube-apiserver "kube-apiserver /readyz on port $API_PORT" kc get --raw /readyz

  # kube-controller-manager (service accounts, garbage collector, ...; no node lifecycle)
  start_component kube-controller-manager "$STATE/logs/kube-controller-manager.log" \
    "$KUBEWAN_K8S_BIN/kube-controller-manager" \
    --kubeconfig="$STATE/kubeconfigs/controller-manager" \
    --authentication-kubeconfig="$STATE/kubeconfigs/controller-manager" \
    --authorization-kubeconfig="$STATE/kubeconfigs/controller-manager" \
    --bind-address=127.0.0.1 --secure-port="$CM_PORT" --port=0 --leader-elect=false \
    --controllers='*,-nodelifecycle' \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range=10.0.0.0/24 --v=1

  # kube-scheduler
  start_component kube-scheduler "$STATE/logs/kube-scheduler.log" "$KUBEWAN_K8S_BIN/kube-scheduler" \
    --kubeconfig="$STATE/kubeconfigs/scheduler" \
    --authentication-kubeconfig="$STATE/kubeconfigs/scheduler" \
    --authorization-kubeconfig="$STATE/kubeconfigs/scheduler" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --leader-elect=false --v=1

  wait_for kube-controller-manager "kube-controller-manager /healthz on port $CM_PORT" \
    curl -fsSk "https://127.0.0.1:$CM_PORT/healthz"
  wait_for kube-scheduler "kube-scheduler /healthz on port $SCHED_PORT" \
    curl -fsSk "https://127.0.0.1:$SCHED_PORT/healthz"
  wait_for kube-controller-manager "the default ServiceAccount" kc -n default get serviceaccount default

  # The GPU node.
  kc apply -f - >/dev/null <<EOF || fail kube-apiserver "registering Node $NODE failed"
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels:
    kubernetes.io/hostname: $NODE
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    nvidia.com/gpu.present: "true"
    kubewan.dev/test-node: "true"
spec: {}
EOF
  local now
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  kc patch node "$NODE" --subresource=status --type=merge -p "$(cat <<EOF
{"status": {
  "capacity":    {"cpu": "$NODE_CPU", "memory": "$NODE_MEMORY", "pods": "110", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "$GPUS"},
  "allocatable": {"cpu": "$NODE_CPU", "memory": "$NODE_MEMORY", "pods": "110", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "$GPUS"},
  "conditions": [
    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubewan-node-agent registered the node", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"},
    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"},
    {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"},
    {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": "$now", "lastTransitionTime": "$now"}
  ],
  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "$NODE"}],
  "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
  "nodeInfo": {"machineID": "kubewan-test", "systemUUID": "kubewan-test", "bootID": "kubewan-test",
    "kernelVersion": "$(uname -r)", "osImage": "kubewan-node-agent", "containerRuntimeVersion": "kubewan://local-process",
    "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"}
}}
EOF
)" >/dev/null || fail kube-apiserver "patching Node $NODE status failed"
  # The TaintNodesByCondition admission plugin taints a new node not-ready;
  # with the node lifecycle controller off nobody would remove it.
  if kc get node "$NODE" -o jsonpath='{.spec.taints[*].key}' | grep -q node.kubernetes.io/not-ready; then
    kc taint node "$NODE" node.kubernetes.io/not-ready- >/dev/null || fail kube-apiserver "removing the not-ready taint failed"
  fi

  # The node agent.
  mkdir -p "$STATE/agent"
  start_component node-agent "$STATE/logs/node-agent.log" env \
    KUBECONFIG="$STATE/kubeconfigs/node-agent" RUST_LOG="${KUBEWAN_AGENT_LOG:-info,kube=warn,kubewan_node_agent=info}" \
    "$agent_bin" --node-name "$NODE" --state-dir "$STATE/agent" --host-root "$HOST_ROOT"
  wait_for node-agent "the node agent to start watching" grep -q "kubewan-node-agent starting" "$STATE/logs/node-agent.log"
  sleep 1
  pid_alive node-agent >/dev/null || fail node-agent "the node agent exited"
  wait_for node-agent "Node $NODE Ready" bash -c \
    "[[ \"\$('$KUBECTL' --kubeconfig '$ADMIN_KUBECONFIG' get node '$NODE' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" == True ]]"

  cat >"$STATE/cluster.env" <<EOF
API_SERVER=https://127.0.0.1:$API_PORT
ETCD_PORT=$ETCD_PORT
API_PORT=$API_PORT
CM_PORT=$CM_PORT
SCHED_PORT=$SCHED_PORT
NODE=$NODE
HOST_ROOT=$HOST_ROOT
EOF
  KUBECONFIG_OUT="$ADMIN_KUBECONFIG"
  if [[ -n ${KUBECONFIG:-} ]]; then
    KUBECONFIG_OUT="${KUBECONFIG%%:*}"
    mkdir -p "$(dirname "$KUBECONFIG_OUT")"
    cp "$ADMIN_KUBECONFIG" "$KUBECONFIG_OUT"
  fi
  print_env >"$STATE/env.sh"
  log "cluster up in $((SECONDS - t0)) s: API server https://127.0.0.1:$API_PORT, node $NODE ($GPUS x nvidia.com/gpu)"
  kc get nodes -o wide >&2 || true
  echo "kubeconfig: $KUBECONFIG_OUT"
  echo "env:        source $STATE/env.sh"
}

do_status() {
  local all=0 c pid
  for c in "${COMPONENTS[@]}"; do
    if pid="$(pid_alive "$c")"; then
      printf '%-24s running (pid %s)\n' "$c" "$pid"
    else
      printf '%-24s stopped\n' "$c"
      all=1
    fi
  done
  local leftovers
  leftovers="$(leftover_pod_pids | tr '\n' ' ')"
  [[ -n ${leftovers// /} ]] && echo "pod processes:           ${leftovers}"
  if [[ -f $STATE/cluster.env ]] && pid_alive kube-apiserver >/dev/null; then
    # shellcheck disable=SC1091
    echo "api server:              $(grep ^API_SERVER= "$STATE/cluster.env" | cut -d= -f2-)"
    echo "kubeconfig:              $ADMIN_KUBECONFIG"
    echo "host root:               $(grep ^HOST_ROOT= "$STATE/cluster.env" | cut -d= -f2-)"
    local kubectl="${KUBEWAN_TOOLS_BIN:-${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}/tools/bin}/kubectl"
    [[ -x $kubectl ]] && "$kubectl" --kubeconfig "$ADMIN_KUBECONFIG" get nodes 2>&1 || true
  fi
  return $all
}

# Does one of this cluster's own components hold the lock file open? Only a
# cluster started by an older cluster.sh does (its processes inherited the fd).
lock_held_by_components() {
  local c pid f
  for c in "${COMPONENTS[@]}"; do
    pid="$(pid_alive "$c")" || continue
    for f in /proc/"$pid"/fd/*; do
      [[ "$(readlink "$f" 2>/dev/null)" == "$STATE/.lock" ]] && return 0
    done
  done
  return 1
}

# One up/down at a time per state dir. When the cluster's own components hold
# the lock (see above), go on: `up` and `down` stop them.
lock_state() {
  exec 8>"$STATE/.lock"
  flock -w 5 8 && return 0
  if lock_held_by_components; then
    log "the lock is held by this cluster's own processes (started by an older cluster.sh); going on"
    return 0
  fi
  flock -w 600 8 || { echo "[cluster] another cluster.sh holds $STATE/.lock" >&2; exit 1; }
}

main() {
case "${1:-}" in
  up)
    lock_state
    do_up
    ;;
  down)
    lock_state
    do_down
    log "down (state kept in $STATE)"
    ;;
  status) do_status ;;
  env)
    KUBEWAN_TOOLS_BIN="${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}/tools/bin"
    [[ -f $STATE/env.sh ]] && cat "$STATE/env.sh" || { echo "no cluster state in $STATE" >&2; exit 1; }
    ;;
  logs)
    pod="${2:?usage: cluster.sh logs POD [NAMESPACE]}"
    ns="${3:-default}"
    found=0
    for d in "$STATE/agent/pods/${ns}_${pod}_"*; do
      [[ -f $d/container.log ]] || continue
      found=1
      echo "==> $d/container.log <==" >&2
      cat "$d/container.log"
    done
    ((found)) || { echo "no logs for pod $ns/$pod in $STATE/agent/pods" >&2; exit 1; }
    ;;
  *)
    sed -n '2,34p' "$0" >&2
    exit 2
    ;;
esac
}

# Everything is parsed before anything runs (bash reads a script as it goes;
# this keeps a running cluster.sh safe from edits of the file).
main "$@"; exit $?
