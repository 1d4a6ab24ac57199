"""The device mesh (data, fsdp, tensor) from config, and global batches sharded over it.

Owns device layout only; which parameter goes where is sharding.py's job.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class BatchRows:
    """Which rows of a global batch this process supplies. A row's place in the global batch (and so its
    dropout mask and its microbatch) is its global index, whatever the process count or the mesh."""

    size: int  # the global batch's rows
    mine: np.ndarray  # the global indices of this process's rows, ascending

    def __len__(self) -> int:
        return len(self.mine)


def batch_rows(mesh: Mesh, global_batch: int) -> BatchRows:
    """The rows of a `global_batch`-row batch that this process's devices hold."""
    mine: set[int] = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values():
        mine.update(range(*index[0].indices(global_batch)))
    return BatchRows(global_batch, np.asarray(sorted(mine), np.int64))


def make_global_batch(local: dict[str, np.ndarray], mesh: Mesh, rows: BatchRows | None = None) -> dict[str, jax.Array]:
    """One global array per field, sharded over the batch axes, from this process's rows of it (`rows.mine`,
    in that order). Without `rows`, one process passes the whole batch."""
    if rows is None:
        if jax.process_count() > 1:
            raise MeshError("make_global_batch: several processes must say which global rows they pass")
        rows = batch_rows(mesh, len(next(iter(local.values()))))
    return {k: _from_rows(v, rows, mesh) for k, v in local.items()}


def _from_rows(local: np.ndarray, rows: BatchRows, mesh: Mesh) -> jax.Array:
    if len(local) != len(rows):
        raise MeshError(f"batch: {len(local)} local rows for {len(rows)} global row indices")
    start = int(rows.mine[0]) if len(rows) else 0
    contiguous = len(rows) and int(rows.mine[-1]) - start + 1 == len(rows)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi, _ = index[0].indices(rows.size)
        picked = local[lo - start : hi - start] if contiguous else local[np.searchsorted(rows.mine, np.arange(lo, hi))]
        return picked[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback((rows.size,) + local.shape[1:], batch_sharding(mesh), shard)
