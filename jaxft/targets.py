"""Compile targets for `jaxft plan --target`: a Cloud TPU slice (compiled on this machine through libtpu, with no
TPU attached), NVIDIA GPUs (compiled through the JAX CUDA plugin from a device description, with no GPU
attached), or this machine's own devices, and what their chips hold and compute.

A TPU target is named as `gcloud` names accelerator types (`v5litepod-4`, `v5p-8`, `v6e-16`, `v4-8`: the number
counts chips for v5e and v6e, TensorCores for v4 and v5p, two per chip) or as a topology (`v5e:2x2`, `v5p:2x2x1`).
A GPU target is a model and a count: `h100` (one GPU), `h100-8` (one host of eight), `a100-16` (two hosts of
eight); beyond eight GPUs a host holds eight.
"""

from __future__ import annotations

import dataclasses
import importlib
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


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU model: what XLA's GPU compiler needs to know of the device to compile for it without one
    (its TargetConfig's device description) and what `plan` compares the compiled step against."""

    name: str  # as in a target name: h100
    kind: str  # the device_kind CUDA reports
    memory_bytes: int  # as nvidia-smi reports it
    bf16_flops: float  # dense peak, no sparsity
    compute_capability: tuple[int, int]
    sms: int
    fp32_cores_per_sm: int
    clock_ghz: float  # boost
    l2_bytes: int
    bandwidth: float  # HBM bytes/s
    shared_per_sm: int
    shared_per_block_optin: int
    source: str


MIB = 1024**2
# SXM parts. Counts, clocks, caches and bandwidth from NVIDIA's data sheets and architecture white papers; shared
# memory per SM and per block (opt-in) from the CUDA C++ Programming Guide's compute-capability table; memory as
# nvidia-smi reports it on each part.
GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("a100", "NVIDIA A100-SXM4-80GB", 81920 * MIB, 312e12, (8, 0), 108, 64, 1.41, 40 * MIB, 2.039e12,
            164 * 1024, 163 * 1024, "https://www.nvidia.com/en-us/data-center/a100/"),
        Gpu("h100", "NVIDIA H100 80GB HBM3", 81559 * MIB, 989e12, (9, 0), 132, 128, 1.98, 50 * MIB, 3.35e12,
            228 * 1024, 227 * 1024, "https://www.nvidia.com/en-us/data-center/h100/"),
        Gpu("h200", "NVIDIA H200", 143771 * MIB, 989e12, (9, 0), 132, 128, 1.98, 50 * MIB, 4.8e12,
            228 * 1024, 227 * 1024, "https://www.nvidia.com/en-us/data-center/h200/"),
    )
}  # fmt: skip
GPUS_PER_HOST = 8
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
DEFAULT_MEM_FRACTION = 0.75  # what JAX's GPU client takes of a device's memory unless told otherwise
EXAMPLES = "local, v5litepod-4, v5p-8, v6e-16, v4-8, v5e:2x2, v5p:2x2x1, h100, h100-8, h200-8, a100-16"
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
    return TargetError(
        f"unknown target {name!r}: use one of {EXAMPLES} (v4, v5e, v5p, v6e slices of any size; "
        f"{', '.join(GPUS)} with a GPU count)"
    )


def parse_gpu_target(name: str) -> tuple[Gpu, int, int] | None:
    """(GPU, hosts, GPUs per host) of `h100` or `h100-N`; None when the name is no GPU's."""
    m = re.fullmatch(r"([a-z]\d+)(?:-(\d+))?", name)
    if m is None or m.group(1) not in GPUS:
        return None
    count = int(m.group(2) or 1)
    if count < 1:
        raise TargetError(f"target {name!r}: a GPU count is at least 1")
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
        raise TargetError(
            f"target {name!r}: up to {GPUS_PER_HOST} GPUs share a host, so a larger count is a multiple of "
            f"{GPUS_PER_HOST}"
        )
    per_host = min(count, GPUS_PER_HOST)
    return GPUS[m.group(1)], count // per_host, per_host


def resolve_target(name: str) -> Target:
    """The named target's devices; a TPU slice needs libtpu (the `tpu` extra), a GPU target the JAX CUDA plugin
    (the `gpu-plan` extra); neither needs the device."""
    if name == "local":
        return local_target()
    if gpu := parse_gpu_target(name):
        model, hosts, per_host = gpu
        fraction = gpu_memory_fraction()
        usable = int(model.memory_bytes * fraction)
        source = f"{model.source}: the {fraction:.0%} of its memory JAX's GPU client takes ({MEM_FRACTION_ENV})"
        devices = gpu_devices(model, hosts, per_host)
        return Target(name, devices, "gpu", usable, model.bf16_flops, f"{hosts}x{per_host} {model.name}", source)
    chip, topology = parse_tpu_target(name)
    return Target(name, tpu_devices(chip, topology), "tpu", chip.hbm_bytes, chip.bf16_flops, topology, chip.source)


def gpu_memory_fraction() -> float:
    """The share of each GPU's memory that JAX's GPU client will allocate from: XLA_PYTHON_CLIENT_MEM_FRACTION,
    0.75 by default, all of it under the platform allocator."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").strip().lower() == "platform":
        return 1.0
    raw = os.environ.get(MEM_FRACTION_ENV, "").strip()
    if not raw:
        return DEFAULT_MEM_FRACTION
    try:
        fraction = float(raw)
    except ValueError:
        raise TargetError(f"{MEM_FRACTION_ENV}={raw!r} is not a number") from None
    if not 0 < fraction <= 1:
        raise TargetError(f"{MEM_FRACTION_ENV}={raw!r} is not a fraction in (0, 1]")
    return fraction


def gpu_target_config(gpu: Gpu, cuda_build: int, cudnn_build: int) -> str:
    """The GPU compiler's TargetConfig (text proto) for this model, with the CUDA and cuDNN versions the
    installed plugin was built against (as CUDA encodes them: 12080 is 12.8, 90800 is 9.8.0)."""
    major, minor = gpu.compute_capability
    fields = {
        "threads_per_block_limit": 1024,
        "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024,
        "shared_memory_per_core": gpu.shared_per_sm,
        "shared_memory_per_block_optin": gpu.shared_per_block_optin,
        "threads_per_core_limit": 2048,
        "core_count": gpu.sms,
        "fpus_per_core": gpu.fp32_cores_per_sm,
        "block_dim_limit_x": 2**31 - 1,
        "block_dim_limit_y": 65535,
        "block_dim_limit_z": 65535,
        "memory_bandwidth": int(gpu.bandwidth),
        "l2_cache_size": gpu.l2_bytes,
        "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": gpu.memory_bytes,
        "registers_per_core_limit": 65536,
        "registers_per_block_limit": 65536,
    }
    info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    return (
        f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
        'platform_name: "CUDA"\n'
        f"dnn_version_info {{ major: {cudnn_build // 10000} minor: {cudnn_build // 100 % 100} "
        f"patch: {cudnn_build % 100} }}\n"
        f"runtime_version {{ major: {cuda_build // 1000} minor: {cuda_build // 10 % 100} }}\n"
        f'device_description_str: "{gpu.kind}"\n'
    )


def gpu_devices(gpu: Gpu, hosts: int, per_host: int) -> list[Any]:
    """Compile-only devices of `hosts` hosts of `per_host` GPUs, through the JAX CUDA plugin, on any host."""
    plugin = hostmem.load_cuda_plugin()
    if plugin is None:
        raise TargetError(
            f"target {gpu.name}: compiling for GPUs needs the JAX CUDA plugin: pip install 'jaxft[gpu-plan]' "
            '(or pip install "jax[cuda12-local]==<your jax version>")'
        )
    versions = importlib.import_module(plugin.__name__.replace("jax_plugins.xla_", "jax_") + "_plugin._versions")
    config = gpu_target_config(gpu, versions.cuda_runtime_build_version(), versions.cudnn_build_version())
    from jax.experimental import topologies

    try:
        with hostmem.dropping_stderr_lines():
            desc = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x{hosts}x{per_host}")
    except Exception as e:  # the plugin reports a description it cannot use as a runtime error
        raise TargetError(f"target {gpu.name}: the CUDA plugin cannot build it ({str(e).splitlines()[0]})") from None
    return list(desc.devices)


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
        flops = next((g.bf16_flops for g in GPUS.values() if g.name.upper() in kind), None)
        if platform == "tpu":
            chip = next((c for c in CHIPS.values() if _kind_matches(c, kind)), None)
            flops = chip.bf16_flops if chip else None
            hbm = hbm or (chip.hbm_bytes if chip else None)
    return Target("local", devices, "gpu" if platform in ("gpu", "cuda", "rocm") else platform, hbm, flops, "", source)


def _kind_matches(chip: Chip, kind: str) -> bool:
    """device_kind names: 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' (v5p), 'TPU v6 lite' (v6e)."""
    kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
    return kind == kinds[chip.name]
