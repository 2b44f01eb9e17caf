#!/usr/bin/env bash
# Shows the end of a run's log on worker 0 (process 0 writes the metrics).
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: logs.sh --project P --zone Z --name N --run RUN [--nodes N]

Prints the last 100 lines of ~/RUN.log on worker 0 of the first slice.

$COMMON_HELP
HELP
}

parse_flags "$@"
[[ -n "$RUN" ]] || die "--run is required"
node="$(node_names | head -n 1)"
run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" --worker=0 \
  --command="tail -n 100 ~/$RUN.log"
