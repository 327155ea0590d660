#!/usr/bin/env bash
# The GPU benchmark as ONE command on a lent GPU machine (no network, no Rust):
# unpacks the CUDA runner that scripts/gpu-bench/prepare.sh left in .gpu-bench/,
# installs the carried wheels (diffusers and its one missing dependency) into
# /tmp, puts the CUDA libraries of the machine's image on the library path,
# checks that the runner finds every shared library, then runs run.py
# (arguments are passed on; results in $OUT/bench.json).
#
# From a session with a GPU (device tool), after prepare.sh:
#   run(command="bash scripts/gpu-bench/run.sh", carry=[".gpu-bench"], timeout_s=600)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
carry="$root/.gpu-bench"
work=/tmp/kubewan-bench
export PYTHONUNBUFFERED=1
mkdir -p "$work"

if [[ ! -f $carry/kubewan-runner.gz ]]; then
  echo "run.sh: $carry/kubewan-runner.gz is missing: run scripts/gpu-bench/prepare.sh first and carry .gpu-bench" >&2
  exit 2
fi
gunzip -c "$carry/kubewan-runner.gz" >"$work/kubewan-runner"
chmod +x "$work/kubewan-runner"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$work/site" "$carry"/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"

# The driver's libcuda, the toolkit's cuBLAS/cuRAND/runtime (the image's CUDA, or
# the venv's nvidia/cu13 wheels), as shared/cuda-build.md found them on an H100.
venv_cuda=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/cuda/targets/x86_64-linux/lib${venv_cuda:+:$venv_cuda}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$work/kubewan-runner" | grep 'not found'; then
  echo "run.sh: the runner misses the shared libraries above (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || true
"$work/kubewan-runner" --version

exec python3 "$root/scripts/gpu-bench/run.py" --runner "$work/kubewan-runner" --work "$work" \
  --out "${OUT:-$work/out}" "$@"
