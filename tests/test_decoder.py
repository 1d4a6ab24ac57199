"""HF parity of every decoder family, one parametrized test per property: jaxft logits equal transformers'
PyTorch logits on the same weights (scanned and unscanned), packed segments behave like separate sequences,
weights go back to exactly the HF tensors, every parameter has logical axes, an fsdp x tensor sharded forward
equals the unsharded one, and remat and bf16 compute leave the loss and gradients as they were.
Family-specific behaviour is in test_llama.py, test_llama_gemma.py and test_gpt2.py."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft import axes, sharding
from jaxft.config import MeshConfig
from jaxft.models import gpt2_hf, llama_hf
from jaxft.models.gpt2 import GPT2Model
from jaxft.models.llama import LlamaModel
from jaxft.paths import path_str
from tests.fixtures import (
    LLAMA_FAMILY_NAMES,
    load_decoder,
    read_tensors,
    run_model,
    save_llama_family,
    save_tiny_gemma,
    save_tiny_gpt2,
    token_ids,
    torch_logits,
)

L = 12
FAMILIES = (*LLAMA_FAMILY_NAMES, "gemma", "gemma3", "gpt2")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    folders = {name: save_llama_family(root / name, name) for name in LLAMA_FAMILY_NAMES}
    folders.update({name: save_tiny_gemma(root / name, name) for name in ("gemma", "gemma3")})
    folders["gpt2"] = save_tiny_gpt2(root / "gpt2")
    return folders


def hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def ids(folder: Path, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return token_ids(batch, length, seed, vocab=hf_config(folder)["vocab_size"])


def hf_module(folder: Path):
    return gpt2_hf if hf_config(folder)["model_type"] == "gpt2" else llama_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_pytorch(checkpoints, family):
    folder = checkpoints[family]
    input_ids = ids(folder, 2, L)
    expected = torch_logits(folder, input_ids)
    assert np.abs(expected).max() > 0.3  # a comparison at 1e-4 that means something
    for scan in (True, False):
        ours = run_model(load_decoder(folder, scan), input_ids)
        assert ours.shape == (2, L, hf_config(folder)["vocab_size"]) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"{family} scan_layers={scan}")


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2"])
def test_packed_segments_equal_separate_sequences(checkpoints, family):
    folder = checkpoints[family]
    model = load_decoder(folder, scan_layers=True)
    a, b = ids(folder, 1, 5, seed=1), ids(folder, 1, 7, seed=2)
    packed = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)  # two segments + 3 padding tokens
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
    attention_mask = (segment_ids > 0).astype(np.int32)
    ours = run_model(model, packed, segment_ids=segment_ids, attention_mask=attention_mask)
    np.testing.assert_allclose(ours[:, :5], run_model(model, a), atol=1e-5)
    np.testing.assert_allclose(ours[:, 5:12], run_model(model, b), atol=1e-5)
    assert np.isfinite(ours).all()
    positions = np.array([list(range(5)) + list(range(7)) + [0, 1, 2]], np.int32)
    explicit = run_model(model, packed, segment_ids=segment_ids, attention_mask=attention_mask, positions=positions)
    np.testing.assert_array_equal(explicit, ours)  # the default positions restart at each segment


@pytest.mark.parametrize("family, scan", [("llama", True), ("gemma3", True), ("gemma3", False), ("gpt2", True)])
def test_export_round_trip_is_exact(checkpoints, family, scan):
    folder = checkpoints[family]
    tensors = read_tensors(folder)
    params = nnx.state(load_decoder(folder, scan_layers=scan), nnx.Param)
    hf = hf_config(folder)
    num_layers = hf.get("num_hidden_layers", hf.get("n_layer"))
    exported = {}
    for p, var in nnx.to_flat_state(params):
        exported.update(hf_module(folder).hf_entry(path_str(p), num_layers).to_hf(np.asarray(var.get_value())))
    assert set(exported) == set(tensors)  # Gemma 3's pre/post feed-forward norms included
    for key, value in exported.items():
        np.testing.assert_array_equal(value, tensors[key], err_msg=key)


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_every_parameter_has_logical_axes(checkpoints, family):
    folder = checkpoints[family]
    model_class = GPT2Model if family == "gpt2" else LlamaModel
    for scan in (True, False):
        spec = hf_module(folder).spec_from_hf_config(hf_config(folder), scan_layers=scan)
        abstract = nnx.state(nnx.eval_shape(lambda spec=spec: model_class(spec, rngs=nnx.Rngs(0))))
        for p, var in nnx.to_flat_state(abstract):
            logical = var.get_metadata()["logical_axes"]
            assert len(logical) == len(var.shape), path_str(p)
            assert (logical[0] == axes.LAYERS) == (scan and path_str(p).startswith("layers/")), path_str(p)


@pytest.mark.parametrize(
    "family, extra_rules, path, spec",
    [
        (
            "qwen3",
            ((axes.LAYERS, None), (axes.KV_HEADS, "tensor")),
            "layers/self_attn/k_proj/kernel",
            PartitionSpec(None, "fsdp", "tensor", None),
        ),
        (
            "gpt2",
            ((axes.LAYERS, None),),
            "layers/attn/c_attn/kernel",
            PartitionSpec(None, "fsdp", None, "tensor", None),
        ),
    ],
)
def test_sharded_forward_equals_unsharded(checkpoints, family, extra_rules, path, spec):
    """fsdp x tensor sharding from the logical axes (with rules for the family's extra names) gives the same
    logits."""
    folder = checkpoints[family]
    rules = MeshConfig().rules + extra_rules
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    model = load_decoder(folder, scan_layers=True)
    graphdef, params = nnx.split(model)
    specs = sharding.infer_param_specs(params, rules, mesh)
    assert specs[path] == spec
    placed = jax.device_put(params, sharding.shardings_like(params, sharding.to_named_shardings(specs, mesh)))
    input_ids = ids(folder, 4, L, seed=6)
    batch = jax.device_put(jnp.asarray(input_ids), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    sharded = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(placed, batch)
    np.testing.assert_allclose(np.asarray(sharded), run_model(model, input_ids), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remat_and_bf16_compute(checkpoints, family):
    model = load_decoder(checkpoints[family], scan_layers=True)
    graphdef, params = nnx.split(model)
    input_ids = jnp.asarray(ids(checkpoints[family], 2, L, seed=5))

    def loss(p, remat, dtype=jnp.float32):
        return nnx.merge(graphdef, p).configure(dtype, remat)(input_ids).mean()

    base = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
    for remat in ("full", "dots_saveable"):
        value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        np.testing.assert_allclose(value, base[0], rtol=1e-6)
        for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(base[1])):
            np.testing.assert_allclose(g, g0, atol=1e-6)
    fp32 = run_model(model, input_ids)
    bf16 = run_model(nnx.merge(graphdef, params).configure(jnp.bfloat16), input_ids)
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.1
    with pytest.raises(ValueError, match="remat"):
        model.configure(remat="some")
