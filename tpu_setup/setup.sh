#!/usr/bin/env bash
# Copies this checkout to every worker, installs jaxllm with jax[tpu], and checks the device count.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: setup.sh --project P --zone Z --name N --type T [--nodes N]

Copies the repository to ~/jaxllm on all workers, runs pip install -e ~/jaxllm 'jax[tpu]',
and checks that JAX sees every chip of the slice(s).

$COMMON_HELP
HELP
}

parse_flags "$@"
require_type
repo="$(cd "$(dirname "$0")/.." && pwd)"
expected=$(($(devices_per_slice) * NODES))

while read -r node; do
  run gcloud compute tpus tpu-vm scp --recurse "$repo" "$node:~/jaxllm" --project="$PROJECT" \
    --zone="$ZONE" --worker=all
done < <(node_names)
on_all_workers "pip install -q -e ~/jaxllm 'jax[tpu]'"
on_all_workers "python3 -c 'import jax; jax.distributed.initialize(); n = jax.device_count(); assert n == $expected, f\"expected $expected devices, found {n}\"; print(\"devices:\", n)'"
