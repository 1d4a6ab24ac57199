#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: create.sh [flags] [-- extra gcloud flags]

Create a TPU VM (single host) or pod slice (multi-host) with
`gcloud compute tpus tpu-vm create`. Arguments after `--` are passed to gcloud
unchanged (e.g. --network, --labels, --service-account).

Flags (env-var fallback in brackets):
  --name NAME              TPU VM name [TPU_NAME] (required)
  --zone ZONE              zone, e.g. us-central2-b [TPU_ZONE] (required)
  --project PROJECT        GCP project; gcloud's default if unset [GCP_PROJECT]
  --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16 [TPU_TYPE] (required)
  --version RUNTIME        TPU software version, e.g. tpu-ubuntu2204-base (v4),
                           v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e)
                           [TPU_RUNTIME] (required)
  --preemptible            create a preemptible TPU [TPU_PREEMPTIBLE=1]
  --spot                   create a Spot TPU [TPU_SPOT=1]
  --dry-run                print the gcloud command instead of running it
  -h, --help               show this help
EOF
}

TPU_TYPE=${TPU_TYPE:-}
TPU_RUNTIME=${TPU_RUNTIME:-}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
SPOT=${TPU_SPOT:-0}
EXTRA=()

while [[ $# -gt 0 ]]; do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; shift 2 ;;
    --project) need_value "$@"; GCP_PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; TPU_TYPE=$2; shift 2 ;;
    --version) need_value "$@"; TPU_RUNTIME=$2; shift 2 ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require "$TPU_NAME" "--name (or TPU_NAME)"
require "$TPU_ZONE" "--zone (or TPU_ZONE)"
require "$TPU_TYPE" "--accelerator-type (or TPU_TYPE)"
require "$TPU_RUNTIME" "--version (or TPU_RUNTIME)"
capacity=()
if [[ $PREEMPTIBLE == 1 ]]; then capacity+=(--preemptible); fi
if [[ $SPOT == 1 ]]; then capacity+=(--spot); fi
if [[ ${#capacity[@]} -gt 1 ]]; then die "--preemptible and --spot are mutually exclusive"; fi

# "${arr[@]+...}" keeps empty arrays working under `set -u` on bash < 4.4 (macOS).
tpu_vm create --accelerator-type "$TPU_TYPE" --version "$TPU_RUNTIME" \
  ${capacity[@]+"${capacity[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
