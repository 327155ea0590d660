#!/usr/bin/env bash
# kubewan's own test control plane: etcd, kube-apiserver, kube-controller-manager
# and kube-scheduler (v1.20.2), and one GPU node run by a real kubelet (v1.20.2,
# built from the same source) over its own containerd: every pod is a real
# container from its image, so securityContext, read-only mounts, service-account
# tokens, in-cluster configuration, `kubectl logs`, probes, deadlines and OOM
# kills are the kubelet's and the runtime's, not imitations. See README.md here.
#
#   tests/k8s/cluster.sh up                  start everything (installs tools when missing)
#   tests/k8s/cluster.sh down                stop exactly what `up` started, the node's
#                                            containers, bridge, NAT rule and cgroups included
#   tests/k8s/cluster.sh status              say what is running (exit 0 only when all is)
#   tests/k8s/cluster.sh env                 print the `export ...` lines for this cluster
#   tests/k8s/cluster.sh load-images IMAGE…  copy images from the local containers storage
#                                            (podman/buildah) into the node's containerd
#                                            (there is no registry: pods use what is loaded)
#   tests/k8s/cluster.sh pause-node          SIGSTOP the kubelet: the node stops answering while
#                                            its containers run on (a node lost, as the control
#                                            plane sees it; e2e fault tests)
#   tests/k8s/cluster.sh resume-node         SIGCONT the kubelet: the node answers again
#
# Environment:
#   KUBEWAN_CLUSTER_DIR   state dir (pids, logs, certs, etcd data, the node's
#                         containerd, kubelet and CNI folders); default ~/.cache/kubewan/cluster
#   KUBECONFIG            when set, `up` writes the admin kubeconfig there too
#                         (always written to $KUBEWAN_CLUSTER_DIR/kubeconfig)
#   KUBEWAN_NODE_NAME     default gpu-node-1
#   KUBEWAN_NODE_GPUS     nvidia.com/gpu capacity the node advertises, default 4
#   KUBEWAN_HOST_ROOT     what the node sees as /var/lib/kubewan is
#                         $KUBEWAN_HOST_ROOT/var/lib/kubewan (hostPath volumes under
#                         /var/lib/kubewan, e.g. the examples'); default $KUBEWAN_CLUSTER_DIR/host
#   KUBEWAN_UP_TIMEOUT    seconds to wait for each component, default 90
#   KUBEWAN_AUDIT_POLICY  an audit policy file: the API server then writes its
#                         audit log (JSON lines) to $KUBEWAN_CLUSTER_DIR/logs/audit.log
#                         (scripts/load-bench.sh counts the operator's writes there)
#   KUBEWAN_CACHE_DIR     tool cache of install-tools.sh, default ~/.cache/kubewan
#
# Needs root (containerd, kubelet, a bridge, one iptables NAT rule, cgroups).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${KUBEWAN_CLUSTER_DIR:-$HOME/.cache/kubewan/cluster}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
NODE="${KUBEWAN_NODE_NAME:-gpu-node-1}"
GPUS="${KUBEWAN_NODE_GPUS:-4}"
HOST_ROOT="${KUBEWAN_HOST_ROOT:-$STATE/host}"
TIMEOUT="${KUBEWAN_UP_TIMEOUT:-90}"
AUDIT_POLICY="${KUBEWAN_AUDIT_POLICY:-}"
ADMIN_KUBECONFIG="$STATE/kubeconfig"
NODE_DIR="$STATE/node"
CONTAINERD_SOCK="$NODE_DIR/containerd/containerd.sock"
PAUSE_IMAGE="localhost/kubewan/pause:3.4"
# The node's paths that are this cluster's own folders (bind mounts in the
# node's private mount namespace), so that clusters in other state dirs on the
# same machine never share them.
NODE_MOUNTS=(/var/lib/kubewan /var/log/pods /var/log/containers)
# Components in start order.
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet)

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
    # A process left stopped (pause-node) handles SIGTERM only once continued.
    kill -CONT "$pid" 2>/dev/null || true
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

# ------------------------------------------------------------ the node's network and cgroups
# This cluster's node identity, derived from its state dir so that clusters in
# different state dirs get different bridges, pod subnets, NAT chains and cgroups.
node_identity() {
  local id
  id=$(printf '%s' "$STATE" | sha256sum | cut -c1-8)
  BRIDGE="kw$id"
  NAT_CHAIN="KUBEWAN-$id"
  CGROUP_ROOT="/kubewan/$id"
}

subnet_in_use() { # A.B.C (a /24)
  ip -4 -o addr show | grep " inet $1\." >/dev/null || ip -4 route show | grep "^$1\." >/dev/null
}

# A free 10.x.y.0/24 for the pods; the node itself is .1 on the bridge.
pick_pod_subnet() {
  local seed tries=0 prefix
  seed=$((16#$(printf '%s' "$STATE" | sha256sum | cut -c9-12)))
  while ((tries++ < 64)); do
    prefix="10.$((200 + (seed + tries * 7919) % 50)).$(((seed / 50 + tries * 104729) % 256))"
    if ! subnet_in_use "$prefix"; then
      POD_CIDR="$prefix.0/24"
      NODE_IP="$prefix.1"
      return
    fi
  done
  echo "[cluster] ERROR: no free 10.200-249.x.0/24 subnet for the pods" >&2
  return 1
}

# The cgroup v1 hierarchies (or the cgroup2 mount) under which the kubelet
# creates its pod cgroups.
cgroup_mounts() { awk '$3 == "cgroup" || ($3 == "cgroup2" && $2 == "/sys/fs/cgroup") {print $2}' /proc/mounts; }

make_cgroup_root() {
  local mnt dir part path
  for mnt in $(cgroup_mounts); do
    path="$mnt"
    for part in ${CGROUP_ROOT//\// }; do
      dir="$path/$part"
      if [[ ! -d $dir ]]; then
        mkdir "$dir"
        # A new cpuset starts with no CPUs and no memory nodes: inherit them.
        if [[ -f $path/cpuset.cpus ]]; then
          cat "$path/cpuset.cpus" >"$dir/cpuset.cpus"
          cat "$path/cpuset.mems" >"$dir/cpuset.mems"
        fi
      fi
      path="$dir"
    done
  done
}

# Processes still in this node's cgroups (pod processes left by a killed runtime).
cgroup_pids() {
  local mnt
  for mnt in $(cgroup_mounts); do
    [[ -d $mnt$CGROUP_ROOT ]] || continue
    find "$mnt$CGROUP_ROOT" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -un
}

remove_cgroup_root() {
  local mnt
  for mnt in $(cgroup_mounts); do
    [[ -d $mnt$CGROUP_ROOT ]] && find "$mnt$CGROUP_ROOT" -depth -type d -exec rmdir {} + 2>/dev/null
    # The shared parent goes with the last cluster.
    rmdir "$mnt$(dirname "$CGROUP_ROOT")" 2>/dev/null || true
  done
}

network_up() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # The `kubernetes` Service (10.0.0.1:443, what in-cluster clients use) leads to
  # the API server, for this cluster's pods only: a one-rule stand-in for
  # kube-proxy, whose chains are machine-wide and would fight another cluster's.
  iptables -t nat -N "$NAT_CHAIN"
  iptables -t nat -A "$NAT_CHAIN" -s "$POD_CIDR" -d 10.0.0.1/32 -p tcp --dport 443 \
    -j DNAT --to-destination "$NODE_IP:$API_PORT"
  iptables -t nat -I PREROUTING -m comment --comment "kubewan test cluster $STATE" -j "$NAT_CHAIN"
}

network_down() {
  while iptables -t nat -D PREROUTING -m comment --comment "kubewan test cluster $STATE" -j "$NAT_CHAIN" 2>/dev/null; do :; done
  iptables -t nat -F "$NAT_CHAIN" 2>/dev/null && iptables -t nat -X "$NAT_CHAIN" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
}

ctr_node() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }

# containerd shims of this node (they outlive containerd while their container runs).
shim_pids() {
  local p
  for p in /proc/[0-9]*; do
    { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -- "-address $CONTAINERD_SOCK " >/dev/null && echo "${p#/proc/}"
  done
  return 0
}

# Stops the node's containers: through the kubelet while it runs (so that it
# tears pod networking down), then containerd's remaining tasks, then whatever
# is still in the node's cgroups.
stop_node() {
  if pid_alive kubelet >/dev/null && pid_alive kube-apiserver >/dev/null; then
    kc delete pods --all --all-namespaces --force --grace-period=0 --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)) && [[ -n "$(ctr_node tasks list --quiet 2>/dev/null)" ]]; do sleep 0.5; done
  fi
  stop_component kubelet
  if pid_alive containerd >/dev/null; then
    local task
    for task in $(ctr_node tasks list --quiet 2>/dev/null); do
      ctr_node tasks kill --signal SIGKILL "$task" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for task in $(ctr_node tasks list --quiet 2>/dev/null); do
      ctr_node tasks delete --force "$task" >/dev/null 2>&1 || true
    done
  fi
  stop_component containerd
  local pid
  for pid in $(shim_pids) $(cgroup_pids); do
    log "killing leftover node process $pid"
    kill -KILL "$pid" 2>/dev/null || true
  done
}

do_down() {
  if [[ -f $STATE/node.env ]]; then
    # shellcheck disable=SC1091
    source "$STATE/node.env"
  else
    node_identity
  fi
  # Nothing new is created or scheduled while the pods go.
  stop_component kube-controller-manager
  stop_component kube-scheduler
  stop_node
  stop_component kube-apiserver
  stop_component etcd
  network_down
  remove_cgroup_root
  rm -f "$STATE/node.env"
}

# ------------------------------------------------------------ helpers
# Ports are drawn below the kernel's ephemeral range (outgoing connections
# take ports from there, and a listener cannot bind one in use), and must not
# be used by any socket, listening or not. `free_port NAME` sets the variable
# NAME: it must run in this shell, not in a $(...) subshell, or the ports it
# has drawn are forgotten and two components can draw the same one (the API
# server and the controller manager once did, in CI).
used_ports=()
free_port() { # variable
  local port tries=0 lo hi
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || lo=32768
  local top=$((lo > 12000 ? lo : 32768))
  while ((tries++ < 200)); do
    port=$((10000 + RANDOM % (top - 10000)))
    [[ " ${used_ports[*]:-} " == *" $port "* ]] && continue
    if ! ss -Htan "sport = :$port" 2>/dev/null | grep . >/dev/null; then
      used_ports+=("$port")
      printf -v "$1" '%s' "$port"
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
  echo "export KUBEWAN_CONTAINERD_ADDRESS='$CONTAINERD_SOCK'"
  echo "export PATH='$KUBEWAN_TOOLS_BIN':\"\$PATH\""
}

# The pause image (the pod sandbox) as a docker archive, built once from the
# `pause` that install-tools.sh compiled.
pause_archive() {
  local archive
  archive="$(dirname "$KUBEWAN_K8S_BIN")/pause-image.tar"
  if [[ ! -s $archive ]]; then
    local c
    c=$(buildah from scratch)
    buildah copy --quiet "$c" "$KUBEWAN_K8S_BIN/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 \
      --label org.opencontainers.image.title=pause "$c"
    buildah commit --quiet "$c" "$PAUSE_IMAGE" >/dev/null
    buildah rm "$c" >/dev/null
    podman save --quiet --format docker-archive -o "$archive.tmp" "$PAUSE_IMAGE"
    mv "$archive.tmp" "$archive"
  fi
  echo "$archive"
}

# ------------------------------------------------------------ up
write_node_config() {
  mkdir -p "$NODE_DIR/containerd" "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam" "$NODE_DIR/kubelet" \
    "$NODE_DIR/log/pods" "$NODE_DIR/log/containers" "$HOST_ROOT/var/lib/kubewan"
  cat >"$NODE_DIR/containerd/config.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This machine does not grant CAP_SYS_RESOURCE: a negative oom_score_adj
  # (the kubelet's -998 for sandboxes) cannot be set, so clamp it instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
  cat >"$NODE_DIR/cni/net.d/10-kubewan.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "$BRIDGE",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "dataDir": "$NODE_DIR/cni/ipam",
             "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
             "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
  cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
# Only the API server (its kubelet client certificate, from this cluster's CA) may call it.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
# Images are loaded, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No eviction on a shared, busy test machine.
evictionHard: {}
# The iptables chains a kubelet shares with kube-proxy are machine-wide; none are needed here.
makeIPTablesUtilChains: false
serializeImagePulls: false
EOF
}

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
  [[ $(id -u) -eq 0 ]] || { echo "[cluster] ERROR: the test node (containerd, kubelet, a bridge, an iptables rule, cgroups) needs root" >&2; exit 1; }
  command -v buildah >/dev/null && command -v podman >/dev/null ||
    { echo "[cluster] ERROR: buildah and podman are needed (apt-get install buildah podman)" >&2; exit 1; }
  if ((running > 0)) || [[ -f $STATE/node.env ]]; then
    log "stopping what is left of an earlier cluster in $STATE"
    do_down
  fi
  local t0=$SECONDS

  eval "$("$SCRIPT_DIR/install-tools.sh" --env)"
  KUBECTL="$KUBEWAN_TOOLS_BIN/kubectl"

  # A fresh cluster every time: forget the previous one's state.
  rm -rf "$STATE/etcd" "$STATE/pki" "$STATE/logs" "$STATE/pids" "$STATE/kubeconfigs" "$NODE_DIR" "$HOST_ROOT"
  mkdir -p "$STATE/logs" "$STATE/pids" "$STATE/kubeconfigs" "$HOST_ROOT"

  node_identity
  pick_pod_subnet
  free_port ETCD_PORT
  free_port ETCD_PEER_PORT
  free_port API_PORT
  free_port CM_PORT
  free_port SCHED_PORT
  free_port KUBELET_PORT
  free_port KUBELET_HEALTHZ_PORT
  # What `down` needs to undo, even after a partial `up`.
  cat >"$STATE/node.env" <<EOF
BRIDGE=$BRIDGE
NAT_CHAIN=$NAT_CHAIN
CGROUP_ROOT=$CGROUP_ROOT
POD_CIDR=$POD_CIDR
NODE_IP=$NODE_IP
EOF

  # PKI: a CA, a server cert for loopback, the node's address and the
  # `kubernetes` Service, the API server's client cert for the kubelet, the
  # service-account key.
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
      "subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext
    openssl req -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client"
    printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
      "extendedKeyUsage=clientAuth" >client.ext
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kubelet-client.crt \
      -days 3650 -extfile client.ext
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$STATE/logs/pki.log" 2>&1 || fail pki "openssl failed"

  # Static tokens, one identity per component (all cluster admins: this is a
  # test cluster; the operator's own RBAC is enforced on its ServiceAccount).
  local tok_admin tok_cm tok_sched tok_kubelet
  tok_admin=$(openssl rand -hex 24)
  tok_cm=$(openssl rand -hex 24)
  tok_sched=$(openssl rand -hex 24)
  tok_kubelet=$(openssl rand -hex 24)
  cat >"$PKI/tokens.csv" <<EOF
$tok_admin,kubewan-admin,uid-admin,"system:masters"
$tok_cm,system:kube-controller-manager,uid-cm,"system:masters"
$tok_sched,system:kube-scheduler,uid-sched,"system:masters"
$tok_kubelet,system:node:$NODE,uid-node,"system:masters,system:nodes"
EOF
  chmod 600 "$PKI/tokens.csv"
  write_kubeconfig "$ADMIN_KUBECONFIG" kubewan-admin "$tok_admin"
  write_kubeconfig "$STATE/kubeconfigs/controller-manager" system:kube-controller-manager "$tok_cm"
  write_kubeconfig "$STATE/kubeconfigs/scheduler" system:kube-scheduler "$tok_sched"
  write_kubeconfig "$STATE/kubeconfigs/kubelet" "system:node:$NODE" "$tok_kubelet"

  network_up || fail pki "setting up the node's bridge $BRIDGE ($POD_CIDR) or NAT chain $NAT_CHAIN failed"

  # etcd
  start_component etcd "$STATE/logs/etcd.log" "$KUBEWAN_ETCD" --name kubewan --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kubewan=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
  wait_for etcd "etcd health on port $ETCD_PORT" curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

  # kube-apiserver: on every address (pods reach it on the node's bridge address),
  # advertised at the node's address (the `kubernetes` endpoint).
  local audit_args=()
  if [[ -n $AUDIT_POLICY ]]; then
    [[ -f $AUDIT_POLICY ]] || fail kube-apiserver "KUBEWAN_AUDIT_POLICY: no file $AUDIT_POLICY"
    cp "$AUDIT_POLICY" "$PKI/audit-policy.yaml"
    audit_args=(--audit-policy-file="$PKI/audit-policy.yaml" --audit-log-path="$STATE/logs/audit.log"
      --audit-log-format=json --audit-log-maxsize=0)
  fi
  start_component kube-apiserver "$STATE/logs/kube-apiserver.log" "$KUBEWAN_K8S_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port="$API_PORT" --insecure-port=0 \
    --tls-cert-file="$PKI/server.crt" --tls-private-key-file="$PKI/server.key" --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/kubelet-client.crt" --kubelet-client-key="$PKI/kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --token-auth-file="$PKI/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    --enable-priority-and-fairness=false --profiling=false --v=1 "${audit_args[@]}"
  wait_for kube-apiserver "kube-apiserver /readyz on port $API_PORT" kc get --raw /readyz

  # kube-controller-manager (service accounts and their tokens, garbage
  # collector, Deployments, PV binder, ...; the node lifecycle controller is off:
  # a loaded 2-core machine must not get its only node evicted)
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

  # The node: containerd in a private mount namespace where NODE_MOUNTS are this
  # cluster's folders, and the kubelet in the same namespace.
  write_node_config
  make_cgroup_root || fail kubelet "creating the node's cgroups $CGROUP_ROOT failed"
  local m binds=()
  for m in "${NODE_MOUNTS[@]}"; do mkdir -p "$m"; done
  binds=("$HOST_ROOT/var/lib/kubewan" "$NODE_DIR/log/pods" "$NODE_DIR/log/containers")
  start_component containerd "$STATE/logs/containerd.log" unshare --mount --propagation private -- sh -c '
    mount --bind "$1" /var/lib/kubewan && mount --bind "$2" /var/log/pods &&
      mount --bind "$3" /var/log/containers && exec containerd --config "$4"' node-namespace \
    "${binds[@]}" "$NODE_DIR/containerd/config.toml"
  wait_for containerd "containerd on $CONTAINERD_SOCK" ctr --address "$CONTAINERD_SOCK" version
  ctr_node images import "$(pause_archive)" >/dev/null || fail containerd "importing $PAUSE_IMAGE failed"

  local ns_pid
  ns_pid=$(pid_alive containerd)
  start_component kubelet "$STATE/logs/kubelet.log" nsenter --mount="/proc/$ns_pid/ns/mnt" -- \
    "$KUBEWAN_K8S_BIN/kubelet" --config="$NODE_DIR/kubelet/config.yaml" \
    --kubeconfig="$STATE/kubeconfigs/kubelet" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CONTAINERD_SOCK" \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --root-dir="$NODE_DIR/kubelet" --cert-dir="$NODE_DIR/kubelet/pki" \
    --hostname-override="$NODE" --node-ip="$NODE_IP" \
    --node-labels="nvidia.com/gpu.present=true,kubewan.dev/test-node=true" --v=1
  wait_for kubelet "Node $NODE to register" kc get node "$NODE"
  # No device plugin (no GPU here): advertise the GPUs as an extended resource,
  # which the kubelet keeps and admits pods against.
  kc patch node "$NODE" --subresource=status --type=json -p "[
    {\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$GPUS\"},
    {\"op\": \"add\", \"path\": \"/status/allocatable/nvidia.com~1gpu\", \"value\": \"$GPUS\"}]" >/dev/null ||
    fail kubelet "advertising nvidia.com/gpu on Node $NODE failed"
  wait_for kubelet "Node $NODE Ready" bash -c \
    "[[ \"\$('$KUBECTL' --kubeconfig '$ADMIN_KUBECONFIG' get node '$NODE' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" == True ]]"
  # The TaintNodesByCondition admission plugin taints a new node not-ready;
  # with the node lifecycle controller off nobody else removes it.
  if kc get node "$NODE" -o jsonpath='{.spec.taints[*].key}' | grep node.kubernetes.io/not-ready >/dev/null; then
    kc taint node "$NODE" node.kubernetes.io/not-ready- >/dev/null || fail kubelet "removing the not-ready taint failed"
  fi

  cat >"$STATE/cluster.env" <<EOF
API_SERVER=https://127.0.0.1:$API_PORT
ETCD_PORT=$ETCD_PORT
API_PORT=$API_PORT
CM_PORT=$CM_PORT
SCHED_PORT=$SCHED_PORT
KUBELET_PORT=$KUBELET_PORT
NODE=$NODE
NODE_IP=$NODE_IP
HOST_ROOT=$HOST_ROOT
EOF
  KUBECONFIG_OUT="$ADMIN_KUBECONFIG"
  if [[ -n ${KUBECONFIG:-} ]]; then
    KUBECONFIG_OUT="${KUBECONFIG%%:*}"
    mkdir -p "$(dirname "$KUBECONFIG_OUT")"
    cp "$ADMIN_KUBECONFIG" "$KUBECONFIG_OUT"
  fi
  print_env >"$STATE/env.sh"
  log "cluster up in $((SECONDS - t0)) s: API server https://127.0.0.1:$API_PORT, node $NODE at $NODE_IP (pods $POD_CIDR, $GPUS x nvidia.com/gpu)"
  kc get nodes -o wide >&2 || true
  echo "kubeconfig: $KUBECONFIG_OUT"
  echo "env:        source $STATE/env.sh"
}

do_load_images() {
  pid_alive containerd >/dev/null || { echo "[cluster] ERROR: the node's containerd is not running (cluster.sh up)" >&2; exit 1; }
  local image t0
  for image in "$@"; do
    t0=$SECONDS
    podman image exists "$image" || { echo "[cluster] ERROR: no image $image in the local containers storage (scripts/build-images.sh)" >&2; exit 1; }
    podman save --quiet --format docker-archive "$image" | ctr_node images import - >/dev/null ||
      { echo "[cluster] ERROR: loading $image into the node's containerd failed" >&2; exit 1; }
    log "loaded $image into node $NODE ($((SECONDS - t0)) s)"
  done
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
  if [[ -f $STATE/cluster.env ]] && pid_alive kube-apiserver >/dev/null; then
    echo "api server:              $(grep ^API_SERVER= "$STATE/cluster.env" | cut -d= -f2-)"
    echo "kubeconfig:              $ADMIN_KUBECONFIG"
    echo "node address:            $(grep ^NODE_IP= "$STATE/cluster.env" | cut -d= -f2-)"
    echo "host root:               $(grep ^HOST_ROOT= "$STATE/cluster.env" | cut -d= -f2-)"
    local kubectl="${KUBEWAN_TOOLS_BIN:-${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}/tools/bin}/kubectl"
    [[ -x $kubectl ]] && "$kubectl" --kubeconfig "$ADMIN_KUBECONFIG" get nodes 2>&1 || true
  fi
  return $all
}

# One up/down at a time per state dir.
lock_state() {
  exec 8>"$STATE/.lock"
  flock -w 600 8 || { echo "[cluster] another cluster.sh holds $STATE/.lock" >&2; exit 1; }
}

main() {
  KUBECTL="${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}/tools/bin/kubectl"
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
      [[ -f $STATE/env.sh ]] && cat "$STATE/env.sh" || { echo "no cluster state in $STATE" >&2; exit 1; }
      ;;
    load-images)
      shift
      [[ $# -gt 0 ]] || { echo "usage: cluster.sh load-images IMAGE..." >&2; exit 2; }
      do_load_images "$@"
      ;;
    pause-node | resume-node)
      local pid signal=STOP
      [[ $1 == resume-node ]] && signal=CONT
      pid=$(pid_alive kubelet) || { echo "[cluster] ERROR: the kubelet is not running (cluster.sh up)" >&2; exit 1; }
      kill -s "$signal" "$pid"
      log "kubelet (pid $pid) sent SIG$signal"
      ;;
    *)
      sed -n '2,35p' "$0" >&2
      exit 2
      ;;
  esac
}

# Everything is parsed before anything runs (bash reads a script as it goes;
# this keeps a running cluster.sh safe from edits of the file).
main "$@"; exit $?
