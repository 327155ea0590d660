#!/usr/bin/env bash
# The whole test suite (README's "run the tests" command; .ci/run calls it).
#   1. formatting
#   2. unit, parity and runner tests (no cluster needed)
#   3. the Helm chart: lint and offline validation of the rendered manifests
#   4. end to end: a real kube-apiserver + etcd (tests/k8s/cluster.sh), the chart,
#      the operator under the chart's RBAC, TravelJobs run by the test kubelet
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kubewan/target}"
export PATH="$HOME/.cache/kubewan/tools/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "unit, parity and runner tests"
cargo test --workspace --exclude kubewan-e2e

step "Helm chart: lint and validate"
tests/k8s/install-tools.sh
tests/chart.sh

step "end to end on a real control plane"
tests/e2e/run.sh
