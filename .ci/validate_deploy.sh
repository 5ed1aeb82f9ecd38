#!/usr/bin/env bash
# Validate the deployment files offline: compose.yaml and the kustomize overlays under k8s/.
#
#   .ci/validate_deploy.sh              every step
#   .ci/validate_deploy.sh STEP ...     only these: compose | compose-schema | k8s
#
# Steps and the tools they use (each found on PATH or in the project's virtualenv, or $PYTHON's):
#   compose         Debian's docker-compose (apt-get install docker-compose): `config -q` for no profile,
#                   --profile cpu and --profile gpu (interpolation, merge keys, depends_on conditions)
#   compose-schema  check-jsonschema (PyPI) against the Compose Specification schema it vendors
#   k8s             `kubectl kustomize` (kustomize v5, kubectl >= 1.27) or a standalone `kustomize build`
#                   renders base and each overlay; kubernetes-validate (PyPI, ships the Kubernetes JSON
#                   schemas) checks every rendered object strictly against Kubernetes 1.32
#
# Exit status: 0 all ran steps passed, 1 a step failed, 77 a step was skipped because its tool is missing
# (and none failed). With ASYNCTHINK_REQUIRE_DEPLOY_TOOLS=1 a missing tool is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}  # the tests pass their own interpreter (a worktree may have no .venv)
[ -x "$PY" ] || PY=python3
K8S_VERSION=${K8S_VERSION:-1.32.0}
# compose.yaml requires these (no defaults, so a deployment never runs with a known secret)
export ASYNCTHINK_ADMIN_KEY=${ASYNCTHINK_ADMIN_KEY:-validate-only-not-a-secret-0123456789abcdef}
export ASYNCTHINK_SECRET_KEY=${ASYNCTHINK_SECRET_KEY:-validate-only-not-a-secret-fedcba9876543210}
export REDIS_PASSWORD=${REDIS_PASSWORD:-validate-only-not-a-secret}

failed=0
skipped=0
skip() {
  echo "SKIP $1: $2"
  if [ "${ASYNCTHINK_REQUIRE_DEPLOY_TOOLS:-}" = 1 ]; then failed=1; else skipped=1; fi
}
fail() { echo "FAIL $1"; failed=1; }
pass() { echo "ok   $1"; }

step_compose() {
  if ! command -v docker-compose >/dev/null 2>&1; then
    skip compose "docker-compose not found (apt-get install docker-compose)"
    return
  fi
  local p
  for p in "" cpu gpu; do
    if docker-compose -f compose.yaml ${p:+--profile "$p"} config -q; then
      pass "docker-compose config -q ${p:+--profile $p}"
    else
      fail "docker-compose config -q ${p:+--profile $p}"
    fi
  done
}

step_compose_schema() {
  if ! "$PY" -c "import check_jsonschema" 2>/dev/null; then
    skip compose-schema "check-jsonschema not installed (pip install check-jsonschema)"
    return
  fi
  if "$PY" -m check_jsonschema --builtin-schema vendor.compose-spec compose.yaml; then
    pass "compose.yaml matches the Compose Specification schema"
  else
    fail "compose.yaml against the Compose Specification schema"
  fi
}

render() { # dir -> stdout
  if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    kubectl kustomize "$1"
  else
    kustomize build "$1"
  fi
}

step_k8s() {
  if ! { command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1; }; then
    skip k8s "neither kubectl nor kustomize found (kubectl >= 1.27 bundles kustomize v5)"
    return
  fi
  local have_schema=1
  if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
    skip k8s-schema "kubernetes-validate not installed (pip install kubernetes-validate)"
    have_schema=0
  fi
  local out dir
  out=$(mktemp -d)
  for dir in k8s/base k8s/overlays/*/; do
    dir=${dir%/}
    local file="$out/$(echo "$dir" | tr / _).yaml"
    if ! render "$dir" >"$file"; then
      fail "kustomize $dir"
      continue
    fi
    pass "kustomize $dir ($(grep -c '^kind:' "$file") objects)"
    if [ "$have_schema" = 1 ]; then
      if "$PY" -m kubernetes_validate --strict --quiet -k "$K8S_VERSION" "$file"; then
        pass "$dir validates against Kubernetes $K8S_VERSION (strict)"
      else
        fail "$dir against the Kubernetes $K8S_VERSION schemas"
      fi
    fi
  done
  rm -rf "$out"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(compose compose-schema k8s)
for s in "${steps[@]}"; do
  case "$s" in
    compose) step_compose ;;
    compose-schema) step_compose_schema ;;
    k8s) step_k8s ;;
    *) echo "unknown step $s (compose | compose-schema | k8s)"; exit 2 ;;
  esac
done

if [ "$failed" = 1 ]; then exit 1; fi
if [ "$skipped" = 1 ]; then exit 77; fi
exit 0
