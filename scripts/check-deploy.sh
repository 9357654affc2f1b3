#!/usr/bin/env bash
# Checks everything in deploy/ that can be checked without a container engine
# or a cluster (the broker TOML files are loaded by the broker's own loader in
# tests/e2e/deploy.rs, and the compose scripts run there against real processes):
#   * Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
#     offline), and their consistency with the broker TOML (scripts/check_deploy.py);
#   * compose.yaml with `docker compose config` (or docker-compose) when present,
#     and by scripts/check_deploy.py: consistent with broker.toml and the
#     collector's config (spans over TLS), and each container mounts only its
#     own keys;
#   * the systemd unit with `systemd-analyze verify` and its hardening score,
#     when systemd-analyze is present;
#   * the compose shell scripts' syntax.
# Dockerfile linting (hadolint) is not available here and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== checking deploy/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize deploy/k8s >"$tmp/kustomized.yaml" 2>"$tmp/kustomize.err"; then
  python3 scripts/check_deploy.py "$tmp/kustomized.yaml"
else
  [ -s "$tmp/kustomize.err" ] && { cat "$tmp/kustomize.err" >&2; exit 1; }
  echo "kubernetes: kubectl kustomize not available; checking the kustomization as scripts/check_deploy.py renders it"
  python3 scripts/check_deploy.py
fi

for script in deploy/compose/*.sh; do
  sh -n "$script"
  if command -v shellcheck >/dev/null 2>&1; then shellcheck -s sh "$script"; fi
done
echo "scripts: deploy/compose/*.sh parse"

compose_file=deploy/compose/compose.yaml
# The database password has no default: the stack refuses to start without one.
compose_check() { # the compose command, as words
  if (unset LIENTHONG_DB_PASSWORD; "$@" -f "$compose_file" config -q) >/dev/null 2>&1; then
    echo "compose: $compose_file starts without LIENTHONG_DB_PASSWORD set" >&2
    exit 1
  fi
  LIENTHONG_DB_PASSWORD=compose-config-check "$@" -f "$compose_file" config -q
}
if docker compose version >/dev/null 2>&1; then
  compose_check docker compose
  echo "compose: docker compose config accepts $compose_file (and refuses it without a database password)"
elif command -v docker-compose >/dev/null 2>&1; then
  compose_check docker-compose
  echo "compose: docker-compose config accepts $compose_file (and refuses it without a database password)"
else
  echo "compose: SKIPPED docker compose config (no docker compose plugin nor docker-compose here)"
fi

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify insists that ExecStart's binary exists: point it at a stand-in.
  printf '#!/bin/sh\nexit 0\n' >"$tmp/lienthong"
  chmod +x "$tmp/lienthong"
  sed "s#/usr/local/bin/lienthong#$tmp/lienthong#g" deploy/systemd/lienthong.service >"$tmp/lienthong.service"
  # Unknown or misspelt directives are only warnings: any output fails.
  out=$(systemd-analyze verify "$tmp/lienthong.service" 2>&1) || { echo "$out" >&2; exit 1; }
  if [ -n "$out" ]; then
    echo "systemd-analyze verify deploy/systemd/lienthong.service:" >&2
    echo "$out" >&2
    exit 1
  fi
  # Exposure 0 (locked down) .. 10 (unsafe); keep the unit below 2.0.
  if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    systemd-analyze security --offline=yes --threshold=20 "$tmp/lienthong.service" >"$tmp/security.txt" 2>&1 \
      || { tail -n 5 "$tmp/security.txt" >&2; echo "the unit's hardening regressed" >&2; exit 1; }
    echo "systemd: $(grep -o 'Overall exposure level.*' "$tmp/security.txt")"
  fi
  echo "systemd: systemd-analyze verify accepts deploy/systemd/lienthong.service"
else
  echo "systemd: SKIPPED systemd-analyze verify (systemd-analyze not installed)"
fi
echo "dockerfile: SKIPPED linting (hadolint is not available)"
