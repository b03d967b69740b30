#!/usr/bin/env bash
# Debian packages ztagent needs on a fresh machine. Idempotent; installs only what is missing.
set -euo pipefail
need=()
# swtpm + tpm2-tools: the software TPM the tests and `make run` use; libtss2-dev + pkg-config:
# to build tpm2-pytss.
# softhsm2: the PKCS#11 HSM the enrollment tests use.
# faketime (libfaketime): the 30-day offline test moves the sidecar's clock forward.
# postgresql: initdb/pg_ctl/postgres under /usr/lib/postgresql/<ver>/bin for the CA's PostgreSQL
# backend tests (tests/fixtures/postgres.py starts its own server; the Debian cluster is unused).
# nginx: the policy bundle server of the bundle tests (tests/fixtures/nginx.py runs its own, on
# loopback, with its own config; the Debian service is unused).
# mosquitto: the MQTT broker of the escalation-outbox tests (tests/fixtures/mosquitto.py runs its
# own, on loopback, TLS 1.3 with client certificates; the Debian service is unused).
for pkg in python3-venv pkg-config swtpm swtpm-tools tpm2-tools libtss2-dev softhsm2 faketime postgresql nginx mosquitto; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then echo "missing Debian packages: ${need[*]} (run as root or install them)" >&2; exit 2; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
