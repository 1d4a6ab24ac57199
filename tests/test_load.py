"""Pretrained checkpoint reading on tiny hand-written files: sources (folders, files, hub ids offline), config.json,
safetensors (single, sharded, truncated, renamed keys), legacy Flax msgpack, and the merge into a sharded parameter
state with each of its errors (missing, mis-shaped, unexpected, unmapped), new params and ignorable keys; and the
source identity that resumes compare."""

import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from jaxft import axes
from jaxft.config import MeshConfig
from jaxft.load import (
    CheckpointError,
    hash_files,
    merge_checkpoint,
    open_checkpoint,
    read_hf_config,
    resolve_source,
    source_identity,
)
from jaxft.mesh import build_mesh
from jaxft.models.hf_layout import HF_FLAX_LEAVES, KeyRenames, Kind, lookup
from jaxft.models.layers import LayerNorm, Linear
from jaxft.paths import path_str

W = np.arange(24, dtype=np.float32).reshape(8, 3)  # torch Linear(3 -> 8) weight [out, in]
B = np.arange(8, dtype=np.float32) - 4.0
SCALE = np.linspace(0.5, 1.5, 3, dtype=np.float32)


def write_weights(folder: Path, tensors: dict[str, np.ndarray], name: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    return folder


def good_tensors() -> dict[str, np.ndarray]:
    return {"dense.weight": W, "dense.bias": B, "norm.weight": SCALE}


# ----------------------------------------------------------------------------------------------- sources


def test_resolve_source_existing_folder_and_bundled_alias(tmp_path, minilm):
    assert resolve_source(str(tmp_path)) == tmp_path
    assert resolve_source("minilm") == minilm


@pytest.mark.parametrize("source", ["/no/such/ckpt", "./relative/missing", "a/b/c", "  "])
def test_resolve_source_missing_path(source):
    with pytest.raises(CheckpointError, match=f"^{source}: checkpoint path does not exist$"):
        resolve_source(source)


def test_resolve_source_of_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors: expected a checkpoint folder, found a file"):
        resolve_source(str(f))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(CheckpointError, match=r"^someorg/some-bert: not a local folder, and the Hugging Face hub is"):
        resolve_source("someorg/some-bert")


def test_read_hf_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: missing config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    assert read_hf_config(tmp_path) == {"model_type": "bert", "hidden_size": 8}


# ---------------------------------------------------------------------------------------------- readers


def test_open_safetensors(tmp_path):
    folder = write_weights(tmp_path / "ckpt", good_tensors())
    source = open_checkpoint(folder)
    assert source.shapes == {"dense.weight": (8, 3), "dense.bias": (8,), "norm.weight": (3,)}
    assert source.files == [folder / "model.safetensors"]
    np.testing.assert_array_equal(source.get("dense.weight"), W)
    np.testing.assert_array_equal(source.get("norm.weight"), SCALE)


def test_open_safetensors_renames_old_key_names(tmp_path):
    folder = write_weights(tmp_path / "ckpt", {"enc.LayerNorm.gamma": SCALE, "enc.LayerNorm.beta": SCALE + 1})
    source = open_checkpoint(folder, KeyRenames(suffixes=((".gamma", ".weight"), (".beta", ".bias"))))
    assert source.shapes == {"enc.LayerNorm.weight": (3,), "enc.LayerNorm.bias": (3,)}
    np.testing.assert_array_equal(source.get("enc.LayerNorm.bias"), SCALE + 1)


def test_open_sharded_safetensors(tmp_path):
    folder = write_weights(tmp_path / "ckpt", {"dense.weight": W}, "model-00001-of-00002.safetensors")
    write_weights(folder, {"dense.bias": B, "norm.weight": SCALE}, "model-00002-of-00002.safetensors")
    weight_map = {
        "dense.weight": "model-00001-of-00002.safetensors",
        "dense.bias": "model-00002-of-00002.safetensors",
        "norm.weight": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    source = open_checkpoint(folder)
    assert source.shapes == {"dense.weight": (8, 3), "dense.bias": (8,), "norm.weight": (3,)}
    assert [f.name for f in source.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    np.testing.assert_array_equal(source.get("dense.bias"), B)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing"
    ):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a valid safetensors index"):
        open_checkpoint(folder)


def test_open_truncated_safetensors_names_the_file(tmp_path):
    folder = write_weights(tmp_path / "ckpt", good_tensors())
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"ckpt/model.safetensors: (truncated|corrupted)"):
        open_checkpoint(folder)


def test_open_legacy_flax_msgpack(tmp_path):
    kernel = W.T.copy()  # Flax Dense kernels are [in, out]
    tree = {"enc": {"dense": {"kernel": kernel, "bias": B}, "LayerNorm": {"scale": SCALE}}}
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    source = open_checkpoint(tmp_path, KeyRenames(flax_leaves=HF_FLAX_LEAVES))
    assert source.shapes == {"enc.dense.weight": (8, 3), "enc.dense.bias": (8,), "enc.LayerNorm.weight": (3,)}
    np.testing.assert_array_equal(source.get("enc.dense.weight"), W)
    (tmp_path / "flax_model.msgpack").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError, match=r"flax_model.msgpack: not a readable Flax msgpack checkpoint"):
        open_checkpoint(tmp_path)


def test_safetensors_win_over_msgpack(tmp_path):
    write_weights(tmp_path, good_tensors())
    (tmp_path / "flax_model.msgpack").write_bytes(b"garbage")
    assert set(open_checkpoint(tmp_path).shapes) == set(good_tensors())


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=r": no model.safetensors, model.safetensors.index.json or flax_model.msgpack$",
    ) as e:
        open_checkpoint(tmp_path)
    assert str(e.value).startswith(str(tmp_path))


# ---------------------------------------------------------------------------------------------- identity


def test_source_identity_is_stable_and_follows_the_bytes(tmp_path):
    folder = write_weights(tmp_path / "ckpt", good_tensors())
    first = source_identity(folder, open_checkpoint(folder))
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert first == {"path": str(folder), "files": {"model.safetensors": sha}}
    assert source_identity(folder, open_checkpoint(folder)) == first
    write_weights(folder, {**good_tensors(), "dense.bias": B + 1})  # same keys and shapes, other values
    changed = source_identity(folder, open_checkpoint(folder))
    assert changed["path"] == first["path"]
    assert changed["files"]["model.safetensors"] != sha
    assert source_identity(folder, open_checkpoint(folder), hashed=False) == {"path": str(folder), "files": {}}


def test_hash_files(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * (5 << 20))  # more than one 4 MiB chunk
    b.write_bytes(b"")
    assert hash_files([a, b]) == {
        "a.bin": hashlib.sha256(b"x" * (5 << 20)).hexdigest(),
        "b.bin": hashlib.sha256(b"").hexdigest(),
    }


# ------------------------------------------------------------------------------------------------- merge


class Tiny(nnx.Module):
    """dense: kernel [3, 8] (torch weight [8, 3]), bias [8]; norm: scale [3], bias [3]."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = Linear((3,), (8,), (axes.EMBED,), (axes.MLP,), bias=True, rngs=rngs)
        self.norm = LayerNorm(3, 1e-5)


TABLE = (
    (r"dense/kernel", "dense.weight", Kind.LINEAR1),
    (r"dense/bias", "dense.bias", Kind.COPY),
    (r"norm/scale", "norm.weight", Kind.COPY),
    (r"norm/bias", "norm.bias", Kind.COPY),
)


@pytest.fixture(scope="module")
def mesh():
    return build_mesh(MeshConfig(data=2, fsdp=1, tensor=4))


def abstract() -> nnx.State:
    return nnx.split(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))[1]


def shardings(mesh) -> dict[str, NamedSharding]:
    specs = {"dense/kernel": PartitionSpec(None, "tensor"), "dense/bias": PartitionSpec("tensor")}
    return {
        path_str(p): NamedSharding(mesh, specs.get(path_str(p), PartitionSpec()))
        for p, _ in nnx.to_flat_state(abstract())
    }


def merge(folder: Path, mesh, new_params=(), ignore_unused=(), fresh_shapes=None):
    """(path -> merged array, the path sets init_fresh was asked for); fresh values are all 7."""
    calls = []

    def init_fresh(wanted: set[str]) -> dict[str, jax.Array]:
        calls.append(set(wanted))
        return {p: jnp.full(shape, 7.0) for p, shape in (fresh_shapes or {}).items() if p in wanted}

    state = merge_checkpoint(
        abstract(),
        lambda path: lookup(path, TABLE),
        shardings(mesh),
        new_params,
        ignore_unused,
        init_fresh,
        open_checkpoint(folder),
    )
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}, calls


def test_merge_places_every_tensor_in_its_layout_and_sharding(tmp_path, mesh):
    folder = write_weights(tmp_path / "ckpt", {**good_tensors(), "norm.bias": SCALE - 1})
    out, calls = merge(folder, mesh)
    assert calls == [set()]
    assert set(out) == {"dense/kernel", "dense/bias", "norm/scale", "norm/bias"}
    np.testing.assert_array_equal(np.asarray(out["dense/kernel"]), W.T)
    np.testing.assert_array_equal(np.asarray(out["dense/bias"]), B)
    np.testing.assert_array_equal(np.asarray(out["norm/scale"]), SCALE)
    np.testing.assert_array_equal(np.asarray(out["norm/bias"]), SCALE - 1)
    assert out["dense/kernel"].sharding == NamedSharding(mesh, PartitionSpec(None, "tensor"))
    assert out["dense/kernel"].addressable_shards[0].data.shape == (3, 2)  # 8 outputs over tensor=4
    assert out["norm/scale"].sharding == NamedSharding(mesh, PartitionSpec())
    assert out["dense/kernel"].dtype == jnp.float32


def test_merge_missing_tensor_names_the_key_and_parameter(tmp_path, mesh):
    tensors = good_tensors()  # no norm.bias
    folder = write_weights(tmp_path / "ckpt", tensors)
    with pytest.raises(CheckpointError) as e:
        merge(folder, mesh)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 'model.safetensors'}: checkpoint does not fit the model: ")
    assert msg.endswith("missing norm.bias (for norm/bias, expected [3])")


def test_merge_mis_shaped_tensor(tmp_path, mesh):
    folder = write_weights(tmp_path / "ckpt", {**good_tensors(), "dense.weight": W[:5], "norm.bias": SCALE})
    with pytest.raises(CheckpointError, match=r"mis-shaped dense.weight: expected \[8, 3\], found \[5, 3\]$"):
        merge(folder, mesh)


def test_merge_unexpected_tensor_unless_ignorable(tmp_path, mesh):
    tensors = {**good_tensors(), "norm.bias": SCALE, "cls.predictions.bias": B}
    folder = write_weights(tmp_path / "ckpt", tensors)
    with pytest.raises(
        CheckpointError, match=r"checkpoint does not fit the model: unexpected cls.predictions.bias \[8\]$"
    ):
        merge(folder, mesh)
    out, _ = merge(folder, mesh, ignore_unused=(r"cls\..*",))
    np.testing.assert_array_equal(np.asarray(out["dense/bias"]), B)


def test_merge_lists_every_problem_at_once(tmp_path, mesh):
    folder = write_weights(tmp_path / "ckpt", {"dense.weight": W[:, :2], "dense.bias": B, "extra": B})
    with pytest.raises(CheckpointError) as e:
        merge(folder, mesh)
    problems = str(e.value).split("checkpoint does not fit the model: ")[1].split("; ")
    assert problems == [
        "mis-shaped dense.weight: expected [8, 3], found [8, 2]",
        "missing norm.bias (for norm/bias, expected [3])",
        "missing norm.weight (for norm/scale, expected [3])",
        "unexpected extra [8]",
    ]


def test_merge_parameter_without_a_table_row(tmp_path, mesh):
    folder = write_weights(tmp_path / "ckpt", {**good_tensors(), "norm.bias": SCALE})
    state = abstract()
    with pytest.raises(CheckpointError, match=r"dense/kernel: no HF key in the table"):
        merge_checkpoint(
            state,
            lambda path: None if path == "dense/kernel" else lookup(path, TABLE),
            shardings(mesh),
            (),
            (r"dense\.weight",),
            lambda wanted: {},
            open_checkpoint(folder),
        )


def test_merge_initialises_missing_or_mis_shaped_new_params(tmp_path, mesh):
    folder = write_weights(tmp_path / "ckpt", {"dense.weight": W, "dense.bias": B[:2], "norm.weight": SCALE})
    fresh = {"dense/bias": (8,), "norm/bias": (3,)}
    out, calls = merge(folder, mesh, new_params=(r"dense/bias", r"norm/bias"), fresh_shapes=fresh)
    assert calls == [{"dense/bias", "norm/bias"}]
    np.testing.assert_array_equal(np.asarray(out["dense/bias"]), np.full(8, 7.0))
    np.testing.assert_array_equal(np.asarray(out["norm/bias"]), np.full(3, 7.0))
    np.testing.assert_array_equal(np.asarray(out["dense/kernel"]), W.T)


def test_merge_logs_replaced_params_as_warnings_and_unkeyed_ones_once(tmp_path, mesh, caplog):
    """A parameter on new_params that the checkpoint holds in another shape is a warning (a head being replaced);
    one with no HF key at all (a LoRA adapter, a load.reinit_params parameter) is one info line, not a warning."""
    folder = write_weights(tmp_path / "ckpt", {**good_tensors(), "dense.bias": B[:2], "norm.bias": SCALE})
    fresh = {"dense/bias": (8,), "norm/scale": (3,)}
    with caplog.at_level(logging.INFO, logger="jaxft.load"):
        merge_checkpoint(
            abstract(),
            lambda path: None if path == "norm/scale" else lookup(path, TABLE),
            shardings(mesh),
            (r"dense/bias", r"norm/scale"),
            (r"norm\.weight",),
            lambda wanted: {p: jnp.full(s, 7.0) for p, s in fresh.items() if p in wanted},
            open_checkpoint(folder),
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "initialised" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("newly initialised") and "dense/bias" in warnings[0]
    assert infos == ["initialised, with no checkpoint tensor to read (LoRA adapters, load.reinit_params): norm/scale"]
