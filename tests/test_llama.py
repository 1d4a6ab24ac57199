"""The Llama block's own behaviour (the parity every decoder shares is in test_decoder.py): linear, dynamic and
llama3 RoPE scaling, right and left padding against PyTorch, sharded checkpoints, block reads of stacked layers,
and the HF configs it refuses."""

from pathlib import Path

import numpy as np
import pytest
from transformers import LlamaConfig

from jaxft.models import llama_hf
from jaxft.models.llama_hf import ArchitectureError
from tests.fixtures import (
    LLAMA3_ROPE,
    LLAMA_FAMILY_NAMES,
    LLAMA_TINY,
    load_llama,
    read_tensors,
    run_model,
    save_llama_family,
    save_tiny_llama,
    token_ids,
    torch_logits,
)

L = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_family")
    return {name: save_llama_family(root / name, name) for name in LLAMA_FAMILY_NAMES}


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return token_ids(batch, length, seed)


def test_sharded_save_was_sharded(checkpoints):
    assert (checkpoints["llama"] / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_linear_and_dynamic_rope_match_pytorch(tmp_path, kind):
    # max_position_embeddings 8 < L: dynamic NTK scaling takes effect at this length.
    config = LlamaConfig(**LLAMA_TINY, max_position_embeddings=8, rope_scaling={"rope_type": kind, "factor": 2.0})
    folder = save_tiny_llama(tmp_path, config, seed=3)
    input_ids = ids(2, L, seed=3)
    np.testing.assert_allclose(
        run_model(load_llama(folder, True), input_ids), torch_logits(folder, input_ids), atol=1e-4
    )


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padding_matches_pytorch_and_unpadded(checkpoints, family):
    folder = checkpoints[family]
    model = load_llama(folder, scan_layers=False)
    input_ids = ids(2, L, seed=4)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    ours = run_model(model, input_ids, attention_mask=attention_mask)
    expected = torch_logits(folder, input_ids, attention_mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], expected[1, :8], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], run_model(model, input_ids[1:, :8])[0], atol=1e-5)
    # Left padding: with positions counted from the first real token, the real tokens see what they see alone.
    left_ids = np.concatenate([np.zeros((1, 4), np.int32), input_ids[1:, :8]], axis=1)
    left_mask = np.array([[0] * 4 + [1] * 8], np.int32)
    left = run_model(model, left_ids, attention_mask=left_mask, positions=np.maximum(np.cumsum(left_mask, 1) - 1, 0))
    np.testing.assert_allclose(left[0, 4:], ours[1, :8], atol=1e-5)
    assert np.isfinite(left).all()


def test_block_reads_only_its_layers(checkpoints):
    folder = checkpoints["llama"]
    tensors = read_tensors(folder)
    entry = llama_hf.hf_entry("layers/self_attn/q_proj/kernel", 3)
    full = entry.to_jaxft([tensors[k] for k in entry.keys], (3, 64, 4, 16))
    read = []
    block = entry.to_jaxft_block(lambda k: read.append(k) or tensors[k], (3, 64, 4, 16), (slice(1, 3), slice(0, 32)))
    np.testing.assert_array_equal(block, full[1:3, :32])
    assert read == list(entry.keys[1:3])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "not a Llama-family"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(hidden_act="tanh"), "hidden_act"),
        (dict(num_key_value_heads=3), "multiple"),
        (
            dict(model_type="qwen2", layer_types=["full_attention", "sliding_attention"], sliding_window=8),
            "layer_types",
        ),
    ],
)
def test_unsupported_configs_raise(change, message):
    hf = dict(LLAMA_TINY, model_type="llama")
    hf.update(change)
    with pytest.raises(ArchitectureError, match=message):
        llama_hf.spec_from_hf_config(hf)


def test_old_style_rope_config_reads_the_same():
    new = dict(model_type="llama", **LLAMA_TINY, rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))
    old = dict(model_type="llama", **LLAMA_TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    assert llama_hf.spec_from_hf_config(new) == llama_hf.spec_from_hf_config(old)
