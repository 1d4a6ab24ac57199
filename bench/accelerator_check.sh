#!/usr/bin/env bash
# The GPU (or TPU) check: parity tests in fp32 at the highest matmul precision, bf16 train steps of MiniLM and of
# a Llama-3.2-1B-shaped model, a checkpoint save and resume, and a 50-step LoRA SFT. One JSON line per figure on
# stdout; each part is bounded in time, and the whole runs in under 8 minutes on one H100/H200.
#
#   bench/accelerator_check.sh [--quick]      --quick: tiny shapes, to try it on a CPU (JAX_PLATFORMS=cpu) first
#
# On a machine without network, wheels jaxft needs and the image lacks go in wheels/ (see DEVELOPERS.md); they
# are installed into .check_deps/ (not into the image's environment) and put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target .check_deps wheels/*.whl > /dev/null 2>&1 \
    && export PYTHONPATH="$PWD/.check_deps:$PYTHONPATH"
fi
export JAXFT_XLA_CACHE=off

"$PY" -c 'import json, jax; d = jax.devices()[0]; print(json.dumps({"check": "device", "jax": jax.__version__, "platform": d.platform, "kind": d.device_kind, "count": jax.device_count()}))'

missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("grain", "tensorflow_datasets", "array_record", "tensorboardX", "safetensors", "tokenizers", "orbax.checkpoint", "transformers", "torch", "pytest") if u.find_spec(m.split(".")[0]) is None))')
echo "{\"check\": \"imports\", \"missing\": \"$missing\"}"

# Parity with PyTorch (CPU reference) in fp32: the model files' own tests, the device doing jaxft's side.
parity=$(timeout 150 env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_bert.py tests/test_models.py 2>&1 | tail -1)
echo "{\"check\": \"parity_fp32_highest\", \"result\": \"${parity//\"/\'}\"}"

timeout 120 "$PY" bench/accelerator_check.py step --model minilm $QUICK || echo '{"check": "train_step", "model": "minilm", "error": "failed or timed out"}'
timeout 180 "$PY" bench/accelerator_check.py step --model llama-1b $QUICK || echo '{"check": "train_step", "model": "llama-1b", "error": "failed or timed out"}'
timeout 90 "$PY" bench/accelerator_check.py resume $QUICK || echo '{"check": "checkpoint_resume", "error": "failed or timed out"}'
timeout 90 "$PY" bench/accelerator_check.py sft $QUICK || echo '{"check": "lora_sft", "error": "failed or timed out"}'
