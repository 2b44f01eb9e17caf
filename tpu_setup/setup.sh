#!/usr/bin/env bash
# Copies this checkout to every worker, installs jaxllm with jax[tpu], and checks the device count.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: setup.sh --project P --zone Z --name N --type T [--nodes N]

Copies this checkout (without .git, .venv and runs) to ~/jaxllm on all workers, replacing
what an earlier setup put there; installs jaxllm with 'jax[tpu]' into ~/jaxllm-venv, on
Python 3.11 from apt where the image's python3 is older; and checks that JAX sees every
chip of the slice(s).

$COMMON_HELP
HELP
}

parse_flags "$@"
require_type
repo="$(cd "$(dirname "$0")/.." && pwd)"
expected=$(($(devices_per_slice) * NODES))

archive="${TMPDIR:-/tmp}/jaxllm-$NAME.tar.gz"
run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv --exclude=runs .
while read -r node; do
  run gcloud compute tpus tpu-vm scp "$archive" "$node:~/jaxllm.tar.gz" --project="$PROJECT" \
    --zone="$ZONE" --worker=all
done < <(node_names)
# jaxllm needs Python 3.11; the TPU images' Ubuntu 22.04 has 3.10, and 3.11 from apt.
python="{ python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' && py=python3 || \
{ sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv && \
py=python3.11; }; }"
on_all_workers "rm -rf ~/jaxllm && mkdir ~/jaxllm && tar -xzf ~/jaxllm.tar.gz -C ~/jaxllm && \
$python && \$py -m venv ~/jaxllm-venv && $VENV/pip install -q -e ~/jaxllm 'jax[tpu]'"
on_all_workers_together "$VENV/python -c 'from jaxllm import distributed; distributed.initialize(); import jax; n = jax.device_count(); assert n == $expected, f\"expected $expected devices, found {n}\"; print(\"devices:\", n)'"
