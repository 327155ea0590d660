#!/usr/bin/env bash
# Prepares, on this machine (no GPU needed), everything the GPU benchmark
# carries to the device machine in .gpu-bench/ (git-ignored through
# .git/info/exclude; the device tool takes at most 64 MiB of working tree):
#   - the CUDA runner for the GPU's compute capability (scripts/build-cuda.sh;
#     cached, ~50 min cold on 2 cores), stripped and gzipped (kubewan-runner.gz);
#   - the wheels the device image lacks: diffusers (PyTorch, transformers,
#     safetensors, nvidia-ml-py are there) and importlib_metadata.
# Then prints the one device call to make (scripts/gpu-bench/run.sh).
#
# Usage: scripts/gpu-bench/prepare.sh [--arch 90|80]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
arch=90
while [[ $# -gt 0 ]]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
out="$root/.gpu-bench"
# The device image's Python (3.12) and the versions the benchmark was written against.
wheels=(diffusers==0.42.1 importlib_metadata==8.7.0)

"$root/scripts/build-cuda.sh" --arch "$arch"
mkdir -p "$out"
strip -o "$out/kubewan-runner" "$root/target/cuda/kubewan-runner-sm$arch"
gzip -9 -f "$out/kubewan-runner"
rm -f "$out"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$out" "${wheels[@]}"

exclude="$(git -C "$root" rev-parse --git-common-dir)/info/exclude"
grep -qx '/.gpu-bench/' "$exclude" 2>/dev/null || echo '/.gpu-bench/' >>"$exclude"

du -ah "$out"
echo "tracked files: $(git -C "$root" ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes (the device tool takes 64 MiB in all)"
echo 'device call: run(command="bash scripts/gpu-bench/run.sh", carry=[".gpu-bench"], timeout_s=600)'
