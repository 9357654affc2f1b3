#!/bin/sh
# Admits the demo federation's members, registers the registers' record types,
# adds their endpoints and creates the judicial-records office's grants, through
# the broker's API (`lienthong` CLI over mutual TLS). Run by the
# `federation-setup` service of compose.yaml and by the deployment test.
#
# Idempotent: members, endpoints and active grants that exist are kept, and
# registering an unchanged record type returns its existing version.
#
# Acts as federation-admin and as the two registers' integrators
# (civil-status, judicial-records): $LIENTHONG_CERTS holds ca.pem and their
# certificates and keys (init-certs.sh's $CLIENTS_DIR).
set -eu

: "${LIENTHONG_BROKER:=https://localhost:7443}"
: "${LIENTHONG_CERTS:=/etc/lienthong/certs}"
: "${SCHEMAS_DIR:=/usr/share/lienthong/schemas}"
: "${CIVIL_STATUS_URL:=https://civil-status:9101}"
: "${JUDICIAL_RECORDS_URL:=https://judicial-records:9102}"
export LIENTHONG_BROKER LIENTHONG_CERTS
# The CLI prefers LIENTHONG_CA (set in the image for `lienthong health`) over
# --certs; the certificates directory holds the same CA.
unset LIENTHONG_CA

admin() { lienthong --as federation-admin "$@"; }

member() { # id, display name, roles...
  id=$1
  name=$2
  shift 2
  if admin member get "$id" >/dev/null 2>&1; then
    echo "member $id exists"
    return 0
  fi
  roles=""
  for r in "$@"; do roles="$roles --role $r"; done
  # shellcheck disable=SC2086 # one word per --role flag
  admin member add "$id" --name "$name" $roles
}

member civil-status "Civil status register (Ministry of Justice)" provider integrator
member judicial-records "National Centre for Judicial Records" provider integrator
member hanoi-judicial-office "Ha Noi Department of Justice, judicial-records office" consumer
member hanoi-tax-dept "Ha Noi Tax Department" consumer
member citizen-portal "National Public Service Portal" subject-portal
member state-audit "State Audit Office" auditor

# Each register's integrator registers its own record types.
for file in "$SCHEMAS_DIR"/civil_status.*.json; do
  lienthong --as civil-status schema register --file "$file"
done
for file in "$SCHEMAS_DIR"/judicial.*.json; do
  lienthong --as judicial-records schema register --file "$file"
done

endpoint() { # provider, url
  if admin endpoint list --provider "$1" | grep -qF "$2"; then
    echo "endpoint $2 of $1 exists"
    return 0
  fi
  admin endpoint add --provider "$1" --url "$2"
}
endpoint civil-status "$CIVIL_STATUS_URL"
endpoint judicial-records "$JUDICIAL_RECORDS_URL"

grant() { # record type, then --field/--purpose flags
  type=$1
  shift
  if admin grant list --consumer hanoi-judicial-office --type "$type" | grep -q ' active$'; then
    echo "an active grant of $type to hanoi-judicial-office exists"
    return 0
  fi
  admin grant create --consumer hanoi-judicial-office --type "$type" --rate 600 "$@"
}
# Law on Judicial Records 28/2009/QH12 art. 45 (criminal-record certificates)
# and Decree 47/2020/ND-CP art. 12 (data sharing between agencies).
grant civil_status.birth_record \
  --field /full_name --field /birth_date --field /gender --field /place_of_birth \
  --field /father/full_name --field /mother/full_name \
  --purpose law-28-2009-qh12/art-45 --purpose decree-47-2020/art-12
grant civil_status.marriage_record \
  --field /marriage_date --field /spouse/full_name --field /status \
  --purpose law-28-2009-qh12/art-45
grant judicial.criminal_record_extract --field '*' --purpose law-28-2009-qh12/art-45

echo "federation set up through $LIENTHONG_BROKER"
