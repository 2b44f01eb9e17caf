#!/usr/bin/env bash
# Shows the state of the TPU VM or queued resource.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: status.sh --project P --zone Z --name N [--nodes N | --queued]

$COMMON_HELP
HELP
}

parse_flags "$@"
if multislice; then
  run gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE"
else
  run gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format="value(state,acceleratorType,health)"
fi
