#!/bin/sh
# One-shot initialisation of a lienthong federation's secrets, run by the
# `certs-init` service of compose.yaml (and by the deployment test on loopback):
#
# * the federation CA and the broker certificate (`lienthong certs init`),
# * a certificate for every demo member, the registers' valid for their host names,
# * the subject-hashing secret, identical in every broker replica's data
#   directory (replicas on one database must pseudonymise subjects alike).
#
# Idempotent: existing files are kept, so re-running never replaces the CA or
# the secret. The CA's private key is moved to $CA_PRIVATE_DIR, which no other
# service mounts.
set -eu
# Directories and files for their owner only, whatever the caller's umask:
# `lienthong certs` refuses a certificate directory others may write to.
umask 077

: "${TRUST_DOMAIN:=lienthong.gov.vn}"
: "${CERTS_DIR:=/etc/lienthong/certs}"
: "${CA_PRIVATE_DIR:=/var/lib/lienthong-ca}"
: "${BROKER_DATA_DIRS:=/data/broker-1 /data/broker-2}"
# Owner of everything written (the image's unprivileged user); empty: leave as is.
: "${OWNER:=}"
# Where to put the database server's TLS certificate and key (for the host
# name DATABASE_HOST), owned by DATABASE_OWNER; empty: no database certificate.
: "${DATABASE_TLS_DIR:=}"
: "${DATABASE_HOST:=postgres}"
: "${DATABASE_OWNER:=}"

mkdir -p "$CERTS_DIR" "$CA_PRIVATE_DIR"

# `certs issue` needs ca.key beside ca.pem: bring it back for the duration.
if [ -f "$CA_PRIVATE_DIR/ca.key" ] && [ ! -f "$CERTS_DIR/ca.key" ]; then
  mv "$CA_PRIVATE_DIR/ca.key" "$CERTS_DIR/ca.key"
fi
if [ ! -f "$CERTS_DIR/ca.pem" ]; then
  lienthong certs init --dir "$CERTS_DIR" --trust-domain "$TRUST_DOMAIN"
fi

issue() { # member id, then the host names it serves on
  member=$1
  shift
  [ -f "$CERTS_DIR/$member.pem" ] && return 0
  hosts=""
  for h in "$@" localhost 127.0.0.1; do hosts="$hosts --host $h"; done
  # shellcheck disable=SC2086 # one word per --host flag
  lienthong certs issue --dir "$CERTS_DIR" --member "$member" $hosts
}
issue federation-admin
issue civil-status civil-status
issue judicial-records judicial-records
issue hanoi-judicial-office
issue hanoi-tax-dept
issue citizen-portal
issue state-audit
if [ -n "$DATABASE_TLS_DIR" ]; then
  # Not a member: the certificate only names the database's host for the
  # brokers' verify-full; its key goes to the database alone.
  issue database "$DATABASE_HOST"
  mkdir -p "$DATABASE_TLS_DIR"
  if [ -f "$CERTS_DIR/database.key" ]; then
    mv "$CERTS_DIR/database.key" "$DATABASE_TLS_DIR/database.key"
  fi
  cp "$CERTS_DIR/database.pem" "$DATABASE_TLS_DIR/database.pem"
  chmod 600 "$DATABASE_TLS_DIR/database.key"
  if [ -n "$DATABASE_OWNER" ]; then
    chown -R "$DATABASE_OWNER" "$DATABASE_TLS_DIR"
  fi
fi

mv "$CERTS_DIR/ca.key" "$CA_PRIVATE_DIR/ca.key"

secret=""
for dir in $BROKER_DATA_DIRS; do
  if [ -f "$dir/subject-hmac.key" ]; then
    secret=$(cat "$dir/subject-hmac.key")
    break
  fi
done
if [ -z "$secret" ]; then
  # 32 random bytes as 64 hex digits, the format the broker reads.
  secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
fi
umask 077
for dir in $BROKER_DATA_DIRS; do
  mkdir -p "$dir"
  if [ ! -f "$dir/subject-hmac.key" ]; then
    printf '%s\n' "$secret" >"$dir/subject-hmac.key"
  elif [ "$(cat "$dir/subject-hmac.key")" != "$secret" ]; then
    echo "error: $dir/subject-hmac.key differs from the other replicas' secret; replicas must share one" >&2
    exit 1
  fi
  chmod 600 "$dir/subject-hmac.key"
done

if [ -n "$OWNER" ]; then
  # shellcheck disable=SC2086
  chown -R "$OWNER" "$CERTS_DIR" "$CA_PRIVATE_DIR" $BROKER_DATA_DIRS
fi
echo "federation certificates in $CERTS_DIR, CA key in $CA_PRIVATE_DIR, subject secret in: $BROKER_DATA_DIRS"
