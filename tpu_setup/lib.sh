#!/usr/bin/env bash
# Shared flag parsing and command running for the tpu_setup scripts. Sourced, not run.
#
# Settings come from, in increasing priority: defaults, an env file (--env FILE, or
# tpu_setup/tpu.env if it exists), and flags.
# shellcheck disable=SC2034  # the globals are read by the scripts that source this file

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
NAME="${NAME:-}"
TYPE="${TYPE:-}"
RUNTIME="${RUNTIME:-}"
NODES="${NODES:-1}"
SPOT="${SPOT:-false}"
QUEUED="${QUEUED:-false}"
BUCKET="${BUCKET:-}"
RUN="${RUN:-}"
EXPERIMENT="${EXPERIMENT:-}"
DRY_RUN=false
EXTRA=()

COMMON_HELP="Common flags:
  --project ID        Google Cloud project            (env PROJECT)
  --zone ZONE         e.g. us-central2-b              (env ZONE)
  --name NAME         TPU VM or queued-resource name  (env NAME)
  --type TYPE         accelerator type: v4-8, v5litepod-8, v5p-128, v6e-8, ...  (env TYPE)
  --nodes N           slices, for multislice          (env NODES, default 1)
  --env FILE          read the settings above from a bash env file
  --dry-run           print the exact commands instead of running them
  -h, --help          this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# parse_flags "$@": sets the globals above; anything after -- goes to EXTRA.
parse_flags() {
  local env_file=""
  local script_dir
  script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  if [[ -f "$script_dir/tpu.env" ]]; then env_file="$script_dir/tpu.env"; fi
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == "--env" ]]; then env_file="${args[i + 1]:-}"; fi
  done
  if [[ -n "$env_file" ]]; then
    [[ -f "$env_file" ]] || die "env file '$env_file' does not exist"
    # shellcheck source=/dev/null
    source "$env_file"
  fi
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --project) PROJECT="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --name) NAME="$2"; shift 2 ;;
      --type) TYPE="$2"; shift 2 ;;
      --runtime) RUNTIME="$2"; shift 2 ;;
      --nodes) NODES="$2"; shift 2 ;;
      --spot) SPOT=true; shift ;;
      --queued) QUEUED=true; shift ;;
      --bucket) BUCKET="$2"; shift 2 ;;
      --run) RUN="$2"; shift 2 ;;
      --experiment) EXPERIMENT="$2"; shift 2 ;;
      --env) shift 2 ;;
      --dry-run) DRY_RUN=true; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; EXTRA=("$@"); break ;;
      *) die "unknown flag '$1' (see --help)" ;;
    esac
  done
  [[ -n "$PROJECT" ]] || die "--project is required"
  [[ -n "$ZONE" ]] || die "--zone is required"
  [[ -n "$NAME" ]] || die "--name is required"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
}

require_type() {
  [[ -n "$TYPE" ]] || die "--type is required"
  [[ "$TYPE" =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "--type '$TYPE' is not one of v4-N, v5litepod-N, v5p-N, v6e-N"
}

# The TPU VM software version for each generation.
runtime_version() {
  if [[ -n "$RUNTIME" ]]; then echo "$RUNTIME"; return; fi
  case "$TYPE" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
  esac
}

# JAX devices in one slice: v4 and v5p types count TensorCores (2 per chip, one JAX device
# per chip); v5e and v6e types count chips.
devices_per_slice() {
  local size="${TYPE##*-}"
  case "$TYPE" in
    v4-* | v5p-*) echo $((size / 2)) ;;
    *) echo "$size" ;;
  esac
}

multislice() { [[ "$NODES" -gt 1 || "$QUEUED" == true ]]; }

# The TPU VM names: NAME-0 .. NAME-(N-1) for N > 1 slices; one slice is NAME, queued or not
# (create.sh gives a single queued node --node-id=NAME).
node_names() {
  if [[ "$NODES" -gt 1 ]]; then
    local i
    for ((i = 0; i < NODES; i++)); do echo "$NAME-$i"; done
  else
    echo "$NAME"
  fi
}

# quote ARG: ARG as a shell word, in single quotes only where it needs them.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD...: runs a command, or prints it under --dry-run, ready to paste into a shell.
run() {
  if [[ "$DRY_RUN" == true ]]; then
    local arg line=""
    for arg in "$@"; do line+="$(quote "$arg") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

# The virtual environment setup.sh installs jaxllm into on every worker; the tilde expands
# there, in the remote shell.
# shellcheck disable=SC2088
VENV="~/jaxllm-venv/bin"

# on_all_workers COMMAND: runs a shell command on every worker of every slice.
on_all_workers() {
  local node
  while read -r node; do
    run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
      --worker=all --command="$1"
  done < <(node_names)
}

# on_all_workers_together COMMAND: on_all_workers with every slice's command running at once,
# as a multislice JAX job needs (each slice's processes wait for the others'); one after
# another under --dry-run, so its output keeps its order.
on_all_workers_together() {
  if [[ "$DRY_RUN" == true ]]; then on_all_workers "$1"; return; fi
  local node pid status=0 pids=()
  while read -r node; do
    gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" --worker=all \
      --command="$1" &
    pids+=("$!")
  done < <(node_names)
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  return "$status"
}
