# Sourced by tests/e2e/run.sh and tests/e2e/readme.sh: logging, and the test
# cluster ($KUBEWAN_CLUSTER_DIR) brought down on exit whatever happened
# (KUBEWAN_E2E_KEEP=1 leaves it running to look around). A script may define
# e2e_on_failure, which runs first when it exits non-zero.
# shellcheck shell=bash
export PATH="$HOME/.cache/kubewan/tools/bin:$PATH"

e2e_log() { printf '[%s %s] %s\n' "$E2E_NAME" "$(date +%H:%M:%S)" "$*" >&2; }

# Builds kubewan-operator and kubewan-runner (dev profile) as
# scripts/build-images.sh does (the same packages, so the same features:
# nothing is compiled twice) and prints the runner binary's path.
e2e_runner_bin() {
  cargo build -q -p kubewan-operator -p kubewan-runner >&2
  echo "$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/kubewan-runner"
}

e2e_exit() {
  local rc=$?
  if [[ $rc -ne 0 ]] && declare -F e2e_on_failure >/dev/null; then e2e_on_failure || true; fi
  if [[ ${KUBEWAN_E2E_KEEP:-0} == 1 ]]; then
    e2e_log "KUBEWAN_E2E_KEEP=1: leaving the cluster running (eval \"\$(tests/k8s/cluster.sh env)\")"
  else
    tests/k8s/cluster.sh down || true
  fi
  exit $rc
}
trap e2e_exit EXIT
trap 'exit 130' INT TERM
