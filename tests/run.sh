#!/usr/bin/env bash
# The whole test suite (README's "run the tests" command; .ci/run calls it).
#   1. formatting, lints (clippy with warnings as errors), unused dependencies
#      (cargo-machete, installed once under ~/.cache/kubewan/tools) and the
#      syntax of the GPU build and benchmark scripts and the load benchmark
#   2. unit, parity and runner tests (no cluster needed)
#   3. the Helm chart: lint and offline validation of the rendered manifests
#   4. the test cluster itself: a real kube-apiserver + etcd and a real kubelet
#      over containerd (tests/k8s/smoke.sh)
#   5. end to end: the images, the chart with the operator in-cluster, TravelJobs
#      whose pods run as containers from the runner image (tests/e2e/run.sh)
#   6. README's "Installing on a cluster", command by command (tests/e2e/readme.sh)
# Each step prints how long it took.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kubewan/target}"
export PATH="$HOME/.cache/kubewan/tools/bin:$PATH"

step() { # description command...
  local what="$1" t0=$SECONDS
  shift
  printf '\n==> %s\n' "$what"
  "$@"
  printf '==> %s: %d s\n' "$what" $((SECONDS - t0))
}

machete() {
  local version=0.9.2
  if [[ "$(cargo-machete --version 2>/dev/null)" != "$version" ]]; then
    cargo install cargo-machete --locked --version "$version" --root "$HOME/.cache/kubewan/tools"
  fi
  cargo-machete
}

bench_scripts() { # the CUDA build and the load benchmark do not fit CI, see docs/benchmarks.md
  local script
  for script in scripts/build-cuda.sh scripts/gpu-bench/*.sh scripts/load-bench.sh; do bash -n "$script"; done
  python3 -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' scripts/gpu-bench/*.py
}

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy (warnings are errors)" cargo clippy --workspace --all-targets --locked -- -D warnings
step "unused dependencies (cargo-machete)" machete
step "GPU and load benchmark scripts: syntax" bench_scripts
step "unit, parity and runner tests" cargo test --workspace --exclude kubewan-e2e
step "tools for the Helm chart and the test cluster" tests/k8s/install-tools.sh
step "Helm chart: lint and validate" tests/chart.sh
step "the test cluster: smoke test" tests/k8s/smoke.sh
step "end to end on a real control plane and node" tests/e2e/run.sh
step "README's cluster walkthrough" tests/e2e/readme.sh
