"""The device mesh (data, fsdp, tensor) from config, and global batches sharded over it.

Owns device layout only; which parameter goes where is sharding.py's job.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.config import MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both data-parallel axes


class MeshError(ValueError):
    """A mesh that does not fit the devices, or a batch that does not fit the mesh."""


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise MeshError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh: {num_devices} devices are not divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh: data×fsdp×tensor = {sizes[0]}×{sizes[1]}×{sizes[2]} = {math.prod(sizes)} "
            f"but {num_devices} devices are available"
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh, what: str = "train.batch_size", microbatches: int = 1) -> None:
    dp = data_parallel_size(mesh)
    per_step = global_batch // microbatches
    if global_batch % microbatches or per_step % dp:
        raise MeshError(
            f"{what}: {global_batch} (÷ {microbatches} microbatches) is not divisible by the data-parallel "
            f"size {dp} (mesh data×fsdp)"
        )
    if global_batch % jax.process_count():
        raise MeshError(f"{what}: {global_batch} is not divisible by the {jax.process_count()} processes")


def make_global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process passes its rows; the result is one global array per field, sharded over batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
