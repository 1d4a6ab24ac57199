#!/usr/bin/env bash
# Delete a TPU VM / pod slice so it stops billing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: stop.sh [flags]

Delete the TPU VM (all workers) with `gcloud compute tpus tpu-vm delete --quiet`.
Anything on the workers' disks is lost; run dirs on gs:// are kept.

Flags (env-var fallback in brackets):
  --name NAME        TPU VM name [TPU_NAME] (required)
  --zone ZONE        zone [TPU_ZONE] (required)
  --project PROJECT  GCP project; gcloud's default if unset [GCP_PROJECT]
  --dry-run          print the gcloud command instead of running it
  -h, --help         show this help
EOF
}

while [[ $# -gt 0 ]]; do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; shift 2 ;;
    --project) need_value "$@"; GCP_PROJECT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require "$TPU_NAME" "--name (or TPU_NAME)"
require "$TPU_ZONE" "--zone (or TPU_ZONE)"

# --quiet: skip the interactive confirmation so this works in scripts.
tpu_vm delete --quiet
