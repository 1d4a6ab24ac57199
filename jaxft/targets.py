"""Compile targets for `jaxft plan --target`: a Cloud TPU slice (compiled on this machine through libtpu, with no
TPU attached) or this machine's own devices, and what their chips hold and compute.

A TPU target is named as `gcloud` names accelerator types (`v5litepod-4`, `v5p-8`, `v6e-16`, `v4-8`: the number
counts chips for v5e and v6e, TensorCores for v4 and v5p, two per chip) or as a topology (`v5e:2x2`, `v5p:2x2x1`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from jaxft import hostmem


class TargetError(ValueError):
    """A target that is not known, or that cannot be compiled for here."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: the figures `plan` compares a compiled step against, per chip."""

    name: str  # as in a topology name: v5e
    gcloud: str  # the accelerator-type prefix: v5litepod
    hbm_bytes: int
    bf16_flops: float  # dense peak per chip
    dims: int  # 2: a 2-D torus (AxB), 3: a 3-D one (AxBxC)
    cores_in_name: int  # what the accelerator type's number counts per chip (2: TensorCores)
    chip_config: str  # libtpu's chip config with one JAX device per chip
    source: str


GIB = 1024**3
# HBM and dense bf16 peak per chip, from each generation's Cloud TPU system-architecture page.
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("v4", "v4", 32 * GIB, 275e12, 3, 2, "megacore", "https://cloud.google.com/tpu/docs/v4"),
        Chip("v5e", "v5litepod", 16 * GIB, 197e12, 2, 1, "default", "https://cloud.google.com/tpu/docs/v5e"),
        Chip("v5p", "v5p", 95 * GIB, 459e12, 3, 2, "default", "https://cloud.google.com/tpu/docs/v5p"),
        Chip("v6e", "v6e", 32 * GIB, 918e12, 2, 1, "default", "https://cloud.google.com/tpu/docs/v6e"),
    )
}
# Dense bf16 peak per GPU (no sparsity), from NVIDIA's data sheets; `local` uses it when it finds one of these.
GPU_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
EXAMPLES = "local, v5litepod-4, v5p-8, v6e-16, v4-8, v5e:2x2, v5p:2x2x1"
MAX_CHIPS = 8960  # the largest slice (a v5p pod); beyond it a name is a typo


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to compile for, with their memory and peak FLOP/s per device (None where not known)."""

    name: str  # as the user wrote it
    devices: list[Any]
    platform: str  # "tpu", "gpu" or "cpu"
    hbm_bytes: int | None
    peak_flops: float | None
    topology: str = ""  # v5e:2x2 for a TPU slice
    source: str = ""  # where the memory and FLOP/s figures come from


def topology_of(chip: Chip, chips: int) -> str:
    """The default slice shape of `chips` chips: from 1x1 (2-D) or 2x2x1 (3-D), the smallest side doubled until
    the count is reached (v5e: 4 → 2x2, 8 → 2x4, 256 → 16x16; v5p: 4 → 2x2x1, 8 → 2x2x2, 64 → 4x4x4)."""
    dims = [1, 1] if chip.dims == 2 else [2, 2, 1]
    if chips < math.prod(dims) or chips & (chips - 1):
        raise TargetError(
            f"target: {chip.name} slices have a power-of-two number of chips"
            + ("" if chip.dims == 2 else " from 4")
            + f", not {chips}"
        )
    while math.prod(dims) < chips:
        i = len(dims) - 1 - dims[::-1].index(min(dims))  # the last of the smallest sides
        dims[i] *= 2
    return f"{chip.name}:{'x'.join(map(str, dims))}"


def parse_tpu_target(name: str) -> tuple[Chip, str]:
    """(chip, topology) of an accelerator type or a topology name."""
    by_gcloud = {c.gcloud: c for c in CHIPS.values()}
    if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", name):
        chip = by_gcloud.get(m.group(1))
        if chip is None:
            raise _unknown(name)
        count = int(m.group(2))
        if count % chip.cores_in_name or not 0 < count <= MAX_CHIPS * chip.cores_in_name:
            raise TargetError(f"target {name!r}: {chip.gcloud}-N counts TensorCores, an even number")
        return chip, topology_of(chip, count // chip.cores_in_name)
    if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name):
        chip = CHIPS.get(m.group(1))
        sides = [int(s) for s in m.group(2).split("x")]
        if chip is None or len(sides) != chip.dims or not all(sides) or math.prod(sides) > MAX_CHIPS:
            raise _unknown(name)
        return chip, name
    raise _unknown(name)


def _unknown(name: str) -> TargetError:
    return TargetError(f"unknown target {name!r}: use one of {EXAMPLES} (v4, v5e, v5p, v6e slices of any size)")


def resolve_target(name: str) -> Target:
    """The named target's devices; a TPU slice needs libtpu (the `tpu` extra), not a TPU."""
    if name == "local":
        return local_target()
    chip, topology = parse_tpu_target(name)
    return Target(name, tpu_devices(chip, topology), "tpu", chip.hbm_bytes, chip.bf16_flops, topology, chip.source)


def tpu_devices(chip: Chip, topology: str) -> list[Any]:
    """The devices of a TPU slice of this topology, compiled for through libtpu on any host."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TargetError(
            f"target {topology}: compiling for TPUs needs libtpu: pip install 'jaxft[tpu]' "
            '(or pip install "jax[tpu]==<your jax version>")'
        ) from None
    # libtpu reads these from a TPU VM's metadata and complains without them; they do not change the compile.
    for key, value in hostmem.TPU_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    sides = [int(s) for s in topology.split(":")[1].split("x")] + [1]
    per_host = tuple(min(s, 2) for s in sides[:2]) + (1,)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name=chip.chip_config,
            chips_per_host_bounds=per_host,
            num_slices=1,
        )
    except Exception as e:  # libtpu reports a topology it cannot build as a runtime error
        raise TargetError(f"target {topology}: libtpu cannot build this slice ({str(e).splitlines()[0]})") from None
    return list(desc.devices)


def local_target() -> Target:
    """This machine's devices. A GPU's memory comes from the device itself; CPU devices share the host's RAM."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    stats = devices[0].memory_stats() or {}
    if platform == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        hbm, source = total // len(devices), "host RAM (os.sysconf) shared by the CPU devices"
        flops = None
    else:
        hbm, source = stats.get("bytes_limit"), "the device's memory_stats()"
        kind = devices[0].device_kind
        flops = next((f for k, f in GPU_BF16_FLOPS.items() if k in kind), None)
        if platform == "tpu":
            chip = next((c for c in CHIPS.values() if _kind_matches(c, kind)), None)
            flops = chip.bf16_flops if chip else None
            hbm = hbm or (chip.hbm_bytes if chip else None)
    return Target("local", devices, "gpu" if platform in ("gpu", "cuda", "rocm") else platform, hbm, flops, "", source)


def _kind_matches(chip: Chip, kind: str) -> bool:
    """device_kind names: 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' (v5p), 'TPU v6 lite' (v6e)."""
    kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
    return kind == kinds[chip.name]
