#!/usr/bin/env bash
# Stops jaxllm on every worker with SIGTERM, so each run saves a checkpoint before it exits.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: stop.sh --project P --zone Z --name N [--nodes N]

$COMMON_HELP
HELP
}

parse_flags "$@"
on_all_workers "pkill -TERM -f 'jaxllm (pretrain|grpo)' || true"
