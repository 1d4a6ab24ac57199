"""Gemma and Gemma 3 in the Llama block: logits match transformers' (PyTorch) within 1e-4 in fp32, scanned and
unscanned, for Gemma 3's interleaved sliding/global layers with their own RoPE, (1 + w) norms, sandwich norms,
q/k norms and scaled embeddings; packed segments stay apart; cached generation equals the full forward; a Gemma 2
checkpoint (attention soft-capping) is refused in one line."""

import json

import numpy as np
import pytest
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from jaxft.models import ArchitectureError, llama_hf
from tests.test_generate import reference_greedy
from tests.test_llama_parity import load_llama, run, save_tiny, torch_logits

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.1,
)
L = 12
GEMMA3 = dict(
    num_hidden_layers=4,
    sliding_window=4,  # < L, so the window bites
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    query_pre_attn_scalar=24,  # != head_dim: the score scale is its own
    final_logit_softcapping=20.0,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
    },
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {
        "gemma3": save_tiny(root / "gemma3", Gemma3TextConfig(**TINY, **GEMMA3)),
        "gemma": save_tiny(root / "gemma", GemmaConfig(**TINY, num_hidden_layers=2)),
    }


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"], (batch, length)).astype(np.int32)


@pytest.mark.parametrize("family", ["gemma3", "gemma"])
def test_logits_match_pytorch(checkpoints, family):
    folder = checkpoints[family]
    input_ids = ids(2, L)
    expected = torch_logits(folder, input_ids)
    assert np.abs(expected).max() > 0.3
    for scan in (True, False):
        ours = run(load_llama(folder, scan), input_ids)
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"{family} scan_layers={scan}")


def test_gemma3_spec_reads_every_feature(checkpoints):
    spec = llama_hf.spec_from_hf_config(json.loads((checkpoints["gemma3"] / "config.json").read_text()))
    assert spec.layer_types == tuple(GEMMA3["layer_types"]) and spec.sliding_window == 4
    assert spec.rope.kind == "linear" and spec.rope.theta == 100000.0 and spec.local_rope.theta == 1000.0
    assert spec.norm_offset and spec.embed_scale and spec.sandwich_norms and spec.qk_norm
    assert spec.query_scale == 24**-0.5 and spec.final_logit_softcap == 20.0 and spec.tie_word_embeddings


def test_gemma3_packed_segments_and_padding(checkpoints):
    folder = checkpoints["gemma3"]
    model = load_llama(folder, scan_layers=True)
    a, b = ids(1, 5, seed=1), ids(1, 7, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
    ours = run(model, packed, segment_ids=segment_ids, attention_mask=(segment_ids > 0).astype(np.int32))
    np.testing.assert_allclose(ours[:, :5], run(model, a), atol=1e-5)
    np.testing.assert_allclose(ours[:, 5:12], run(model, b), atol=1e-5)
    mask = np.ones((2, L), np.int32)
    mask[1, 7:] = 0
    input_ids = ids(2, L, seed=5)
    expected = torch_logits(folder, input_ids, mask)
    got = run(load_llama(folder, scan_layers=False), input_ids, attention_mask=mask)
    np.testing.assert_allclose(got[1, :7], expected[1, :7], atol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_gemma3_cached_generation_equals_full_forward(checkpoints, scan):
    from flax import nnx

    from jaxft.generate import generate

    graphdef, params = nnx.split(load_llama(checkpoints["gemma3"], scan_layers=scan))
    prompts = [ids(1, 7, seed=7)[0].tolist(), ids(1, 3, seed=8)[0].tolist()]
    ours = generate((graphdef, params), prompts, 6)
    assert ours == [reference_greedy(graphdef, params, p, 6) for p in prompts]


def test_gemma2_attention_softcapping_is_refused():
    config = Gemma2Config(**TINY, num_hidden_layers=2).to_dict()
    assert config["attn_logit_softcapping"]
    with pytest.raises(ArchitectureError, match="attn_logit_softcapping") as e:
        llama_hf.spec_from_hf_config(config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scan", [True, False])
def test_gemma3_weights_round_trip_to_hf_keys(checkpoints, scan):
    from flax import nnx

    from jaxft.paths import path_str
    from tests.test_llama_parity import read_tensors

    folder = checkpoints["gemma3"]
    tensors = read_tensors(folder)
    params = nnx.state(load_llama(folder, scan_layers=scan), nnx.Param)
    exported = {}
    for p, var in nnx.to_flat_state(params):
        entry = llama_hf.hf_entry(path_str(p), GEMMA3["num_hidden_layers"])
        exported.update(entry.to_hf(np.asarray(var.get_value())))
    assert set(exported) == set(tensors)  # the pre/post feed-forward norms included
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)
