#!/bin/sh
# One-shot initialisation of a lienthong federation's secrets, run by the
# `certs-init` service of compose.yaml (and by the deployment test on loopback):
#
# * the federation CA, in $CA_PRIVATE_DIR, which no other service mounts;
# * one directory per container, each holding the CA certificate and that
#   container's own certificate and key, nothing else:
#     $BROKER_TLS_DIR            broker.pem/.key (both replicas: one identity)
#     $CIVIL_STATUS_TLS_DIR      civil-status.pem/.key, valid for its host name
#     $JUDICIAL_RECORDS_TLS_DIR  judicial-records.pem/.key, likewise
#     $CLIENTS_DIR               the client identities setup-federation.sh and
#                                a person at the `federation-setup` service act
#                                as: federation-admin, the two registers'
#                                integrators (their own certificates, not the
#                                registers' serving keys) and the demo consumer,
#                                portal and auditor;
# * the database server's certificate and key ($DATABASE_TLS_DIR), if asked;
# * the OpenTelemetry collector's certificate and key, with the CA certificate
#   it checks the brokers' client certificates against ($COLLECTOR_TLS_DIR),
#   if asked;
# * the subject-hashing secret, identical in every broker replica's data
#   directory (replicas on one database must pseudonymise subjects alike).
#
# Each certificate is issued in the CA's directory and its key moved out at
# once, so no key but the CA's stays there.
#
# Idempotent: existing files are kept, so re-running never replaces the CA,
# a certificate already handed out, or the secret.
set -eu
# Directories and files for their owner only, whatever the caller's umask:
# `lienthong certs` refuses a certificate directory others may write to.
umask 077

if [ -n "${CERTS_DIR:-}" ]; then
  echo "error: CERTS_DIR is no longer read: each container gets its own directory (BROKER_TLS_DIR, CIVIL_STATUS_TLS_DIR, JUDICIAL_RECORDS_TLS_DIR, CLIENTS_DIR); see deploy/compose/compose.yaml" >&2
  exit 1
fi

: "${TRUST_DOMAIN:=lienthong.gov.vn}"
: "${CA_PRIVATE_DIR:=/var/lib/lienthong-ca}"
: "${BROKER_TLS_DIR:=/data/broker-tls}"
: "${CIVIL_STATUS_TLS_DIR:=/data/civil-status-tls}"
: "${JUDICIAL_RECORDS_TLS_DIR:=/data/judicial-records-tls}"
: "${CLIENTS_DIR:=/data/clients}"
: "${BROKER_DATA_DIRS:=/data/broker-1 /data/broker-2}"
# Owner of everything written (the image's unprivileged user); empty: leave as is.
: "${OWNER:=}"
# Where to put the database server's TLS certificate and key (for the host
# name DATABASE_HOST), owned by DATABASE_OWNER; empty: no database certificate.
: "${DATABASE_TLS_DIR:=}"
: "${DATABASE_HOST:=postgres}"
: "${DATABASE_OWNER:=}"
# Where to put the OpenTelemetry collector's TLS certificate and key (for the
# host name COLLECTOR_HOST) and ca.pem, owned by COLLECTOR_OWNER; empty: no
# collector certificate.
: "${COLLECTOR_TLS_DIR:=}"
: "${COLLECTOR_HOST:=otel-collector}"
: "${COLLECTOR_OWNER:=}"

ca=$CA_PRIVATE_DIR
tls_dirs="$BROKER_TLS_DIR $CIVIL_STATUS_TLS_DIR $JUDICIAL_RECORDS_TLS_DIR $CLIENTS_DIR"
# shellcheck disable=SC2086 # one word per directory
mkdir -p "$ca" $tls_dirs
# A volume's root is made 0755 by the container engine: owner only.
# shellcheck disable=SC2086
chmod 700 "$ca" $tls_dirs

if [ ! -f "$ca/ca.pem" ]; then
  if [ -f "$ca/ca.key" ]; then
    echo "error: $ca/ca.key without ca.pem: a CA key from an older layout? Put its ca.pem beside it (or start from fresh volumes); a new CA would invalidate every certificate issued" >&2
    exit 1
  fi
  # Also writes broker.pem/.key, handed out to the brokers below.
  lienthong certs init --dir "$ca" --trust-domain "$TRUST_DOMAIN"
fi

hand_out() { # stem, destination directory: moves <stem>.pem/.key out of the CA's directory
  mv "$ca/$1.key" "$2/$1.key"
  mv "$ca/$1.pem" "$2/$1.pem"
  chmod 600 "$2/$1.key"
}

issue() { # destination directory, member id, then the host names it serves on (none: a client certificate only)
  dir=$1
  member=$2
  shift 2
  [ -f "$dir/$member.pem" ] && return 0
  hosts=""
  # A member that serves nowhere gets a certificate that cannot serve: no host
  # names, no server use, so it cannot stand in for a host to stock clients.
  if [ $# -gt 0 ]; then
    for h in "$@" localhost 127.0.0.1; do hosts="$hosts --host $h"; done
  fi
  # shellcheck disable=SC2086 # one word per --host flag
  lienthong certs issue --dir "$ca" --member "$member" $hosts
  hand_out "$member" "$dir"
}

if [ ! -f "$BROKER_TLS_DIR/broker.pem" ]; then
  if [ ! -f "$ca/broker.pem" ] || [ ! -f "$ca/broker.key" ]; then
    lienthong certs issue --dir "$ca" --broker-cert
  fi
  hand_out broker "$BROKER_TLS_DIR"
fi
issue "$CIVIL_STATUS_TLS_DIR" civil-status civil-status
issue "$JUDICIAL_RECORDS_TLS_DIR" judicial-records judicial-records
for member in federation-admin civil-status judicial-records hanoi-judicial-office hanoi-tax-dept citizen-portal state-audit; do
  issue "$CLIENTS_DIR" "$member"
done
give_ca() { # destination directory: a copy of the CA certificate, unless it holds it
  if [ ! -f "$1/ca.pem" ] || [ "$(cat "$1/ca.pem")" != "$(cat "$ca/ca.pem")" ]; then
    cp "$ca/ca.pem" "$1/ca.pem"
  fi
}
for dir in $tls_dirs; do
  give_ca "$dir"
done

service_tls() { # directory, stem, host name, owner: a server certificate for a service that is no member
  [ -n "$1" ] || return 0
  mkdir -p "$1"
  chmod 700 "$1"
  if [ ! -f "$1/$2.pem" ]; then
    lienthong certs issue --dir "$ca" --member "$2" --host "$3" --host localhost --host 127.0.0.1
    hand_out "$2" "$1"
  fi
}

# The database: the certificate only names its host for the brokers'
# verify-full; its key goes to the database alone.
service_tls "$DATABASE_TLS_DIR" database "$DATABASE_HOST"
if [ -n "$DATABASE_TLS_DIR" ] && [ -n "$DATABASE_OWNER" ]; then
  chown -R "$DATABASE_OWNER" "$DATABASE_TLS_DIR"
fi

# The collector: the certificate names its host for the brokers' https span
# export; its key goes to the collector alone, with the CA certificate it
# checks the brokers' client certificates against.
service_tls "$COLLECTOR_TLS_DIR" collector "$COLLECTOR_HOST"
if [ -n "$COLLECTOR_TLS_DIR" ]; then
  give_ca "$COLLECTOR_TLS_DIR"
  if [ -n "$COLLECTOR_OWNER" ]; then
    chown -R "$COLLECTOR_OWNER" "$COLLECTOR_TLS_DIR"
  fi
fi

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
for dir in $BROKER_DATA_DIRS; do
  mkdir -p "$dir"
  chmod 700 "$dir"
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
  chown -R "$OWNER" "$ca" $tls_dirs $BROKER_DATA_DIRS
fi
echo "federation CA in $ca; certificates and keys in $tls_dirs${DATABASE_TLS_DIR:+ $DATABASE_TLS_DIR}${COLLECTOR_TLS_DIR:+ $COLLECTOR_TLS_DIR}; subject secret in: $BROKER_DATA_DIRS"
