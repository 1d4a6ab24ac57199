"""HF parity for the Llama-family decoder: jaxft logits equal transformers' PyTorch logits on the same weights,
scanned and unscanned; packed segments and padding behave like separate, unpadded sequences."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from jaxft import axes
from jaxft.models import llama_hf
from jaxft.models.llama import LlamaModel
from jaxft.models.llama_hf import ArchitectureError
from jaxft.paths import path_str

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,  # HF's 0.02 gives logits too small for a 1e-4 comparison to mean much
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
# family -> (config, save_pretrained kwargs). The llama3 band edges (wavelengths 16 and 64) fall between
# head_dim 16's frequencies, so all three branches of its scaling run.
FAMILIES = {
    "llama": (
        lambda: LlamaConfig(**TINY, max_position_embeddings=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
        dict(max_shard_size="200KB"),
    ),
    "mistral": (lambda: MistralConfig(**TINY, sliding_window=4), {}),
    "qwen2": (lambda: Qwen2Config(**TINY, tie_word_embeddings=True), {}),
    "qwen3": (lambda: Qwen3Config(**TINY, head_dim=32), {}),  # head_dim != hidden / heads
}
L = 12


def save_tiny(folder: Path, config, seed: int = 0, **save_kwargs) -> Path:
    """A random tiny causal LM saved by transformers; norms and biases randomised so their mapping is tested."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    return folder


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors checkpoint, merging the shards an index lists."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(folder / "model.safetensors"))
    tensors = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(str(folder / name)))
    return tensors


def load_llama(folder: Path, scan_layers: bool) -> LlamaModel:
    """A minimal test-local loader: every parameter from its HF tensor(s); every HF tensor used."""
    spec = llama_hf.spec_from_hf_config(json.loads((folder / "config.json").read_text()), scan_layers=scan_layers)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: LlamaModel(spec, rngs=nnx.Rngs(0))))
    tensors, used, flat = read_tensors(folder), set(), {}
    for p, var in nnx.to_flat_state(abstract):
        entry = llama_hf.hf_entry(path_str(p), spec.num_layers)
        assert entry is not None, path_str(p)
        for key in entry.keys:
            assert tensors[key].shape == entry.hf_shape(var.shape), key
        flat[p] = var.replace(jnp.asarray(entry.to_jaxft([tensors[k] for k in entry.keys], var.shape)))
        used.update(entry.keys)
    assert set(tensors) == used
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def run(model: LlamaModel, input_ids, **kwargs) -> np.ndarray:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, kw: nnx.merge(graphdef, s)(ids, **kw))
    return np.asarray(fn(state, jnp.asarray(input_ids), {k: jnp.asarray(v) for k, v in kwargs.items()}))


def torch_logits(folder: Path, input_ids, attention_mask=None) -> np.ndarray:
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(input_ids), attention_mask=mask).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_family")
    return {name: save_tiny(root / name, make(), **kw) for name, (make, kw) in FAMILIES.items()}


def ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"], (batch, length)).astype(np.int32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_pytorch(checkpoints, family):
    folder = checkpoints[family]
    input_ids = ids(2, L)
    expected = torch_logits(folder, input_ids)
    assert np.abs(expected).max() > 0.3  # a comparison at 1e-4 that means something
    for scan in (True, False):
        ours = run(load_llama(folder, scan), input_ids)
        assert ours.shape == (2, L, TINY["vocab_size"]) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"{family} scan_layers={scan}")


def test_sharded_save_was_sharded(checkpoints):
    assert (checkpoints["llama"] / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_linear_and_dynamic_rope_match_pytorch(tmp_path, kind):
    # max_position_embeddings 8 < L: dynamic NTK scaling takes effect at this length.
    config = LlamaConfig(**TINY, max_position_embeddings=8, rope_scaling={"rope_type": kind, "factor": 2.0})
    folder = save_tiny(tmp_path, config, seed=3)
    input_ids = ids(2, L, seed=3)
    np.testing.assert_allclose(run(load_llama(folder, True), input_ids), torch_logits(folder, input_ids), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_packed_segments_equal_separate_sequences(checkpoints, family):
    model = load_llama(checkpoints[family], scan_layers=True)
    a, b = ids(1, 5, seed=1), ids(1, 7, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)  # two segments + 3 padding tokens
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
    attention_mask = (segment_ids > 0).astype(np.int32)
    ours = run(model, packed, segment_ids=segment_ids, attention_mask=attention_mask)
    np.testing.assert_allclose(ours[:, :5], run(model, a), atol=1e-5)
    np.testing.assert_allclose(ours[:, 5:12], run(model, b), atol=1e-5)
    assert np.isfinite(ours).all()
    positions = np.array([list(range(5)) + list(range(7)) + [0, 1, 2]], np.int32)
    explicit = run(model, packed, segment_ids=segment_ids, attention_mask=attention_mask, positions=positions)
    np.testing.assert_array_equal(explicit, ours)  # the default positions restart at each segment


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_padding_matches_pytorch_and_unpadded(checkpoints, family):
    folder = checkpoints[family]
    model = load_llama(folder, scan_layers=False)
    input_ids = ids(2, L, seed=4)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    ours = run(model, input_ids, attention_mask=attention_mask)
    expected = torch_logits(folder, input_ids, attention_mask)
    np.testing.assert_allclose(ours[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], expected[1, :8], atol=1e-4)
    np.testing.assert_allclose(ours[1, :8], run(model, input_ids[1:, :8])[0], atol=1e-5)
    # Left padding: with positions counted from the first real token, the real tokens see what they see alone.
    left_ids = np.concatenate([np.zeros((1, 4), np.int32), input_ids[1:, :8]], axis=1)
    left_mask = np.array([[0] * 4 + [1] * 8], np.int32)
    left = run(model, left_ids, attention_mask=left_mask, positions=np.maximum(np.cumsum(left_mask, 1) - 1, 0))
    np.testing.assert_allclose(left[0, 4:], ours[1, :8], atol=1e-5)
    assert np.isfinite(left).all()


def test_export_round_trip_is_exact(checkpoints):
    folder = checkpoints["llama"]
    tensors = read_tensors(folder)
    params = nnx.state(load_llama(folder, scan_layers=True), nnx.Param)
    exported = {}
    for p, var in nnx.to_flat_state(params):
        exported.update(llama_hf.hf_entry(path_str(p), 3).to_hf(np.asarray(var.get_value())))
    assert set(exported) == set(tensors)
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


def test_block_reads_only_its_layers(checkpoints):
    folder = checkpoints["llama"]
    tensors = read_tensors(folder)
    entry = llama_hf.hf_entry("layers/self_attn/q_proj/kernel", 3)
    full = entry.to_jaxft([tensors[k] for k in entry.keys], (3, 64, 4, 16))
    read = []
    block = entry.to_jaxft_block(lambda k: read.append(k) or tensors[k], (3, 64, 4, 16), (slice(1, 3), slice(0, 32)))
    np.testing.assert_array_equal(block, full[1:3, :32])
    assert read == list(entry.keys[1:3])


def test_every_parameter_has_logical_axes(checkpoints):
    for scan in (True, False):
        spec = llama_hf.spec_from_hf_config(
            json.loads((checkpoints["qwen3"] / "config.json").read_text()), scan_layers=scan
        )
        abstract = nnx.state(nnx.eval_shape(lambda spec=spec: LlamaModel(spec, rngs=nnx.Rngs(0))))
        for p, var in nnx.to_flat_state(abstract):
            logical = var.get_metadata()["logical_axes"]
            assert len(logical) == len(var.shape), path_str(p)
            assert (logical[0] == axes.LAYERS) == (scan and path_str(p).startswith("layers/")), path_str(p)


def test_sharded_forward_equals_unsharded(checkpoints):
    """fsdp × tensor sharding from the logical axes (with rules for the two new names) gives the same logits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxft import sharding
    from jaxft.config import MeshConfig

    rules = MeshConfig().rules + ((axes.LAYERS, None), (axes.KV_HEADS, "tensor"))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    model = load_llama(checkpoints["qwen3"], scan_layers=True)
    graphdef, params = nnx.split(model)
    specs = sharding.infer_param_specs(params, rules, mesh)
    assert specs["layers/self_attn/k_proj/kernel"] == PartitionSpec(None, "fsdp", "tensor", None)
    placed = jax.device_put(params, sharding.shardings_like(params, sharding.to_named_shardings(specs, mesh)))
    input_ids = jax.device_put(jnp.asarray(ids(4, L, seed=6)), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    sharded = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(placed, input_ids)
    np.testing.assert_allclose(np.asarray(sharded), run(model, ids(4, L, seed=6)), atol=1e-5)


def test_remat_and_bf16_compute(checkpoints):
    model = load_llama(checkpoints["llama"], scan_layers=True)
    graphdef, params = nnx.split(model)
    input_ids = jnp.asarray(ids(2, L, seed=5))

    def loss(p, remat, dtype=jnp.float32):
        return nnx.merge(graphdef, p).configure(dtype, remat)(input_ids).mean()

    base = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
    for remat in ("full", "dots_saveable"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        np.testing.assert_allclose(value, base[0], rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(base[1])):
            np.testing.assert_allclose(g, g0, atol=1e-6)
    fp32 = run(model, input_ids)
    bf16 = run(nnx.merge(graphdef, params).configure(jnp.bfloat16), input_ids)
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.1
    with pytest.raises(ValueError, match="remat"):
        model.configure(remat="some")


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
    hf = dict(TINY, model_type="llama")
    hf.update(change)
    with pytest.raises(ArchitectureError, match=message):
        llama_hf.spec_from_hf_config(hf)


def test_old_style_rope_config_reads_the_same():
    new = dict(model_type="llama", **TINY, rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))
    old = dict(model_type="llama", **TINY, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    assert llama_hf.spec_from_hf_config(new) == llama_hf.spec_from_hf_config(old)
