"""The ViT family (ViT, DeiT): logits against transformers' PyTorch models on tiny random checkpoints that the
test saves (image classifiers, DeiT with its distillation head, and bare bodies with a pooler), scanned or not,
under remat; the patch-embedding layout; logical axes on every weight."""

import numpy as np
import pytest

import jaxft
from jaxft.models import vit_hf
from jaxft.models.hf_layout import Kind
from jaxft.paths import path_str
from tests.fixtures import save_tiny_vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def pixels(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    """[B, C, H, W] float pixels, as an HF image processor gives them (normalised, channels first)."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def torch_logits(folder, x: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@pytest.mark.parametrize(
    "family, head, scan, remat",
    [
        ("vit", "classification", True, "none"),
        ("vit", "classification", False, "full"),
        ("deit", "classification", True, "none"),
        ("deit", "teacher", True, "full"),
        ("deit", "teacher", False, "none"),
    ],
)
def test_logits_match_transformers(tmp_path, family, head, scan, remat):
    folder = save_tiny_vit(tmp_path / "model", family, head)
    model = jaxft.load(str(folder), task="image-classification", scan_layers=scan).configure(remat=remat)
    x = pixels()
    got = np.asarray(model(pixel_values=x))
    want = torch_logits(folder, x)
    assert got.shape == want.shape == (2, 3)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_a_bare_body_with_a_pooler_loads_under_a_fresh_head(tmp_path, family):
    """ViTModel / DeiTModel checkpoints (google/vit-base-patch16-224-in21k is one) carry a pooler that the
    classifier never reads: it is ignored, the head is new, and the body's [CLS] output is transformers'."""
    folder = save_tiny_vit(tmp_path / "model", family, "bare")
    model = jaxft.load(str(folder), task="image-classification", num_labels=3)
    x = pixels()
    body = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        cls = body(pixel_values=torch.from_numpy(x)).last_hidden_state[:, 0].numpy()
    kernel, bias = np.asarray(model.classifier.kernel[...]), np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(np.asarray(model(pixel_values=x)), cls @ kernel + bias, atol=1e-4, rtol=1e-4)


def test_pixel_values_of_the_wrong_shape_are_refused(tmp_path):
    model = jaxft.load(str(save_tiny_vit(tmp_path / "model")), task="image-classification")
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 32, 32\]"):
        model(pixel_values=pixels().transpose(0, 2, 3, 1))  # channels last


def test_patch_kind_is_torch_conv2d_weight_channels_last():
    weight = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)  # [out, in, kh, kw]
    kernel = Kind.PATCH.to_jaxft(weight, (2, 2, 3, 4))
    assert kernel.shape == (2, 2, 3, 4) and kernel[1, 0, 2, 3] == weight[3, 2, 1, 0]
    assert Kind.PATCH.hf_shape(kernel.shape) == weight.shape
    np.testing.assert_array_equal(Kind.PATCH.to_hf(kernel), weight)


def test_every_weight_has_logical_axes_and_a_table_row(tmp_path):
    from flax import nnx

    model = jaxft.load(str(save_tiny_vit(tmp_path / "model", "deit", "teacher")), task="image-classification")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_str(path)
        assert len(var.get_metadata()["logical_axes"]) == var.get_value().ndim, name
        assert vit_hf.hf_entry(name, model.spec, "deit.") is not None, name


def test_state_keys_are_the_ones_transformers_saves(tmp_path):
    """What export must write: the keys of each class's saved checkpoint (transformers 5 renames some modules
    in memory and writes the hub's names back on save)."""
    from safetensors import safe_open

    for family, head in [("vit", "classification"), ("deit", "teacher"), ("deit", "classification")]:
        folder = save_tiny_vit(tmp_path / f"{family}-{head}", family, head)
        model = jaxft.load(str(folder), task="image-classification")
        with safe_open(folder / "model.safetensors", "np") as f:
            saved = set(f.keys())
        assert vit_hf.hf_state_keys(model.spec, f"{family}.") == saved, (family, head)
        torch_model = transformers.AutoModelForImageClassification.from_pretrained(folder)
        assert vit_hf.hf_class_name(model.spec, family) == type(torch_model).__name__


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_a_new_image_size_resamples_the_position_grid_and_transformers_agrees(tmp_path, family, caplog):
    """32-px checkpoints (4 x 4 patches) run at 48 px (6 x 6): the special tokens' rows are kept, the grid is
    resampled at load, and transformers, given the resampled table and the new size, computes the same logits."""
    import logging

    folder = save_tiny_vit(tmp_path / "model", family, "classification")
    with caplog.at_level(logging.INFO, logger="jaxft"):
        model = jaxft.load(str(folder), task="image-classification", image_size=48)
    special = 2 if family == "deit" else 1
    assert "resampled" in caplog.text and f"[1, {special + 16}, 32] to [1, {special + 36}, 32]" in caplog.text
    table = np.array(model.embeddings.position_embeddings[...])
    assert table.shape == (1, special + 36, 32)
    theirs = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    np.testing.assert_array_equal(  # the [CLS] (and distillation) rows as they were
        table[0, :special], theirs.base_model.embeddings.position_embeddings.detach().numpy()[0, :special]
    )
    config = transformers.AutoConfig.from_pretrained(folder)
    config.image_size = 48
    resized = transformers.AutoModelForImageClassification.from_config(config).eval()
    state = {k: v for k, v in theirs.state_dict().items() if "position_embeddings" not in k}
    state[f"{family}.embeddings.position_embeddings"] = torch.from_numpy(table)
    resized.load_state_dict(state)
    x = pixels(size=48)
    with torch.no_grad():
        want = resized(pixel_values=torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(pixel_values=x)), want, atol=1e-4, rtol=1e-4)


def test_a_grid_resample_keeps_a_smooth_table_smooth():
    from jaxft.models.hf_layout import grid_split, resample_grid

    assert grid_split(197) == (1, 14) and grid_split(198) == (2, 14) and grid_split(200) is None
    side = np.linspace(0, 1, 4, dtype=np.float32)
    grid = (side[:, None] + 2 * side[None, :])[..., None] * np.ones((1, 1, 3), np.float32)  # a plane in (y, x)
    table = np.concatenate([np.full((1, 3), 7.0, np.float32), grid.reshape(16, 3)])[None]
    out = resample_grid(table, (1, 1 + 64, 3))
    assert out.shape == (1, 65, 3) and np.all(out[0, 0] == 7.0)
    plane = out[0, 1:].reshape(8, 8, 3)[..., 0]
    assert np.all(np.diff(plane, axis=0) > 0) and np.all(np.diff(plane, axis=1) > 0)  # still increasing both ways


def test_an_image_size_for_a_text_model_is_refused(tiny_bert):
    from jaxft.config import ConfigError

    with pytest.raises(ConfigError, match="no image model"):
        jaxft.load(str(tiny_bert), image_size=64)


@pytest.mark.parametrize("scan", [True, False])
def test_bf16_compute_gradients_are_close_to_fp32(tmp_path, scan):
    """A bf16-compute step's gradients (every matmul's backward in bf16, as layers.matmul runs it; on this CPU its
    weight gradients through the transposed-by-identity path) against the same gradients in fp32: within bf16's
    precision, and every one in fp32 as the parameters are."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    folder = save_tiny_vit(tmp_path / "model")
    x, labels = pixels(batch=4), np.array([0, 1, 2, 1])

    def grads(dtype):
        model = jaxft.load(str(folder), task="image-classification", scan_layers=scan).configure(dtype)
        graphdef, params = nnx.split(model)

        def loss(params):
            logits = nnx.merge(graphdef, params)(pixel_values=x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    got, want = grads(jnp.bfloat16), grads(jnp.float32)
    assert {g.dtype for g in got} == {w.dtype for w in want} == {jnp.dtype(jnp.float32)}
    scale = float(optax.tree.norm(want))
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, got, want))) <= 0.02 * scale
    for g, w in zip(got, want):  # each leaf; the key bias's gradient is zero but for rounding
        assert float(jnp.linalg.norm(g - w)) <= 0.05 * float(jnp.linalg.norm(w)) + 1e-3 * scale
