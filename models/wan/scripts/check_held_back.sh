#!/usr/bin/env bash
# Checks `kubewan-runner video generate` against diffusers' frames on pipelines this repo never saw,
# and the component parity tests on the same pipelines. Run by hand from the repository root:
#
#   models/wan/scripts/check_held_back.sh OUT_DIR SEED [SEED...]
#
# For each seed it writes OUT_DIR/held-{flf2v,i2v}-SEED with make_tiny.py --held-back (other sizes,
# head counts, layer counts, frames, steps, guidance, shift), runs `video generate` with the values
# of golden/meta.json and --latents golden/latents.safetensors, prints the max abs error of the
# frames against golden/frames.safetensors (fails above 2e-3), then runs
# `cargo test -p kubewan-wan --test parity_text_image_sched` with KUBEWAN_WAN_PARITY_DIRS set.
#
# Environment: PYTHON (default ~/.cache/kubewan/venv/bin/python), RUNNER (default: built with cargo).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR SEED [SEED...]" >&2
  exit 2
fi
out=$1
shift
PYTHON=${PYTHON:-$HOME/.cache/kubewan/venv/bin/python}
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "${RUNNER:-}" ]; then
  cargo build -q -p kubewan-runner
  RUNNER=$(cargo metadata --format-version 1 --no-deps | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/kubewan-runner
fi

dirs=()
for seed in "$@"; do
  "$PYTHON" "$here/make_tiny.py" --held-back "$out" --seed "$seed" >/dev/null 2>&1
  dirs+=("$out/held-flf2v-$seed" "$out/held-i2v-$seed")
done

fail=0
for d in "${dirs[@]}"; do
  meta() { "$PYTHON" -c 'import json,sys; v=json.load(open(sys.argv[1]))[sys.argv[2]]; print("" if v is None else v)' "$d/golden/meta.json" "$1"; }
  last=()
  if [ "$(meta flf2v)" = "True" ]; then last=(--last "$d/golden/last.png"); fi
  frames="$d/rust_frames.safetensors"
  "$RUNNER" video generate --model "$d/model" --first "$d/golden/first.png" "${last[@]}" \
    --prompt "$(meta prompt)" --negative-prompt "$(meta negative_prompt)" \
    --frames "$(meta frames)" --width "$(meta width)" --height "$(meta height)" \
    --steps "$(meta steps)" --guidance "$(meta guidance)" \
    --latents "$d/golden/latents.safetensors" --out-frames "$frames" >/dev/null
  "$PYTHON" - "$frames" "$d/golden/frames.safetensors" "$d" <<'EOF' || fail=1
import sys
from safetensors.torch import load_file
a = load_file(sys.argv[1])["frames"]
b = load_file(sys.argv[2])["frames"]
assert a.shape == b.shape, (a.shape, b.shape)
err = (a - b).abs().max().item()
print(f"{sys.argv[3]}: frames {tuple(a.shape)} max abs err {err:.2e}")
sys.exit(0 if err <= 2e-3 else 1)
EOF
done

KUBEWAN_WAN_PARITY_DIRS=$(IFS=:; echo "${dirs[*]}") cargo test -q -p kubewan-wan --test parity_text_image_sched
exit $fail
