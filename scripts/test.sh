#!/usr/bin/env bash
# Runs every lienthong test on a fresh machine: installs what the tests need
# when it is missing (PostgreSQL server binaries for the throwaway clusters the
# tests start, Python's kubernetes-validate for the manifest checks, Python's
# stock gRPC packages for the test of a client in another language), then runs
# the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! have_pg; then
  echo "== installing PostgreSQL (Debian package postgresql) for the store and replica tests"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if [ -d deploy/k8s ] && ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "== installing kubernetes-validate (PyPI) for the manifest checks"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

if ! python3 -c 'import grpc, grpc_reflection, grpc_health, cryptography' >/dev/null 2>&1; then
  echo "== installing stock Python gRPC packages (PyPI) for the other-language client test"
  python3 -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
fi

bash scripts/check-deploy.sh
echo "== building"
cargo build --workspace --all-targets --locked
echo "== testing"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final
else
  cargo test --workspace --locked --no-fail-fast
fi
