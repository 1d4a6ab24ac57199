#!/usr/bin/env bash
# Run the same `jaxft train` on every worker of a TPU VM / pod slice at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch.sh [flags] [-- OVERRIDE...]

Run `jaxft train CONFIG --run-dir RUN_DIR [OVERRIDE...]` on all workers at once
(--worker=all). On a pod slice jaxft joins the workers itself (JAX cluster detection),
so every worker runs the identical command. Arguments after `--` are passed to
jaxft as key=value overrides. Each worker also logs to ~/jaxft-RUN.log. The run
stops if the ssh session ends; run this from tmux/screen for long jobs.

Flags (env-var fallback in brackets):
  --name NAME            TPU VM name [TPU_NAME] (required)
  --zone ZONE            zone [TPU_ZONE] (required)
  --project PROJECT      GCP project; gcloud's default if unset [GCP_PROJECT]
  --config PATH          jaxft config, relative to the remote source dir
                         [JAXFT_CONFIG] (required)
  --run-dir gs://B/RUN   run dir on a bucket every worker can reach
                         [JAXFT_RUN_DIR] (required)
  --allow-local-run-dir  accept a run dir that is not gs:// (single host only:
                         workers do not share a local disk)
  --log PATH             per-worker log, relative to $HOME [JAXFT_LOG]
                         (default: jaxft-RUN.log, RUN = last part of the run dir)
  --remote-dir DIR       source dir on the workers, relative to $HOME
                         [JAXFT_DIR] (default: jaxft)
  --venv DIR             venv on the workers, relative to $HOME [JAXFT_VENV]
                         (default: jaxft-venv)
  --dry-run              print the gcloud command instead of running it
  -h, --help             show this help
EOF
}

CONFIG=${JAXFT_CONFIG:-}
RUN_DIR=${JAXFT_RUN_DIR:-}
LOG=${JAXFT_LOG:-}
REMOTE_DIR=${JAXFT_DIR:-jaxft}
VENV=${JAXFT_VENV:-jaxft-venv}
ALLOW_LOCAL=0
OVERRIDES=()

while [[ $# -gt 0 ]]; do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; shift 2 ;;
    --project) need_value "$@"; GCP_PROJECT=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --run-dir) need_value "$@"; RUN_DIR=$2; shift 2 ;;
    --allow-local-run-dir) ALLOW_LOCAL=1; shift ;;
    --log) need_value "$@"; LOG=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require "$TPU_NAME" "--name (or TPU_NAME)"
require "$TPU_ZONE" "--zone (or TPU_ZONE)"
require "$CONFIG" "--config (or JAXFT_CONFIG)"
require "$RUN_DIR" "--run-dir (or JAXFT_RUN_DIR)"
# Workers write checkpoints and metrics to the same run dir, so it must be shared.
if [[ $RUN_DIR != gs://* && $ALLOW_LOCAL != 1 ]]; then
  die "--run-dir must be a gs:// path shared by all workers, got '$RUN_DIR' (or pass --allow-local-run-dir)"
fi

run_name=${RUN_DIR%/}
run_name=${run_name##*/}
LOG=${LOG:-jaxft-$run_name.log}

dir=$(remote_path "$REMOTE_DIR")
venv=$(remote_path "$VENV")
log=$(remote_path "$LOG")
# "${arr[@]+...}" keeps an empty array working under `set -u` on bash < 4.4 (macOS).
train=$(printf ' %q' train "$CONFIG" --run-dir "$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"})
# pipefail: report jaxft's exit status, not tee's. PYTHONUNBUFFERED: the log
# keeps up with the run instead of arriving in pipe-buffer-sized chunks.
remote="set -o pipefail; cd $dir && PYTHONUNBUFFERED=1 $venv/bin/jaxft$train 2>&1 | tee $log"

tpu_vm ssh --worker=all --command "$remote"
