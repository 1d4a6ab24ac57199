"""Sharding: the same loss on (8,1,1), (2,4,1) and (2,2,2) meshes; clear errors for indivisible layouts."""

import jax
import numpy as np
import pytest

from jaxft import mesh
from jaxft.config import MeshConfig
from jaxft.mesh import MeshError
from jaxft.sharding import ShardingError
from tests.fixtures import make_setup, random_batch

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _two_steps(folder, shape):
    s = make_setup(folder, shape, dropout_rate=0.0)
    state, losses = s.state, []
    for seed in range(2):
        state, metrics = s.step(state, mesh.make_global_batch(random_batch(seed=seed), s.mesh))
        losses.append(float(metrics["loss"]))
    kernel = state.trainable["encoder"]["layers"][0]["up"]["kernel"][...]
    return losses, np.asarray(jax.device_get(kernel)), kernel.sharding


def test_same_loss_on_every_mesh(tiny_bert):
    results = {shape: _two_steps(tiny_bert, shape) for shape in MESHES}
    base_losses, base_kernel, _ = results[MESHES[0]]
    for shape in MESHES[1:]:
        losses, kernel, _ = results[shape]
        np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0)
        np.testing.assert_allclose(kernel, base_kernel, atol=1e-5, rtol=0)
    # The sharded meshes really shard: fsdp=4 splits the embed dim of this kernel four ways.
    assert results[(2, 4, 1)][2].spec[0] == "fsdp"
    assert results[(2, 2, 2)][2].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_mesh_minus_one_means_the_rest():
    assert mesh.resolve_mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(MeshError, match="8 devices"):
        mesh.resolve_mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)


def test_indivisible_parameter_dimension_is_a_clear_error(tiny_bert):
    # 4 attention heads cannot be split over tensor=8.
    with pytest.raises(ShardingError, match=r"not divisible by mesh axes tensor = 8"):
        make_setup(tiny_bert, (1, 1, 8))


def test_batch_not_divisible_by_data_parallel_size():
    m = mesh.build_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    with pytest.raises(MeshError, match="train.batch_size: 12 .* data-parallel size 8"):
        mesh.check_batch(12, m)
