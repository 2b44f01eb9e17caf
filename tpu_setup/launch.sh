#!/usr/bin/env bash
# Runs the same jaxllm command on every worker, writing to a run folder in a gs:// bucket.
set -euo pipefail
# shellcheck source=tpu_setup/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: launch.sh --project P --zone Z --name N --bucket gs://B --experiment FILE [--run NAME]
                 [-- key=value ...]

Starts 'jaxllm pretrain FILE workdir=gs://B/runs/RUN ...' in the background on all workers;
the log of each worker goes to ~/RUN.log (see logs.sh). Started again with the same --run,
the run resumes from its latest checkpoint in the bucket.
  --bucket gs://B     where the workdir (checkpoints, TensorBoard) and TFDS data live
  --experiment FILE   the experiment file, relative to the repository root
  --run NAME          the run's name (default: the experiment's name and the time)
  --command CMD       pretrain (default) or grpo

$COMMON_HELP
HELP
}

command="pretrain"
args=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--command" ]]; then command="$2"; shift 2; else args+=("$1"); shift; fi
done
parse_flags "${args[@]}"
[[ "$BUCKET" == gs://* ]] || die "--bucket must be a gs:// path, got '$BUCKET'"
[[ -n "$EXPERIMENT" ]] || die "--experiment is required"
[[ "$command" =~ ^(pretrain|grpo)$ ]] || die "--command must be pretrain or grpo"
if [[ -z "$RUN" ]]; then RUN="$(basename "$EXPERIMENT" .py)-$(date -u +%Y%m%d-%H%M%S)"; fi

overrides=""
if [[ ${#EXTRA[@]} -gt 0 ]]; then printf -v overrides ' %q' "${EXTRA[@]}"; fi
job="cd ~/jaxllm && TFDS_DATA_DIR=$BUCKET/tensorflow_datasets nohup $VENV/jaxllm $command $EXPERIMENT"
job+=" workdir=$BUCKET/runs/$RUN$overrides > ~/$RUN.log 2>&1 &"
on_all_workers "$job"
echo "run $RUN: logs with tpu_setup/logs.sh --run $RUN; TensorBoard: tensorboard --logdir $BUCKET/runs/$RUN/tb"
