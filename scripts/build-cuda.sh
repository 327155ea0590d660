#!/usr/bin/env bash
# Builds kubewan-runner with CUDA (candle's `cuda` feature) on a machine that has
# neither a GPU nor a CUDA toolkit, as shared/cuda-build.md describes:
#
#   1. the CUDA 13.0 compiler, runtime and math libraries from NVIDIA's wheels on
#      PyPI, unpacked once into $KUBEWAN_CACHE_DIR/cuda-13.0 (it then serves as
#      CUDA_HOME). Pinned to 13.0: a newer nvcc writes PTX that a 580 (CUDA 13.0)
#      driver refuses when candle JIT-loads its kernels. The CUTLASS 3.5.0 headers
#      for the FlashAttention kernels (models/flash-attn) come from the
#      nvidia-cutlass wheel in the same folder;
#   2. a stub libcuda.so (soname libcuda.so.1) exporting every driver symbol that
#      cudarc declares, ONLY for the link: at run time the driver's real
#      libcuda.so.1 is used (never put the stub on LD_LIBRARY_PATH);
#   3. `cargo build --release -p kubewan-runner --features cuda` per compute
#      capability into its own cached target dir.
#
# Usage: scripts/build-cuda.sh [--arch 90|80]... [--out DIR]
#   --arch  compute capability to build for (repeatable; default: 90 and 80).
#           90 = Hopper (H100/H200, sm_90a kernels), 80 = Ampere (A100).
#   --out   where the binaries go (default: target/cuda/): kubewan-runner-sm90, ...
#   --env   only prepare the toolkit and print the `export` lines a cargo build needs.
# Environment: KUBEWAN_CACHE_DIR (default ~/.cache/kubewan), CARGO_BUILD_JOBS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="${KUBEWAN_CACHE_DIR:-$HOME/.cache/kubewan}"
toolkit="$cache/cuda-13.0"
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
  nvidia-cutlass==3.5.0.0
)
archs=()
out="$root/target/cuda"
env_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --arch) archs+=("$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --env) env_only=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#archs[@]} -gt 0 ]] || archs=(90 80)
log() { echo "[build-cuda $(date +%H:%M:%S)] $*" >&2; }

cutlass_include="$toolkit/cutlass_library/source/include"

install_toolkit() {
  local home="$toolkit/nvidia/cu13"
  if [[ -x $home/bin/nvcc && -f $home/lib/stubs/libcuda.so && -f $cutlass_include/cute/tensor.hpp ]]; then
    return
  fi
  log "installing the CUDA 13.0 toolkit wheels into $toolkit"
  rm -rf "$toolkit"
  mkdir -p "$toolkit"
  # One pip call: a second `pip install --target` into the same folder installs nothing.
  python3 -m pip install -q --no-deps --only-binary=:all: --target "$toolkit" "${wheels[@]}"
  # What the linker and the build scripts expect of a toolkit: unversioned
  # library names and a lib64 folder.
  (
    cd "$home/lib"
    for lib in cublas cublasLt nvrtc cudart; do ln -sf "lib$lib.so.13" "lib$lib.so"; done
    ln -sf libcurand.so.10 libcurand.so
  )
  ln -sfn lib "$home/lib64"
  make_driver_stub "$home/lib/stubs"
}

# Every cu* function cudarc's driver bindings declare, as a C stub returning
# CUDA_ERROR_STUB_LIBRARY (34): enough to link, useless to run.
make_driver_stub() {
  local dir="$1" cudarc
  cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -1)
  if [[ -z $cudarc ]]; then
    (cd "$root" && cargo fetch -q)
    cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d -name 'cudarc-*' | sort -V | tail -1)
  fi
  [[ -f $cudarc/src/driver/sys/mod.rs ]] || { echo "cudarc sources not found" >&2; exit 1; }
  mkdir -p "$dir"
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
    awk '{printf "int %s(void) { return 34; }\n", $1}' >"$dir/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/libcuda.so" "$dir/libcuda-stub.c"
  log "driver stub: $(grep -c . "$dir/libcuda-stub.c") symbols from $(basename "$cudarc")"
}

cuda_env() {
  local home="$toolkit/nvidia/cu13"
  export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home" CUDA_TOOLKIT_ROOT_DIR="$home"
  export NVCC="$home/bin/nvcc" PATH="$home/bin:$PATH"
  export CUDARC_CUDA_VERSION=13000
  export CUDAFORGE_THREADS="${CARGO_BUILD_JOBS:-$(nproc)}"
  export KUBEWAN_CUTLASS_INCLUDE="$cutlass_include"
  # The stub only for the link step.
  export RUSTFLAGS="${RUSTFLAGS:-} -L native=$home/lib/stubs -L native=$home/lib"
}

install_toolkit
cuda_env
if [[ $env_only == 1 ]]; then
  for v in CUDA_HOME CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR NVCC CUDARC_CUDA_VERSION CUDAFORGE_THREADS KUBEWAN_CUTLASS_INCLUDE RUSTFLAGS; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  printf 'export PATH=%q:"$PATH"\n' "$CUDA_HOME/bin"
  exit 0
fi

mkdir -p "$out"
for arch in "${archs[@]}"; do
  target="$cache/target-cuda-sm$arch"
  log "building kubewan-runner for sm_$arch into $target (cold: about 25 min on 2 idle cores, an hour on a busy machine; warm: the workspace crates only)"
  start=$SECONDS
  CUDA_COMPUTE_CAP="$arch" CARGO_TARGET_DIR="$target" \
    cargo build --release --locked -p kubewan-runner --features cuda --manifest-path "$root/Cargo.toml"
  cp "$target/release/kubewan-runner" "$out/kubewan-runner-sm$arch"
  log "sm_$arch done in $((SECONDS - start)) s: $out/kubewan-runner-sm$arch"
done
