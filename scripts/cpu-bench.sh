#!/usr/bin/env bash
# The CPU benchmark of issue 15 as ONE command: kubewan against PyTorch
# (diffusers/transformers) on the same random-weight models at the real
# Wan2.1 1.3B / VAE / UMT5-XXL / Qwen2.5-VL shapes, f32 (and the VLM in bf16
# too), the same threads on both sides, kubewan then PyTorch per row; prints
# one table (row, kubewan, PyTorch, time ratio, peak RSS each) and the checks
# that are not a time ratio (loader vs a plain read, load peak vs weights,
# attention memory at two sizes, decode tokens/s). The driver and the PyTorch
# side are the GPU benchmark's (scripts/gpu-bench/run.py --suite cpu,
# reference.py).
#
#   - a venv OUTSIDE the repo with torch, transformers, diffusers
#     (~/.cache/kubewan/bench-venv, created on first use; a few GB);
#   - kubewan-runner built in release into its own target folder
#     (~/.cache/kubewan/bench-target, or $CARGO_TARGET_DIR);
#   - checkpoints, configs and the image in --work (default
#     /tmp/kubewan-cpu-bench: the 1.3B DiT is 6.3 GB, the mid-size VLM 1.6 GB);
#   - results also in OUT/bench.json (--out, or $OUT).
#
# Usage: scripts/cpu-bench.sh [--quick] [--only GROUPS] [--rounds R] [--threads N] [--work DIR] [--out DIR]
#   --quick   smaller shapes (fewer DiT/UMT5 layers, a small VAE frame, tiny VLM): minutes
#   --only    comma-separated: load,dit,vae,attention-780,attention-3120,conv3d,gelu,umt5,vlm-bf16,vlm-f32
#             (--quick's attention groups: attention-390,attention-780)
#   --rounds  R alternating rounds per group (kubewan, PyTorch, kubewan, ...), each side keeping
#             its fastest round (default 1; the run of record uses 3: ~R times as long)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KUBEWAN_BENCH_VENV:-$HOME/.cache/kubewan/bench-venv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/kubewan/bench-target}
args=()
work=/tmp/kubewan-cpu-bench
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) args+=(--tiny); work=/tmp/kubewan-cpu-bench-quick; shift ;;
    --work) work="$2"; shift 2 ;;
    --only|--rounds|--threads|--out|--budget-s) args+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "cpu-bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if ! "$venv/bin/python" -c 'import torch, diffusers, transformers, safetensors, PIL' 2>/dev/null; then
  echo "cpu-bench.sh: creating $venv (torch, transformers, diffusers)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers diffusers safetensors pillow
fi
"$venv/bin/python" -c 'import torch, diffusers, transformers; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")'

nice -n 10 cargo build --release --locked -p kubewan-runner --manifest-path "$root/Cargo.toml"
runner="$CARGO_TARGET_DIR/release/kubewan-runner"
"$runner" --version

echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
export PYTHONUNBUFFERED=1
exec "$venv/bin/python" "$root/scripts/gpu-bench/run.py" --suite cpu --runner "$runner" \
  --python "$venv/bin/python" --work "$work" "${args[@]}"
