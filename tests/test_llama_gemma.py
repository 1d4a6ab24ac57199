"""Gemma and Gemma 3 in the Llama block, beyond the parity every decoder shares (test_decoder.py): Gemma 3's spec
reads every feature (interleaved sliding/global layers with their own RoPE, (1 + w) norms, sandwich norms, q/k norms,
scaled embeddings), its padding matches PyTorch, cached generation equals the full forward, and a Gemma 2
checkpoint (attention soft-capping) is refused in one line."""

import json

import numpy as np
import pytest
from flax import nnx
from transformers import Gemma2Config

from jaxft.generate import generate
from jaxft.models import ArchitectureError, llama_hf
from tests.fixtures import (
    GEMMA3,
    GEMMA_TINY,
    load_llama,
    reference_greedy,
    run_model,
    save_tiny_gemma,
    token_ids,
    torch_logits,
)

L = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {"gemma3": save_tiny_gemma(root / "gemma3", "gemma3")}


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return token_ids(batch, length, seed, vocab=GEMMA_TINY["vocab_size"])


def test_gemma3_spec_reads_every_feature(checkpoints):
    spec = llama_hf.spec_from_hf_config(json.loads((checkpoints["gemma3"] / "config.json").read_text()))
    assert spec.layer_types == tuple(GEMMA3["layer_types"]) and spec.sliding_window == 4
    assert spec.rope.kind == "linear" and spec.rope.theta == 100000.0 and spec.local_rope.theta == 1000.0
    assert spec.norm_offset and spec.embed_scale and spec.sandwich_norms and spec.qk_norm
    assert spec.query_scale == 24**-0.5 and spec.final_logit_softcap == 20.0 and spec.tie_word_embeddings


def test_gemma3_padding_matches_pytorch(checkpoints):
    folder = checkpoints["gemma3"]
    mask = np.ones((2, L), np.int32)
    mask[1, 7:] = 0
    input_ids = ids(2, L, seed=5)
    expected = torch_logits(folder, input_ids, mask)
    got = run_model(load_llama(folder, scan_layers=False), input_ids, attention_mask=mask)
    np.testing.assert_allclose(got[1, :7], expected[1, :7], atol=1e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_gemma3_cached_generation_equals_full_forward(checkpoints, scan):
    graphdef, params = nnx.split(load_llama(checkpoints["gemma3"], scan_layers=scan))
    prompts = [ids(1, 7, seed=7)[0].tolist(), ids(1, 3, seed=8)[0].tolist()]
    ours = generate((graphdef, params), prompts, 6)
    assert ours == [reference_greedy(graphdef, params, p, 6) for p in prompts]


def test_gemma2_attention_softcapping_is_refused():
    config = Gemma2Config(**GEMMA_TINY, num_hidden_layers=2).to_dict()
    assert config["attn_logit_softcapping"]
    with pytest.raises(ArchitectureError, match="attn_logit_softcapping") as e:
        llama_hf.spec_from_hf_config(config)
    assert "\n" not in str(e.value)
