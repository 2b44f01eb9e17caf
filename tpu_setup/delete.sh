#!/usr/bin/env bash
# Deletes the TPU VM or queued resource. Billing stops only when this finishes.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: delete.sh --project P --zone Z --name N [--nodes N | --queued]

$COMMON_HELP
HELP
}

parse_flags "$@"
if multislice; then
  run gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
