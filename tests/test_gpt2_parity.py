"""HF parity for GPT-2: jaxft logits equal transformers' PyTorch logits on the same weights, scanned and unscanned,
from LM-head, sharded and bare checkpoints; packed segments and padding behave like separate, unpadded sequences."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel, GPT2Model

from jaxft import axes
from jaxft.models import gpt2_hf
from jaxft.models.gpt2 import GPT2Model as JaxGPT2Model
from jaxft.models.gpt2_hf import ArchitectureError
from jaxft.paths import path_str
from tests.test_llama_parity import read_tensors, run, torch_logits

TINY = dict(
    vocab_size=1000,
    n_embd=64,
    n_layer=3,
    n_head=4,
    n_positions=64,
    bos_token_id=0,  # the default 50256 lies outside the tiny vocabulary
    eos_token_id=0,
    initializer_range=0.1,  # HF's 0.02 gives logits too small for a 1e-4 comparison to mean much
)
L = 12


def save_tiny(folder: Path, bare: bool = False, seed: int = 0, config: dict | None = None, **save_kwargs) -> Path:
    """A random tiny GPT2LMHeadModel (or bare GPT2Model) saved by transformers; layer norms and biases randomised
    so their mapping is tested. `config` overrides TINY's fields."""
    torch.manual_seed(seed)
    model = (GPT2Model if bare else GPT2LMHeadModel)(GPT2Config(**{**TINY, **(config or {})})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"ln_(1|2|f)\.weight$", name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return folder


def load_gpt2(folder: Path, scan_layers: bool) -> JaxGPT2Model:
    """A minimal test-local loader: every parameter from its HF tensor(s); every other HF tensor ignorable."""
    spec = gpt2_hf.spec_from_hf_config(json.loads((folder / "config.json").read_text()), scan_layers=scan_layers)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: JaxGPT2Model(spec, rngs=nnx.Rngs(0))))
    tensors, used, flat = read_tensors(folder), set(), {}
    prefix = gpt2_hf.detect_prefix(list(tensors))
    for p, var in nnx.to_flat_state(abstract):
        entry = gpt2_hf.hf_entry(path_str(p), spec.num_layers, prefix)
        assert entry is not None, path_str(p)
        for key in entry.keys:
            assert tensors[key].shape == entry.hf_shape(var.shape), key
        flat[p] = var.replace(jnp.asarray(entry.to_jaxft([tensors[k] for k in entry.keys], var.shape)))
        used.update(entry.keys)
    ignorable = gpt2_hf.ignorable_keys(spec)
    assert all(any(re.fullmatch(r, k) for r in ignorable) for k in set(tensors) - used)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    return {
        "lm": save_tiny(root / "lm"),
        "sharded": save_tiny(root / "sharded", max_shard_size="100KB"),  # the same weights (same seed)
        "bare": save_tiny(root / "bare", bare=True, seed=1),
    }


@pytest.fixture(scope="module")
def scanned(checkpoints) -> JaxGPT2Model:
    return load_gpt2(checkpoints["lm"], scan_layers=True)


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"], (batch, length)).astype(np.int32)


def test_logits_match_pytorch(checkpoints, scanned):
    input_ids = ids(2, L)
    expected = torch_logits(checkpoints["lm"], input_ids)
    assert np.abs(expected).max() > 0.3  # a comparison at 1e-4 that means something
    for scan, model in ((True, scanned), (False, load_gpt2(checkpoints["lm"], scan_layers=False))):
        ours = run(model, input_ids)
        assert ours.shape == (2, L, TINY["vocab_size"]) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"scan_layers={scan}")


def test_unscaled_attention_exact_gelu_and_n_inner_match_pytorch(tmp_path):
    config = dict(scale_attn_weights=False, activation_function="gelu", n_inner=96)
    folder = save_tiny(tmp_path, seed=3, config=config)
    input_ids = ids(2, L, seed=3)
    np.testing.assert_allclose(run(load_gpt2(folder, True), input_ids), torch_logits(folder, input_ids), atol=1e-4)


def test_sharded_save_loads_the_same(checkpoints, scanned):
    assert (checkpoints["sharded"] / "model.safetensors.index.json").is_file()
    input_ids = ids(2, L, seed=1)
    np.testing.assert_array_equal(run(load_gpt2(checkpoints["sharded"], True), input_ids), run(scanned, input_ids))


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


def test_packed_segments_equal_separate_sequences(scanned):
    a, b = ids(1, 5, seed=1), ids(1, 7, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)  # two segments + 3 padding tokens
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
    attention_mask = (segment_ids > 0).astype(np.int32)
    ours = run(scanned, packed, segment_ids=segment_ids, attention_mask=attention_mask)
    np.testing.assert_allclose(ours[:, :5], run(scanned, a), atol=1e-5)
    np.testing.assert_allclose(ours[:, 5:12], run(scanned, b), atol=1e-5)
    assert np.isfinite(ours).all()
    positions = np.array([list(range(5)) + list(range(7)) + [0, 1, 2]], np.int32)
    explicit = run(scanned, packed, segment_ids=segment_ids, attention_mask=attention_mask, positions=positions)
    np.testing.assert_array_equal(explicit, ours)  # the default positions restart at each segment


def test_right_padding_matches_pytorch_and_unpadded(checkpoints, scanned):
    input_ids = ids(2, L, seed=4)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    ours = run(scanned, input_ids, attention_mask=attention_mask)
    expected = torch_logits(checkpoints["lm"], input_ids, attention_mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], expected[1, :8], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], run(scanned, input_ids[1:, :8])[0], atol=1e-5)


def test_export_round_trip_is_exact(checkpoints, scanned):
    tensors = read_tensors(checkpoints["lm"])
    exported = {}
    for p, var in nnx.to_flat_state(nnx.state(scanned, nnx.Param)):
        exported.update(gpt2_hf.hf_entry(path_str(p), 3).to_hf(np.asarray(var.get_value())))
    assert set(exported) == set(tensors)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


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


def test_every_parameter_has_logical_axes(checkpoints):
    hf = json.loads((checkpoints["lm"] / "config.json").read_text())
    for scan in (True, False):
        spec = gpt2_hf.spec_from_hf_config(hf, scan_layers=scan)
        abstract = nnx.state(nnx.eval_shape(lambda spec=spec: JaxGPT2Model(spec, rngs=nnx.Rngs(0))))
        for p, var in nnx.to_flat_state(abstract):
            logical = var.get_metadata()["logical_axes"]
            assert len(logical) == len(var.shape), path_str(p)
            assert (logical[0] == axes.LAYERS) == (scan and path_str(p).startswith("layers/")), path_str(p)


def test_sharded_forward_equals_unsharded(scanned):
    """fsdp × tensor sharding from the logical axes (with a rule for the stacked layers) gives the same logits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxft import sharding
    from jaxft.config import MeshConfig

    rules = MeshConfig().rules + ((axes.LAYERS, None),)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, params = nnx.split(scanned)
    specs = sharding.infer_param_specs(params, rules, mesh)
    assert specs["layers/attn/c_attn/kernel"] == PartitionSpec(None, "fsdp", None, "tensor", None)
    placed = jax.device_put(params, sharding.shardings_like(params, sharding.to_named_shardings(specs, mesh)))
    input_ids = jax.device_put(jnp.asarray(ids(4, L, seed=6)), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    sharded = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(placed, input_ids)
    np.testing.assert_allclose(np.asarray(sharded), run(scanned, ids(4, L, seed=6)), atol=1e-5)


def test_remat_and_bf16_compute(scanned):
    graphdef, params = nnx.split(scanned)
    input_ids = jnp.asarray(ids(2, L, seed=5))

    def loss(p, remat, dtype=jnp.float32):
        return nnx.merge(graphdef, p).configure(dtype, remat)(input_ids).mean()

    base = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
    for remat in ("full", "dots_saveable"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        np.testing.assert_allclose(value, base[0], rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(base[1])):
            np.testing.assert_allclose(g, g0, atol=1e-6)
    fp32 = run(scanned, input_ids)
    bf16 = run(nnx.merge(graphdef, params).configure(jnp.bfloat16), input_ids)
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.1


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
    hf = dict(TINY, model_type="gpt2")
    hf.update(change)
    with pytest.raises(ArchitectureError, match=message):
        gpt2_hf.spec_from_hf_config(hf)


def test_spec_reads_hf_defaults():
    spec = gpt2_hf.spec_from_hf_config(dict(TINY, model_type="gpt2"), scan_layers=False)
    assert (spec.intermediate_size, spec.head_dim, spec.hidden_act, spec.scan_layers) == (256, 16, "gelu_new", False)
    assert gpt2_hf.spec_from_hf_config(dict(TINY, model_type="gpt2", n_inner=96)).intermediate_size == 96


def test_ignorable_keys_are_the_head_and_old_mask_buffers_only():
    ignorable = gpt2_hf.ignorable_keys(gpt2_hf.spec_from_hf_config(dict(TINY, model_type="gpt2")))
    for key in ("lm_head.weight", "transformer.h.0.attn.bias", "h.11.attn.masked_bias"):
        assert any(re.fullmatch(r, key) for r in ignorable), key
    for key in ("transformer.h.0.attn.c_attn.bias", "h.0.attn.c_proj.bias", "transformer.wte.weight"):
        assert not any(re.fullmatch(r, key) for r in ignorable), key
