"""The device mesh from MeshConfig on 8 fake CPU devices, batch checks and sharding, and the logical-axis rules."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import axes
from jaxft.config import MeshConfig
from jaxft.mesh import (
    AXES,
    BATCH_AXES,
    MeshError,
    batch_sharding,
    build_mesh,
    check_batch,
    data_parallel_size,
    make_global_batch,
    resolve_mesh_shape,
)
from jaxft.sharding import ShardingError, logical_to_spec, replicated, to_named_shardings

RULES = MeshConfig().rules


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((1, -1, 1), 8, (1, 8, 1)),
        ((1, 1, -1), 8, (1, 1, 8)),
        ((2, -1, 1), 8, (2, 4, 1)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((-1, 4, 1), 4, (1, 4, 1)),
        ((-1, 1, 1), 1, (1, 1, 1)),
        ((-1, 3, 1), 6, (2, 3, 1)),
    ],
)
def test_resolve_mesh_shape(sizes, devices, expected):
    got = resolve_mesh_shape(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]), devices)
    assert got == expected and type(got) is tuple


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((-1, -1, 1), "mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        ((-1, 1, -1), "mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        ((-1, 3, 1), "mesh: 8 devices are not divisible by the fixed axes' product 3"),
        ((-1, 4, 4), "mesh: 8 devices are not divisible by the fixed axes' product 16"),
        ((2, 2, 1), "mesh: data×fsdp×tensor = 2×2×1 = 4 but 8 devices are available"),
        ((4, 2, 2), "mesh: data×fsdp×tensor = 4×2×2 = 16 but 8 devices are available"),
        ((1, 1, 1), "mesh: data×fsdp×tensor = 1×1×1 = 1 but 8 devices are available"),
    ],
)
def test_resolve_mesh_shape_errors(sizes, message):
    with pytest.raises(MeshError) as e:
        resolve_mesh_shape(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]), 8)
    assert str(e.value) == message


def test_mesh_error_is_a_value_error():
    assert issubclass(MeshError, ValueError)


@pytest.mark.parametrize(
    "sizes, shape",
    [((-1, 1, 1), (8, 1, 1)), ((2, 4, 1), (2, 4, 1)), ((2, 2, 2), (2, 2, 2)), ((1, -1, 2), (1, 4, 2))],
)
def test_build_mesh_on_all_devices(sizes, shape):
    m = build_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))
    assert m.axis_names == AXES == ("data", "fsdp", "tensor")
    assert dict(m.shape) == dict(zip(AXES, shape))
    assert m.devices.shape == shape
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


def test_build_mesh_on_given_devices():
    devices = jax.devices()[:4]
    m = build_mesh(MeshConfig(data=-1, fsdp=1, tensor=2), devices)
    assert dict(m.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in devices)


def test_build_mesh_rejects_a_mismatched_device_list():
    with pytest.raises(MeshError, match="^mesh: data×fsdp×tensor = 2×2×2 = 8 but 4 devices are available$"):
        build_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:4])


@pytest.mark.parametrize("sizes, dp", [((8, 1, 1), 8), ((2, 4, 1), 8), ((2, 2, 2), 4), ((1, 1, 8), 1), ((4, 1, 2), 4)])
def test_data_parallel_size(sizes, dp):
    assert data_parallel_size(build_mesh(MeshConfig(data=sizes[0], fsdp=sizes[1], tensor=sizes[2]))) == dp


def test_batch_sharding_splits_rows_over_data_and_fsdp():
    m = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    s = batch_sharding(m)
    assert BATCH_AXES == ("data", "fsdp")
    assert s.spec == PartitionSpec(("data", "fsdp")) and s.mesh is m


@pytest.mark.parametrize(
    "sizes, batch, microbatches",
    [((8, 1, 1), 8, 1), ((8, 1, 1), 32, 4), ((2, 2, 2), 4, 1), ((2, 2, 2), 12, 3), ((1, 1, 8), 3, 1)],
)
def test_check_batch_accepts(sizes, batch, microbatches):
    assert check_batch(batch, build_mesh(MeshConfig(*sizes)), microbatches=microbatches) is None


@pytest.mark.parametrize(
    "sizes, batch, microbatches, message",
    [
        ((8, 1, 1), 16, 4, "train.batch_size: 16 (÷ 4 microbatches) is not divisible by the data-parallel size 8"),
        ((8, 1, 1), 18, 4, "train.batch_size: 18 (÷ 4 microbatches) is not divisible by the data-parallel size 8"),
        ((2, 2, 2), 6, 1, "train.batch_size: 6 (÷ 1 microbatches) is not divisible by the data-parallel size 4"),
    ],
)
def test_check_batch_rejects(sizes, batch, microbatches, message):
    with pytest.raises(MeshError) as e:
        check_batch(batch, build_mesh(MeshConfig(*sizes)), microbatches=microbatches)
    assert str(e.value) == message + " (mesh data×fsdp)"


def test_check_batch_names_the_key():
    with pytest.raises(MeshError, match=r"^train\.eval_batch_size: 3 \(÷ 1 microbatches\)"):
        check_batch(3, build_mesh(MeshConfig(data=8)), what="train.eval_batch_size")


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_make_global_batch(sizes):
    m = build_mesh(MeshConfig(*sizes))
    local = {
        "input_ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
        "labels": np.arange(8, dtype=np.int32),
    }
    out = make_global_batch(local, m)
    assert set(out) == {"input_ids", "labels"}
    dp = data_parallel_size(m)
    for k, v in local.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        assert out[k].sharding == batch_sharding(m)
        np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert {shard.data.shape[0] for shard in out[k].addressable_shards} == {8 // dp}
    rows = {tuple(np.asarray(s.data)) for s in out["labels"].addressable_shards}
    assert rows == {tuple(range(i, i + 8 // dp)) for i in range(0, 8, 8 // dp)}


@pytest.mark.parametrize(
    "logical, expected",
    [
        ((axes.BATCH, axes.SEQ), PartitionSpec(("data", "fsdp"), None)),
        ((axes.EMBED, axes.MLP), PartitionSpec("fsdp", "tensor")),
        ((axes.MLP, axes.EMBED), PartitionSpec("tensor", "fsdp")),
        ((axes.VOCAB, axes.EMBED), PartitionSpec("tensor", "fsdp")),
        ((axes.EMBED, axes.HEADS, axes.KV), PartitionSpec("fsdp", "tensor", None)),
        ((axes.HEADS, axes.MLP), PartitionSpec("tensor", None)),
        ((axes.BATCH, axes.EMBED), PartitionSpec(("data", "fsdp"), None)),
        ((axes.LAYERS, axes.EMBED, axes.KV_HEADS), PartitionSpec(None, "fsdp", "tensor")),
        ((axes.NORM,), PartitionSpec(None)),
        ((None, axes.EMBED), PartitionSpec(None, "fsdp")),
        ((), PartitionSpec()),
    ],
)
def test_logical_to_spec_with_the_default_rules(logical, expected):
    assert logical_to_spec(logical, RULES) == expected


def test_logical_to_spec_keeps_the_unused_part_of_a_multi_axis_rule():
    rules = (("a", ("data", "fsdp")), ("b", ("fsdp", "tensor")), ("c", ["tensor"]))
    assert logical_to_spec(("a", "b"), rules) == PartitionSpec(("data", "fsdp"), "tensor")
    assert logical_to_spec(("b", "a"), rules) == PartitionSpec(("fsdp", "tensor"), "data")
    assert logical_to_spec(("c", "b"), rules) == PartitionSpec("tensor", "fsdp")


def test_logical_to_spec_unknown_axis():
    with pytest.raises(ShardingError, match="^mesh.rules: logical axis 'experts' has no rule$"):
        logical_to_spec((axes.EMBED, "experts"), RULES)


def test_named_and_replicated_shardings():
    m = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    named = to_named_shardings({"w": PartitionSpec("fsdp", "tensor"), "b": PartitionSpec(None)}, m)
    assert named == {"w": NamedSharding(m, PartitionSpec("fsdp", "tensor")), "b": NamedSharding(m, PartitionSpec(None))}
    assert replicated(m) == NamedSharding(m, PartitionSpec())
