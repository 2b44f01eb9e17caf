#!/usr/bin/env bash
# Creates a TPU VM, a pod slice, or (with --nodes N or --queued) queued resources for multislice.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: create.sh --project P --zone Z --name N --type T [--spot] [--nodes N] [--queued] [--runtime V]

Creates the TPU. One slice uses 'gcloud compute tpus tpu-vm create'; --queued or --nodes > 1
uses 'gcloud compute tpus queued-resources create' (multislice: N slices named NAME-0 ..).
  --spot              spot (preemptible) capacity
  --runtime VERSION   TPU software version (default by generation)

$COMMON_HELP
HELP
}

parse_flags "$@"
require_type
spot=()
if [[ "$SPOT" == true ]]; then spot=(--spot); fi

if multislice; then
  nodes=(--node-count="$NODES" --node-prefix="$NAME")
  if [[ "$NODES" -eq 1 ]]; then nodes=(--node-id="$NAME"); fi
  run gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$TYPE" --runtime-version="$(runtime_version)" "${nodes[@]}" "${spot[@]}"
else
  run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$TYPE" --version="$(runtime_version)" "${spot[@]}"
fi
