"""GPT-2's own behaviour (the parity every decoder shares is in test_decoder.py): unscaled attention, exact gelu
and n_inner against PyTorch, sharded and bare (headless) checkpoints, right padding, block reads of the fused qkv
weight, the HF defaults it reads and the configs it refuses."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModel

from jaxft.models import gpt2_hf
from jaxft.models.gpt2 import GPT2Model as JaxGPT2Model
from jaxft.models.hf_layout import ArchitectureError
from tests.fixtures import GPT2_TINY, load_gpt2, read_tensors, run_model, save_tiny_gpt2, token_ids, torch_logits

L = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    return {
        "lm": save_tiny_gpt2(root / "lm"),
        "sharded": save_tiny_gpt2(root / "sharded", max_shard_size="100KB"),  # the same weights (same seed)
        "bare": save_tiny_gpt2(root / "bare", bare=True, seed=1),
    }


@pytest.fixture(scope="module")
def scanned(checkpoints) -> JaxGPT2Model:
    return load_gpt2(checkpoints["lm"], scan_layers=True)


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return token_ids(batch, length, seed, vocab=GPT2_TINY["vocab_size"])


def test_unscaled_attention_exact_gelu_and_n_inner_match_pytorch(tmp_path):
    config = dict(scale_attn_weights=False, activation_function="gelu", n_inner=96)
    folder = save_tiny_gpt2(tmp_path, seed=3, config=config)
    input_ids = ids(2, L, seed=3)
    np.testing.assert_allclose(
        run_model(load_gpt2(folder, True), input_ids), torch_logits(folder, input_ids), atol=1e-4
    )


def test_sharded_save_loads_the_same(checkpoints, scanned):
    assert (checkpoints["sharded"] / "model.safetensors.index.json").is_file()
    input_ids = ids(2, L, seed=1)
    np.testing.assert_array_equal(
        run_model(load_gpt2(checkpoints["sharded"], True), input_ids), run_model(scanned, input_ids)
    )


def test_bare_checkpoint_matches_pytorch_hidden_states(checkpoints):
    folder = checkpoints["bare"]
    assert not any(k.startswith("transformer.") for k in read_tensors(folder))
    input_ids = ids(2, L, seed=2)
    ref = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(input_ids)).last_hidden_state.numpy()
    model = load_gpt2(folder, scan_layers=True)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda s, i: nnx.merge(graphdef, s).hidden_states(i))(state, jnp.asarray(input_ids))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=0)


def test_right_padding_matches_pytorch_and_unpadded(checkpoints, scanned):
    input_ids = ids(2, L, seed=4)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    ours = run_model(scanned, input_ids, attention_mask=attention_mask)
    expected = torch_logits(checkpoints["lm"], input_ids, attention_mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], expected[1, :8], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], run_model(scanned, input_ids[1:, :8])[0], atol=1e-5)


def test_block_reads_only_its_layers(checkpoints):
    tensors = read_tensors(checkpoints["lm"])
    entry = gpt2_hf.hf_entry("layers/attn/c_attn/kernel", 3)
    shape = (3, 64, 3, 4, 16)
    full = entry.to_jaxft([tensors[k] for k in entry.keys], shape)
    # The Conv1D weight [E, 3E] is q | k | v along its columns, each N heads of H: a plain reshape.
    np.testing.assert_array_equal(full[2, :, 1, 3], tensors["transformer.h.2.attn.c_attn.weight"][:, 64 + 48 : 128])
    read = []
    block = entry.to_jaxft_block(lambda k: read.append(k) or tensors[k], shape, (slice(1, 3), slice(0, 32)))
    np.testing.assert_array_equal(block, full[1:3, :32])
    assert read == list(entry.keys[1:3])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="llama"), "model_type 'llama'"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(activation_function="tanh"), "activation_function 'tanh'"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),
        (dict(n_head=5), "n_head"),
    ],
)
def test_unsupported_configs_raise(change, message):
    hf = dict(GPT2_TINY, model_type="gpt2")
    hf.update(change)
    with pytest.raises(ArchitectureError, match=message):
        gpt2_hf.spec_from_hf_config(hf)


def test_spec_reads_hf_defaults():
    spec = gpt2_hf.spec_from_hf_config(dict(GPT2_TINY, model_type="gpt2"), scan_layers=False)
    assert (spec.intermediate_size, spec.head_dim, spec.hidden_act, spec.scan_layers) == (256, 16, "gelu_new", False)
    assert gpt2_hf.spec_from_hf_config(dict(GPT2_TINY, model_type="gpt2", n_inner=96)).intermediate_size == 96


def test_ignorable_keys_are_the_head_and_old_mask_buffers_only():
    ignorable = gpt2_hf.ignorable_keys(gpt2_hf.spec_from_hf_config(dict(GPT2_TINY, model_type="gpt2")))
    for key in ("lm_head.weight", "transformer.h.0.attn.bias", "h.11.attn.masked_bias"):
        assert any(re.fullmatch(r, key) for r in ignorable), key
    for key in ("transformer.h.0.attn.c_attn.bias", "h.0.attn.c_proj.bias", "transformer.wte.weight"):
        assert not any(re.fullmatch(r, key) for r in ignorable), key
