# shellcheck shell=bash
# Helpers shared by the tpu_scripts/*.sh entry points. Sourced, never executed.

# Settings every script takes; flags override these env-var fallbacks.
TPU_NAME=${TPU_NAME:-}
TPU_ZONE=${TPU_ZONE:-}
GCP_PROJECT=${GCP_PROJECT:-}
DRY_RUN=0

# One-line error and exit 2, so a misconfigured call fails before touching GCP.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need_value FLAG [VALUE...]: a flag that takes a value must not be last.
need_value() {
  [[ $# -ge 2 ]] || die "$1 needs a value"
}

# require VALUE DESCRIPTION: fail on an empty required setting.
require() {
  [[ -n $1 ]] || die "missing $2"
}

# Run a command, or with --dry-run print it %q-quoted so it can be copy-pasted.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# tpu_vm SUBCOMMAND [ARGS...]: `gcloud compute tpus tpu-vm SUBCOMMAND NAME`
# with the zone and (if set) project every subcommand needs.
tpu_vm() {
  local sub=$1
  shift
  run gcloud compute tpus tpu-vm "$sub" "$TPU_NAME" --zone "$TPU_ZONE" \
    ${GCP_PROJECT:+--project "$GCP_PROJECT"} "$@"
}

# A path for use inside a remote command. Relative paths (and ~/...) are made
# relative to the remote $HOME, left for the worker's shell to expand;
# everything else is %q-quoted so spaces and metacharacters survive ssh.
remote_path() {
  local p=${1#\~/}
  if [[ $p == /* ]]; then
    printf '%q' "$p"
  else
    # shellcheck disable=SC2016 # $HOME is for the remote shell to expand
    printf '"$HOME"/%q' "$p"
  fi
}
