#!/usr/bin/env bash
# Builds kubewan's container images from images/*.Containerfile:
#
#   <registry>/kubewan-operator:<appVersion>        images/operator.Containerfile
#   <registry>/kubewan-runner:<appVersion>          images/runner.Containerfile (CPU)
#   <registry>/kubewan-runner:<appVersion>-cuda     images/runner-cuda.Containerfile,
#                                                   only with --cuda-binary
#
# <registry> defaults to the chart's image repositories (ghcr.io/kubewan), and
# <appVersion> is charts/kubewan/Chart.yaml's, so `helm install` with default
# values runs exactly these images. The binaries are compiled by cargo here and
# copied in (see the Containerfiles for why); each build context holds only its
# binary. Images go to the local containers storage (podman/buildah; honours
# CONTAINERS_STORAGE_CONF); push them with `podman push`.
#
#   scripts/build-images.sh [--profile release|dev] [--base public|local|IMAGE]
#                           [--registry PREFIX] [--cuda-binary PATH] [--cuda-base IMAGE]
#
#   --profile   cargo profile of the binaries (env KUBEWAN_IMAGE_PROFILE; default
#               release). The tests use dev: CI has those binaries already (its
#               dependencies are optimised, only kubewan's own crates are not),
#               and a release build would cost another ~15 min on 2 cores.
#   --base      public: gcr.io/distroless/cc-debian12 (pulled; the default for users),
#               local: localhost/kubewan-base:cc-debian12, the same Debian 12
#               packages without a registry (tests/k8s/install-tools.sh base-image),
#               or any IMAGE (env KUBEWAN_IMAGE_BASE; default public)
#   --registry  image name prefix (env KUBEWAN_IMAGE_REGISTRY; default ghcr.io/kubewan)
#   --cuda-binary PATH  also build the CUDA runner from this binary (built with
#               candle's `cuda` feature, e.g. by scripts/build-cuda.sh); its base is
#               --cuda-base (default: the Containerfile's nvidia/cuda runtime image)
#
# Prints the built image names, one per line, on stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile="${KUBEWAN_IMAGE_PROFILE:-release}"
base="${KUBEWAN_IMAGE_BASE:-public}"
registry="${KUBEWAN_IMAGE_REGISTRY:-ghcr.io/kubewan}"
cuda_binary=""
cuda_base=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --registry) registry="$2"; shift 2 ;;
    --cuda-binary) cuda_binary="$2"; shift 2 ;;
    --cuda-base) cuda_base="$2"; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[build-images $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[build-images] ERROR: $*" >&2; exit 1; }

command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah podman runc)"
[[ -z $cuda_binary || -x $cuda_binary ]] || die "--cuda-binary $cuda_binary is not an executable file"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' charts/kubewan/Chart.yaml)
[[ -n $version ]] || die "no appVersion in charts/kubewan/Chart.yaml"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain 2>/dev/null) ]] || revision="$revision-dirty"

case "$profile" in
  release) cargo_flags=(--release) ;;
  dev) cargo_flags=() ;;
  *) die "--profile must be release or dev, not $profile" ;;
esac
log "cargo build ($profile) of kubewan-operator and kubewan-runner"
cargo build "${cargo_flags[@]}" -p kubewan-operator -p kubewan-runner >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin_dir="$target/$([[ $profile == dev ]] && echo debug || echo release)"

# Retagging leaves the previous image of a name behind, untagged: remove it
# (only it, and only when no tag or container uses it any more).
image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }
drop_replaced() { # previous-id image
  local now
  now=$(image_id "$2")
  [[ -n $1 && $1 != "$now" ]] && podman rmi "$1" >/dev/null 2>&1 || true
}

base_args=()
case "$base" in
  public) ;;
  local)
    eval "$(tests/k8s/install-tools.sh base-image --env)"
    log "importing $KUBEWAN_BASE_TAR as localhost/kubewan-base:cc-debian12"
    previous=$(image_id localhost/kubewan-base:cc-debian12)
    podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      "$KUBEWAN_BASE_TAR" localhost/kubewan-base:cc-debian12 >/dev/null
    base_args=(--build-arg BASE=localhost/kubewan-base:cc-debian12) ;;
  *) base_args=(--build-arg BASE="$base") ;;
esac

contexts=()
trap 'rm -rf "${contexts[@]}"' EXIT
# build IMAGE CONTAINERFILE BINARY_PATH NAME_IN_CONTEXT [buildah args...]
build() {
  local image="$1" containerfile="$2" binary="$3" name="$4"
  shift 4
  local ctx
  ctx=$(mktemp -d "${TMPDIR:-/tmp}/kubewan-image.XXXXXX")
  contexts+=("$ctx")
  cp "$binary" "$ctx/$name"
  local t0=$SECONDS previous
  previous=$(image_id "$image")
  buildah bud --isolation chroot --layers=false --quiet \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" "$@" \
    -f "images/$containerfile" -t "$image" "$ctx" >/dev/null
  rm -rf "$ctx"
  drop_replaced "$previous" "$image"
  log "built $image ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec) in $((SECONDS - t0)) s)"
  echo "$image"
}

build "$registry/kubewan-operator:$version" operator.Containerfile "$bin_dir/kubewan-operator" kubewan-operator "${base_args[@]}"
build "$registry/kubewan-runner:$version" runner.Containerfile "$bin_dir/kubewan-runner" kubewan-runner "${base_args[@]}"
if [[ -n $cuda_binary ]]; then
  cuda_args=(--build-arg RUNNER_BINARY=kubewan-runner-cuda)
  [[ -n $cuda_base ]] && cuda_args+=(--build-arg BASE="$cuda_base")
  build "$registry/kubewan-runner:$version-cuda" runner-cuda.Containerfile "$cuda_binary" kubewan-runner-cuda "${cuda_args[@]}"
fi
# The previous base goes last: the images built on it had to go first.
if [[ $base == local ]]; then drop_replaced "$previous" localhost/kubewan-base:cc-debian12; fi
